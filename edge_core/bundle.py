"""The image bundle's layout, shared by the builder (deploy/bundle.py) and the store (agent/update/store.py).

One uncompressed tar: ``bundle.json`` (the metadata: ``format``, name, version, models, entry script,
files, smoke test) beside the image's files. docs/bundle.md is the full contract.
"""

from __future__ import annotations

#: The metadata member, at the root of the archive.
BUNDLE_METADATA = "bundle.json"
#: bundle.json's ``format``: a reader refuses any other.
FORMAT = 1
ENTRY_SCRIPT = "score.py"
MODELS_DIR = "models"
WHEELS_DIR = "wheels"
#: More members than this is refused before anything is unpacked.
MAX_MEMBERS = 10_000
