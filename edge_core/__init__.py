"""The ground floor: what the device and the control plane both need, importing nothing of either.

The contract between them (the manifest and its pure verification, topics, the bundle format, the
Open Inference Protocol tensor codec that bundles' smoke tests are written in, the error tree with
its stable codes) and the small helpers both sides share (structured logging, one backoff helper,
hashing and atomic writes, config merging, crash points for the tests). ``deploy/`` imports this
package and nothing else of the agent; import-linter holds that (pyproject.toml).
"""
