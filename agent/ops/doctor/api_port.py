"""The ``api-port`` check: the scoring API's address is served by the running agent, or, with no agent
running, free for it to bind (it binds only then, so it never competes with the agent)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.ops import status as status_mod
from agent.ops.doctor.report import Result


def _port_owner(port: int) -> str:
    import psutil

    try:
        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                try:
                    return f"pid {c.pid} ({psutil.Process(c.pid).name()})"
                except psutil.Error:
                    return f"pid {c.pid}"
    except (psutil.Error, OSError):
        pass
    return "another process"


def check_api_port(cfg: AgentConfig, agent: dict[str, Any]) -> list[Result]:
    api = cfg.api
    if not api.enabled:
        return [Result("api-port", "ok", "the scoring API is disabled (api.enabled = false)")]
    if agent["running"]:
        run = agent["run"] or {}
        if run.get("api"):
            return [
                Result("api-port", "ok", f"the running agent (pid {run.get('pid')}) serves on {run['api']}")
            ]
        return [
            Result(
                "api-port",
                "warn",
                f"the running agent (pid {run.get('pid')}) reports no scoring API address",
                "see the agent's log (api.*); it may still be starting",
            )
        ]
    listen = api.listen
    if listen.startswith("unix:"):
        path = Path(listen[5:])
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                try:
                    s.connect(str(path))
                except OSError:
                    pass  # a socket file left behind: the agent replaces it
                else:
                    return [
                        Result(
                            "api-port",
                            "warn",
                            f"another process listens on {path}; the agent would take the path over",
                            "stop that process, or set api.listen to another path",
                        )
                    ]
        return [Result("api-port", "ok", f"{listen}: free (no agent running)")]
    host, _, port_s = listen.rpartition(":")
    host, port = host.strip("[]"), int(port_s)
    if port == 0:
        return [Result("api-port", "ok", f"{listen}: the agent picks a free port when it starts")]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # the same options as the agent's bind (agent/serving/api.py): a port in TIME_WAIT is not "taken"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return [
                    Result(
                        "api-port",
                        "fail",
                        f"{listen} is taken by {_port_owner(port)} and no agent is running: the agent could "
                        "not serve",
                        "stop that process, or set api.listen to a free port",
                    )
                ]
            if exc.errno == errno.EADDRNOTAVAIL:
                return [
                    Result(
                        "api-port",
                        "fail",
                        f"{listen}: {host} is not an address of this host",
                        "set api.listen to an address of this host (127.0.0.1: local applications only)",
                    )
                ]
            if exc.errno == errno.EACCES:
                return [
                    Result(
                        "api-port",
                        "fail",
                        f"{listen}: {status_mod.current_user()} may not bind ports below 1024",
                        "use a port >= 1024, or give the service CAP_NET_BIND_SERVICE",
                    )
                ]
            return [Result("api-port", "fail", f"cannot bind {listen}: {exc.strerror}", "fix api.listen")]
    return [Result("api-port", "ok", f"{listen} is free to bind (no agent running)")]
