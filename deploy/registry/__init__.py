"""The control plane's registry: models, images, devices and deployments, in one database.

A SQLite file on WAL (the default), or PostgreSQL (``registry.url``), for several control-plane
replicas; backend.py holds every difference between the two. The schema is a list of plain-SQL
migrations (``migrations/NNNN_name.sql``, applied by migrate.py, each in one transaction with the
row that records it in ``schema_migrations``): opening an older registry upgrades it, and a
registry written by a newer edge-deploy is refused (``registry_too_new``) instead of being misread.

    models              name + auto-incremented version, sha256, the ONNX signature, tags, properties
    images              name + auto-incremented version, the bundle's sha256/size, tags, properties
    image_models        which model versions an image was built from (delete refused while used)
    devices             learned from the devices' retained reports; tags set by the operator
    deployments         image -> target (device ids or a tag query), rollout policy, state, lease
    deployment_devices  each device's wave, generation, outcome, the image it had before, and the
                        manifest not yet acknowledged by the broker (the outbox)
    events              every deployment's history
    heartbeats          per-device inference windows (the health gates' evidence), kept for a while

The code, by responsibility: names.py (names, references, tags; no database), store.py (the
database, its transactions), backend.py (SQLite or PostgreSQL), catalog.py (models, images),
devices.py (devices, heartbeats), deployments.py (deployments, their history, lease and outbox).
``Registry`` is all of them over one connection.

Every refusal is a ControlPlaneError with a stable code; nothing is written when one is raised.
"""

from __future__ import annotations

from deploy.registry.catalog import Catalog, Image, Model
from deploy.registry.deployments import Deployments, LeaseLost
from deploy.registry.devices import HEARTBEAT_RETENTION_S, Devices
from deploy.registry.migrate import MIGRATIONS, Migration, migrate
from deploy.registry.names import NAME_RE, TAG_KEY_RE, check_name, parse_ref, parse_tags
from deploy.registry.store import LIVE_STATES

__all__ = [
    "HEARTBEAT_RETENTION_S",
    "LIVE_STATES",
    "MIGRATIONS",
    "NAME_RE",
    "TAG_KEY_RE",
    "Catalog",
    "Image",
    "LeaseLost",
    "Migration",
    "Model",
    "Registry",
    "check_name",
    "migrate",
    "parse_ref",
    "parse_tags",
]


class Registry(Deployments, Devices):
    """The one entry point: ``Registry(path_or_url)`` opens (creating or upgrading) the database."""
