"""edge-agent: the device-side daemon, in wings by seam (docs/architecture.md).

agent.ops        cli, daemon, wiring, doctor, status, certs, sdnotify   (top: may import any wing)
agent.channel    control channel interface, MQTT, IoT Hub                (one seam each)
agent.update     deployer, fetch, store, state
agent.serving    activation, API, scoring, runtime, workers
agent.telemetry  buffer, capture, metrics, heartbeat, inventory, uploader
agent.config     the agent's settings (every wing reads its own section)
"""

__version__ = "0.1.0"
