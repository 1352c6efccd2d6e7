"""Per-image Python environments: the wheels an image ships, installed offline, for its score.py workers.

Layout under ``envs_root``::

    <sha256>/              a virtual environment (``bin/python``), complete: it appears only by rename
    <sha256>/edge-env.json what it was built from; written last, checked on every use
    .tmp-<sha256>-<hex>/   a build in progress (removed by the next build: it was never an env)
    .lock                  serialises builds and removals (flock), across threads and processes

How an environment is made, and why:

- ``python -m venv --without-pip``: tens of milliseconds, and no copy of pip per image. The base is
  the agent's own interpreter, so the agent's compiled packages (numpy, onnxruntime) are ABI-
  compatible with it.
- The agent's pip installs into it with ``pip --python <env>/bin/python install``: pip runs under
  the env's interpreter, so it uses that env's install scheme (``--prefix``/``--target`` would use
  the agent's, which Debian patches to ``local/.../dist-packages``) and sees only what is installed
  there (``--prefix`` would skip a wheel whose version the agent already has).
- Offline, always: ``--isolated`` (no pip.conf or ``PIP_*`` variables can add an index),
  ``--no-index``, ``--find-links <image>/wheels``, ``--disable-pip-version-check`` (that check is
  a request to PyPI), ``--no-cache-dir``. Only the ``.whl`` files the bundle lists are installed,
  ``--no-deps``: a dependency is either another listed wheel or comes from the agent's environment.
- The agent's site-packages are then added with a ``.pth`` file (``site.addsitedir``, so their own
  ``.pth`` files work too). ``.pth`` entries are appended after the env's own site-packages: the
  image's wheels take precedence over the agent's packages of the same name.
- Built in ``.tmp-*``, flushed (syncfs), then renamed: a crash leaves either no environment or a
  complete one. A venv survives the rename: its interpreter finds ``pyvenv.cfg`` relative to
  itself; only the activate scripts (unused) name the old path.
- ``edge-env.json`` records the Python version and the agent's site-packages. If either changed (an
  OS upgrade of Python, the agent reinstalled elsewhere), the env is rebuilt on next use.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import secrets
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from edge_core.errors import ImageEnvError
from edge_core.fsutil import fsync_dir
from edge_core.log import get_logger

log = get_logger("pyenv")

MARKER = "edge-env.json"
PTH_NAME = "_edge_agent_site.pth"
PIP_TIMEOUT_S = 600.0
OUTPUT_TAIL_CHARS = 3000
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


def env_dir(envs_root: Path, sha256: str) -> Path:
    if not _SAFE_NAME.fullmatch(sha256):
        raise ValueError(f"not an image digest: {sha256!r}")
    return envs_root / sha256


def env_python(envs_root: Path, sha256: str) -> Path:
    return env_dir(envs_root, sha256) / "bin" / "python"


def ensure_image_env(image_dir: Path, envs_root: Path, wheels: list[str], *, fsync: bool = True) -> str:
    """The interpreter to run ``image_dir``'s workers with: the agent's own when the image ships no
    wheels, else its environment's (built now if it is missing or stale). Idempotent and safe to
    call from several threads or processes at once. Raises :class:`ImageEnvError`."""
    if not wheels:
        return sys.executable
    sha256 = image_dir.name
    final = env_dir(envs_root, sha256)
    wanted = _wanted_marker(wheels)
    python = final / "bin" / "python"
    if _marker_matches(final, wanted) and python.exists():
        return str(python)  # the common case, without taking the lock
    wheel_paths = _check_wheels(image_dir, wheels)
    envs_root.mkdir(parents=True, exist_ok=True)
    with _locked(envs_root):
        if _marker_matches(final, wanted) and python.exists():
            return str(python)  # built by someone else while we waited
        _clean_leftovers(envs_root)
        if final.exists():
            log.info("pyenv.stale", image=sha256[:12])
            _remove(envs_root, final)
        tmp = envs_root / f".tmp-{sha256}-{secrets.token_hex(4)}"
        t0 = time.monotonic()
        try:
            _build(tmp, image_dir, wheel_paths, wanted)
            if fsync:
                _sync_fs(tmp)
            os.rename(tmp, final)
            if fsync:
                fsync_dir(envs_root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info(
        "pyenv.built",
        image=sha256[:12],
        wheels=[Path(w).name for w in wheels],
        seconds=round(time.monotonic() - t0, 3),
    )
    return str(python)


def remove_image_env(envs_root: Path, sha256: str) -> bool:
    """Delete an image's environment (garbage collection); False if there was none."""
    final = env_dir(envs_root, sha256)
    if not envs_root.is_dir():
        return False
    with _locked(envs_root):
        if not final.exists():
            return False
        _remove(envs_root, final)
    log.info("pyenv.removed", image=sha256[:12])
    return True


