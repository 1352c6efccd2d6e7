"""``edge-deploy serve``: the control plane as a long-running service."""

from __future__ import annotations

import argparse
import json
import socket
import time
from typing import TYPE_CHECKING

from deploy.cli._common import open_plane
from deploy.provision import POLICY_FILE, ProvisioningService
from deploy.registry import LIVE_STATES
from deploy.registry.backend import redact

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers


def add_parser(sub: Subparsers) -> None:
    sv = sub.add_parser("serve", help="serve the local artifact store over HTTP and drive every live rollout")
    sv.add_argument("--listen", help="HOST:PORT (default serve.listen)")
    sv.add_argument(
        "--api-listen", help="HOST:PORT of the API and dashboard (default api.listen; '' for none)"
    )


def run(args: argparse.Namespace) -> int:
    """The control plane as a service: the artifact endpoint, the fleet's reports in the registry,
    and every live deployment driven (pause/resume/abort/rollback from other processes included)."""
    # Imported here: the HTTP server is needed by this one long-running command only.
    from deploy.artifact_server import ArtifactServer
    from deploy.web import start_api

    with open_plane(args) as cp:
        listen = args.listen or cp.cfg.serve.listen
        host, _, port = listen.rpartition(":")
        root = cp.artifacts.root
        server = ArtifactServer(root, host=host, port=int(port), keep_requests=1000).start() if root else None
        # replicas on one registry split the heartbeats between them instead of each storing all
        cp.heartbeat_group = "edge-deploy"
        api_listen = cp.cfg.api.listen if args.api_listen is None else args.api_listen
        api = start_api(cp.cfg, api_listen) if api_listen else None
        driver = cp.driver()
        # With a provisioning policy in the home, serve answers claim certificates too (deploy/provision.py);
        # run it here or as `edge-deploy provision serve`, not both (each would answer every request).
        provisioner = None
        if (cp.cfg.home / POLICY_FILE).is_file():
            provisioner = ProvisioningService(cp.cfg, cp.registry)
            provisioner.start(cp.cfg.broker.connect_timeout)
        # One identity per host and home: a serve restarted after a crash takes its own lease back at
        # once. Replicas on one PostgreSQL registry therefore need a home (or a host) of their own.
        driver.owner = f"serve@{socket.gethostname()}:{cp.cfg.home.absolute()}"
        driver.LEASE_S = lease = cp.cfg.serve.lease
        registry = redact(cp.cfg.registry_location)
        print(json.dumps({
            "serving": server.url if server else None, "registry": registry, "owner": driver.owner,
            "dashboard": api.url if api else None,
            "token_file": str(cp.cfg.api.token_file) if api and api.token else None,
            "provisioning": provisioner is not None,
        }), flush=True)  # fmt: skip
        try:
            while True:
                cp.ingest()
                if provisioner is not None:
                    provisioner.step()
                for dep in cp.registry.deployments():
                    live = dep["state"] in LIVE_STATES or dep["command"]
                    # each pass renews the leases this replica holds; one that dies stops renewing,
                    # and another replica takes its deployments when the lease runs out
                    if live and cp.registry.take_lease(dep["id"], driver.owner, lease):
                        driver.step_or_wait(dep["id"])
                time.sleep(cp.cfg.serve.poll)
        finally:
            if provisioner is not None:
                provisioner.stop()
            if api is not None:
                api.stop()
            if server is not None:
                server.stop()
