"""The update wing: signed manifest in, an image active on disk out.

:mod:`~agent.update.deployer` (the state machine, one table), :mod:`~agent.update.fetch` (resumable,
size-capped downloads), :mod:`~agent.update.store` (content-addressed images, the atomic switch) and
:mod:`~agent.update.state` (the deployments and their transitions in SQLite). The deployer activates
through its ``Activator`` interface, which the serving wing implements.
"""
