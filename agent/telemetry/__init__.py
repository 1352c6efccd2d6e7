"""The telemetry wing: what the device records about itself and its traffic, and where it goes.

:mod:`~agent.telemetry.buffer` (SQLite, one disk budget), :mod:`~agent.telemetry.capture` (sampled
inputs and outputs with lineage), :mod:`~agent.telemetry.metrics` (Prometheus registry),
:mod:`~agent.telemetry.heartbeat` (system and inference metrics, the heartbeat),
:mod:`~agent.telemetry.inventory` (capabilities) and :mod:`~agent.telemetry.uploader` (the buffer to
blob storage through :mod:`cloud_sync`).
"""
