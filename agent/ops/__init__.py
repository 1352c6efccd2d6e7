"""The ops wing: the process around the wings.

:mod:`~agent.ops.cli` (edge-agent run | check-config | status | doctor), :mod:`~agent.ops.daemon`
(the main loop), :mod:`~agent.ops.wiring` (the one place that picks implementations),
:mod:`~agent.ops.doctor` (one module per check), :mod:`~agent.ops.status`, :mod:`~agent.ops.certs`,
:mod:`~agent.ops.sdnotify` and :mod:`~agent.ops.runinfo`.
"""
