"""The control channel wing: how desired state reaches the agent and how reports leave it.

:mod:`agent.channel.base` is the interface and imports no implementation; :mod:`agent.channel.mqtt`
(MQTT 5 with mutual TLS) and :mod:`agent.channel.iothub` (Azure IoT Hub's device twin) implement it.
The daemon's wiring (:mod:`agent.ops.wiring`) picks one from the config.
"""