# --- building ----------------------------------------------------------------------------------


def _agent_site_dirs() -> list[str]:
    """The agent's own package directories, in its own order of precedence."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _wanted_marker(wheels: list[str]) -> dict[str, Any]:
    return {
        "format": 1,
        "python": list(sys.version_info[:3]),
        "implementation": sys.implementation.cache_tag,
        "agent_site": _agent_site_dirs(),
        "wheels": sorted(wheels),
    }


def _marker_matches(final: Path, wanted: dict[str, Any]) -> bool:
    try:
        have = json.loads((final / MARKER).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(have, dict) and all(have.get(k) == v for k, v in wanted.items())


def _check_wheels(image_dir: Path, wheels: list[str]) -> list[Path]:
    """Each listed wheel must be a ``.whl`` file inside the image (bundle.json is the image
    author's, but a path out of the image must not reach pip)."""
    root = image_dir.resolve()
    out = []
    for w in wheels:
        if not isinstance(w, str):
            raise ImageEnvError(f"bundle.json lists {w!r} as a wheel: not a path")
        rel = PurePosixPath(w)
        if rel.is_absolute() or ".." in rel.parts or not w.endswith(".whl"):
            raise ImageEnvError(f"bundle.json lists {w!r}: wheels must be relative paths to .whl files")
        path = (image_dir / rel).resolve()
        if root not in path.parents or not path.is_file():
            raise ImageEnvError(f"bundle.json lists {w!r}, which is not a file in the image")
        out.append(path)
    return out


def _build(tmp: Path, image_dir: Path, wheel_paths: list[Path], marker: dict[str, Any]) -> None:
    _run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], "creating the virtual environment")
    tmp_python = tmp / "bin" / "python"
    _run(
        [
            sys.executable, "-m", "pip", "--isolated", "--python", str(tmp_python),
            "install", "--no-index", "--find-links", str(image_dir / "wheels"), "--no-deps",
            "--no-cache-dir", "--disable-pip-version-check", "--no-input", "--no-warn-script-location",
            *map(str, wheel_paths),
        ],
        "installing the image's wheels",
    )  # fmt: skip
    purelib = Path(
        sysconfig.get_path("purelib", scheme="venv", vars={"base": str(tmp), "platbase": str(tmp)})
    )
    lines = []
    for d in marker["agent_site"]:
        if "\n" in d or "\r" in d:
            continue
        lines.append(f"import site; site.addsitedir({d!r})\n")
    (purelib / PTH_NAME).write_text("".join(lines))
    # Written last: an env whose marker is complete is complete.
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _run(cmd: list[str], what: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ImageEnvError(f"{what} took more than {PIP_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise ImageEnvError(f"{what} failed: {exc}") from None
    if proc.returncode != 0:
        out = proc.stdout.decode("utf-8", "replace").strip()
        hint = ""
        if "No module named pip" in out:
            hint = "images with wheels need pip in the agent's Python (Debian: apt-get install python3-pip)"
        elif "no such option: --python" in out:
            hint = "the agent's pip is older than 22.3; upgrade it"
        raise ImageEnvError(f"{what} failed (exit code {proc.returncode}):\n{out[-OUTPUT_TAIL_CHARS:]}", hint)


# --- filesystem ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(envs_root: Path) -> Iterator[None]:
    fd = os.open(envs_root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _clean_leftovers(envs_root: Path) -> None:
    """Builds and removals a crash interrupted; we hold the lock, so none of them is in progress."""
    for p in envs_root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)


def _remove(envs_root: Path, final: Path) -> None:
    # Renamed away first, so a crash half-way through never leaves a half-deleted env under its name.
    trash = envs_root / f".trash-{final.name}-{secrets.token_hex(4)}"
    os.rename(final, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _sync_fs(path: Path) -> None:
    """Flush everything written under ``path`` before it is renamed into place. syncfs is one call
    for the whole filesystem, where an fsync per file of a large wheel would take minutes."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syncfs(fd) == 0:
                return
        os.sync()
    finally:
        os.close(fd)
