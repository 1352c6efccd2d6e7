"""The serving wing: the local scoring API over the active image.

:mod:`~agent.serving.activation` (runtime + scorer + API; the deployer's ``Activator``),
:mod:`~agent.serving.api` (uvicorn ASGI app), :mod:`~agent.serving.scoring` (HTTP-free /score and v2
inference, the smoke test), :mod:`~agent.serving.runtime` (onnxruntime sessions, the swap),
:mod:`~agent.serving.worker` (score.py worker pools; one worker's handle in
:mod:`~agent.serving.worker_process`, the parent's side of the frames in
:mod:`~agent.serving.worker_protocol`; the child is ``worker_child.py``, run as a script)
and :mod:`~agent.serving.pyenv` (per-image Python environments).
"""
