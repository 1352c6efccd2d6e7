"""score.py workers (agent/serving/worker.py, worker_process.py, worker_protocol.py, worker_child.py) and
per-image environments (agent/serving/pyenv.py).

Everything here runs real processes: the scoring scripts are small files written into a temporary
image directory laid out like the store's ``images/<sha256>/``.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from agent.serving.pyenv import ensure_image_env, remove_image_env
from agent.serving.worker import WorkerPool
from edge_core.errors import (
    ErrorCode,
    ImageEnvError,
    ScoreBadInput,
    ScoreFailed,
    ScoreInitFailed,
    ScoreTimeout,
    ScoringError,
    WorkerUnavailable,
)

REPO = Path(__file__).resolve().parent.parent
SHA = "ab" * 32


def make_image(root: Path, score: str, *, files: dict[str, str] | None = None, sha: str = SHA) -> Path:
    image = root / "images" / sha
    (image / "models").mkdir(parents=True)
    (image / "models" / "label.txt").write_text("cat\n")
    (image / "score.py").write_text(textwrap.dedent(score))
    for name, text in (files or {}).items():
        (image / name).write_text(textwrap.dedent(text))
    (image / "bundle.json").write_text(
        json.dumps({"format": 1, "name": "t", "version": "1", "entry_script": "score.py"})
    )
    return image


@pytest.fixture
def pools() -> Iterator[Callable[..., WorkerPool]]:
    """Start pools that are stopped at teardown even when the test fails."""
    made: list[WorkerPool] = []

    def start(image: Path, **kw: object) -> WorkerPool:
        pool = WorkerPool(image, **kw)  # type: ignore[arg-type]
        made.append(pool)
        pool.start()
        return pool

    yield start
    for pool in made:
        pool.stop()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # reparented, not reaped: dead
    except psutil.NoSuchProcess:
        return True


def worker_children() -> list[psutil.Process]:
    return [
        p for p in psutil.Process().children(recursive=True) if "worker_child.py" in " ".join(p.cmdline())
    ]


SCORE = """
    import json, os, time
    import numpy as np
    import helper

    def init():
        global label, cwd
        with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "label.txt")) as f:
            label = f.read().strip()
        cwd = os.getcwd()
        print("init: loaded", label)

    class Response:  # what Azure ML's AMLResponse looks like from the outside
        status_code = 418
        headers = {"Content-Type": "text/plain"}
        def get_data(self):
            return b"short and stout"

    def run(raw_data):
        req = json.loads(raw_data)
        op = req.get("op")
        if op == "dict":
            return {"label": label, "cwd": cwd, "helper": helper.NAME, "pid": os.getpid()}
        if op == "str":
            return json.dumps({"label": label})
        if op == "numpy":
            return {"array": np.arange(3, dtype=np.float32) * 1.5, "scalar": np.int64(7)}
        if op == "none":
            return None
        if op == "response":
            return Response()
        if op == "raise":
            raise ValueError("cannot score " + label)
        if op == "sleep":
            time.sleep(req["s"])
            return {"slept": req["s"], "pid": os.getpid()}
        if op == "exit":
            os._exit(3)
        if op == "segfault":
            import ctypes
            ctypes.string_at(0)
        return {"echo": req, "pid": os.getpid()}
"""
HELPER = {"helper.py": "NAME = 'helper from the image root'\n"}


def test_init_once_then_run_returns_what_azure_ml_would(
    tmp_path: Path, pools: Callable[..., WorkerPool]
) -> None:
    image = make_image(tmp_path, SCORE, files=HELPER)
    pool = pools(image)
    assert pool.alive() == 1
    got = json.loads(pool.run(b'{"op": "dict"}'))
    assert got["label"] == "cat"  # init() read it from AZUREML_MODEL_DIR
    assert got["cwd"] == str(image)
    assert got["helper"] == "helper from the image root"
    # Azure ML json.dumps()es every result, a str included: a script returning json.dumps(x)
    # answers a JSON string there, and so it does here.
    assert pool.run(b'{"op": "str"}') == json.dumps(json.dumps({"label": "cat"})).encode()
    assert json.loads(pool.run(b'{"op": "numpy"}')) == {"array": [0.0, 1.5, 3.0], "scalar": 7}
    assert pool.run(b'{"op": "none"}') == b"{}"
    resp = pool.score(b'{"op": "response"}')
    assert (resp.status, resp.content_type, resp.body) == (418, "text/plain", b"short and stout")
    assert json.loads(pool.run('{"text": "h\u00e9"}'.encode()))["echo"] == {"text": "h\u00e9"}
    # init() ran once: the same process served everything
    assert json.loads(pool.run(b'{"op": "dict"}'))["pid"] == got["pid"]
    s = pool.stats()
    assert (s.requests, s.errors, s.restarts, s.alive) == (7, 0, 0, 1)


def test_large_requests_and_responses_pass_through(tmp_path: Path, pools: Callable[..., WorkerPool]) -> None:
    score = """
        def run(raw_data):
            return raw_data * 3
    """
    pool = pools(make_image(tmp_path, score), timeout_s=10.0)
    body = b"0123456789" * 500_000  # 5 MB in, 15 MB (plus quotes) out: many pipe buffers each way
    assert pool.run(body) == b'"' + body * 3 + b'"'


def test_the_child_imports_only_the_standard_library() -> None:
    """It may run under an image's interpreter that cannot import the agent or its dependencies."""
    tree = ast.parse((REPO / "agent" / "serving" / "worker_child.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - {"__future__"} <= sys.stdlib_module_names


def test_run_raising_is_500_and_the_worker_keeps_serving(
    tmp_path: Path, pools: Callable[..., WorkerPool]
) -> None:
    pool = pools(make_image(tmp_path, SCORE, files=HELPER))
    pid = json.loads(pool.run(b"{}"))["pid"]
    with pytest.raises(ScoreFailed) as e:
        pool.run(b'{"op": "raise"}')
    assert e.value.http_status == 500
    assert e.value.code == ErrorCode.SCORE_FAILED
    assert "ValueError: cannot score cat" in e.value.message
    assert e.value.traceback is not None and 'score.py", line' in e.value.traceback
    assert "worker_child.py" not in e.value.traceback  # the user's frames only
    with pytest.raises(ScoreBadInput) as bad:
        pool.run(b"\xff\xfe not utf-8")
    assert bad.value.http_status == 400
    assert json.loads(pool.run(b"{}"))["pid"] == pid
    assert pool.stats().errors == 2 and pool.stats().restarts == 0


def test_a_hang_is_504_after_the_timeout_and_a_new_worker_serves(
    tmp_path: Path, pools: Callable[..., WorkerPool]
) -> None:
    pool = pools(make_image(tmp_path, SCORE, files=HELPER), timeout_s=0.5)
    pid = json.loads(pool.run(b"{}"))["pid"]
    t0 = time.monotonic()
    with pytest.raises(ScoreTimeout) as e:
        pool.run(b'{"op": "sleep", "s": 60}')
    assert 0.5 <= time.monotonic() - t0 < 1.5
    assert e.value.http_status == 504
    assert gone(pid)  # SIGKILLed and reaped before the 504 went out
    wait_until(lambda: pool.alive() == 1)
    got = json.loads(pool.run(b"{}"))
    assert got["pid"] != pid
    s = pool.stats()
    assert (s.timeouts, s.restarts) == (1, 1)


@pytest.mark.parametrize(("op", "how"), [("exit", "exit code 3"), ("segfault", "SIGSEGV")])
def test_a_worker_that_dies_is_503_until_it_is_replaced(
    tmp_path: Path, pools: Callable[..., WorkerPool], op: str, how: str
) -> None:
    pool = pools(make_image(tmp_path, SCORE, files=HELPER))
    pid = json.loads(pool.run(b"{}"))["pid"]
    with pytest.raises(WorkerUnavailable) as e:
        pool.run(json.dumps({"op": op}).encode())
    assert e.value.http_status == 503
    assert how in e.value.message
    wait_until(lambda: pool.alive() == 1)
    assert json.loads(pool.run(b"{}"))["pid"] != pid
    assert pool.stats().crashes == 1


def test_no_live_worker_answers_503_at_once(tmp_path: Path, pools: Callable[..., WorkerPool]) -> None:
    """While the only worker restarts (here: its init takes a while), requests are not queued."""
    score = """
        import os, time
        def init():
            if os.path.exists("started-once"):
                time.sleep(1.0)
            open("started-once", "w").close()
        def run(raw_data):
            os._exit(1)
    """
    pool = pools(make_image(tmp_path, score))
    with pytest.raises(WorkerUnavailable):
        pool.run(b"{}")
    t0 = time.monotonic()
    with pytest.raises(WorkerUnavailable) as e:
        pool.run(b"{}")
    assert time.monotonic() - t0 < 0.2
    assert "starting" in e.value.message


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        (
            "raise RuntimeError('no model in ' + os.environ['AZUREML_MODEL_DIR'])",
            "RuntimeError: no model in ",
        ),
        ("time.sleep(60)", "did not finish within 0.5 s"),
        ("os._exit(9)", "exit code 9"),
    ],
)
def test_init_failure_fails_start_with_the_traceback(tmp_path: Path, init: str, expected: str) -> None:
    image = make_image(
        tmp_path, f"import os, time\ndef init():\n    {init}\ndef run(raw_data):\n    return 1\n"
    )
    pool = WorkerPool(image, init_timeout_s=0.5, size=2)
    with pytest.raises(ScoreInitFailed) as e:
        pool.start()
    assert e.value.code == ErrorCode.SCORE_INIT_FAILED
    assert expected in e.value.message
    if "raise" in init:
        assert 'score.py", line 3, in init' in e.value.message
    assert worker_children() == []
    with pytest.raises(WorkerUnavailable):
        pool.run(b"{}")


def test_a_crash_loop_in_init_backs_off(tmp_path: Path, pools: Callable[..., WorkerPool]) -> None:
    score = """
        import os
        def init():
            if os.path.exists("started-once"):
                raise RuntimeError("broken on restart")
            open("started-once", "w").close()
        def run(raw_data):
            os._exit(1)
    """
    pool = pools(make_image(tmp_path, score))
    with pytest.raises(WorkerUnavailable):
        pool.run(b"{}")
    time.sleep(2.0)
    # immediate, +0.5 s, +1 s, then 2 s later: not hundreds of restarts
    assert 2 <= pool.stats().restarts <= 4
    assert pool.alive() == 0


def test_print_and_stdio_in_score_py_do_not_break_the_protocol(
    tmp_path: Path, pools: Callable[..., WorkerPool], caplog: pytest.LogCaptureFixture
) -> None:
    score = """
        import os, subprocess, sys
        def init():
            print("x" * 100000)                      # larger than a pipe buffer
            sys.stdout.write("no newline")
        def run(raw_data):
            print("printed in run", raw_data)
            os.write(1, b"raw fd 1\\n")                # native code writes to fd 1 directly
            subprocess.run(["echo", "from a subprocess"], check=True)
            sys.stderr.write("to stderr\\n")
            return {"stdin": sys.stdin.read(), "got": raw_data}
    """
    with caplog.at_level(logging.INFO, logger="edge"):
        pool = pools(make_image(tmp_path, score))
        for i in range(3):
            assert json.loads(pool.run(json.dumps({"i": i}).encode())) == {
                "stdin": "",
                "got": json.dumps({"i": i}),
            }
        pool.stop()
    lines = [
        getattr(r, "fields", {}).get("line") for r in caplog.records if r.getMessage() == "worker.output"
    ]
    for expected in ('printed in run {"i": 2}', "raw fd 1", "from a subprocess", "to stderr"):
        assert expected in lines


def test_concurrent_requests_share_the_workers(tmp_path: Path, pools: Callable[..., WorkerPool]) -> None:
    pool = pools(make_image(tmp_path, SCORE, files=HELPER), size=2, timeout_s=5.0)
    results: list[dict[str, object]] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(json.loads(pool.run(b'{"op": "sleep", "s": 0.2}')))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    assert not errors
    assert len(results) == 8
    assert len({r["pid"] for r in results}) == 2
    assert 0.8 <= elapsed < 1.5  # 8 x 0.2 s on two workers; one worker would take 1.6 s


def test_waiting_for_a_busy_worker_is_bounded(tmp_path: Path, pools: Callable[..., WorkerPool]) -> None:
    pool = pools(make_image(tmp_path, SCORE, files=HELPER), size=1, timeout_s=0.5)
    outcomes: list[str] = []

    def call() -> None:
        try:
            pool.run(b'{"op": "sleep", "s": 0.3}')
            outcomes.append("ok")
        except ScoringError as exc:
            outcomes.append(f"{exc.http_status} {exc.message}")

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") >= 2
    assert any(o.startswith("503") and "busy" in o for o in outcomes)
    assert pool.alive() == 1  # waiting too long is not the worker's fault


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    score = """
        import json, subprocess, time
        def init():
            global child
            child = subprocess.Popen(["sleep", "60"])  # the user's own subprocess
        def run(raw_data):
            time.sleep(json.loads(raw_data)["s"])
            return child.pid
    """
    pool = WorkerPool(make_image(tmp_path, score), size=2, timeout_s=30.0)
    pool.start()
    workers = pool.pids()
    grandchild = json.loads(pool.run(b'{"s": 0}'))
    in_flight: list[BaseException] = []

    def call() -> None:
        try:
            pool.run(b'{"s": 30}')
        except BaseException as exc:
            in_flight.append(exc)

    busy = threading.Thread(target=call)
    busy.start()
    wait_until(lambda: pool.stats().requests == 2)
    time.sleep(0.1)
    t0 = time.monotonic()
    pool.stop()
    busy.join()
    assert time.monotonic() - t0 < 3.0
    assert len(in_flight) == 1 and isinstance(in_flight[0], WorkerUnavailable)
    assert len(workers) == 2 and all(gone(pid) for pid in workers)
    assert gone(grandchild)
    assert worker_children() == []
    with pytest.raises(WorkerUnavailable):
        pool.run(b'{"s": 0}')
    pool.stop()  # idempotent


AGENT = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from agent.serving.worker import WorkerPool
from edge_core.errors import WorkerUnavailable
pool = WorkerPool(Path({image!r}), size=2)
pool.start()
first = pool.pids()
try:
    pool.run(b'{{"op": "exit"}}')  # one worker dies and is respawned by the pool's threads
except WorkerUnavailable:
    pass
while pool.alive() < 2:
    time.sleep(0.02)
print(json.dumps(sorted(set(first) | set(pool.pids()))), flush=True)
time.sleep(60)
"""


def test_workers_die_with_the_agent_even_on_sigkill(tmp_path: Path) -> None:
    image = make_image(tmp_path, SCORE, files=HELPER)
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT.format(repo=str(REPO), image=str(image))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        pids = json.loads(agent.stdout.readline())
        assert len(pids) == 3  # two started, one of them died and was replaced
        assert sum(1 for p in pids if not gone(p)) == 2
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    wait_until(lambda: all(gone(p) for p in pids), timeout=5.0)


# --- per-image environments -------------------------------------------------------------------


def build_wheel(directory: Path, dist: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel, by hand (a zip with the dist-info pip needs): no network, no build tools."""
    info = f"{dist}-{version}.dist-info"
    members = {name: text.encode() for name, text in files.items()}
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    members[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )

    def digest(data: bytes) -> str:
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{n},{digest(d)},{len(d)}\n" for n, d in members.items()) + f"{info}/RECORD,,\n"
    members[f"{info}/RECORD"] = record.encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_an_image_env_has_the_image_wheels_first_and_the_agent_packages(
    tmp_path: Path, pools: Callable[..., WorkerPool]
) -> None:
    score = """
        import sys
        import edge_hello, iniconfig, numpy
        def run(raw_data):
            return {"hello": edge_hello.GREETING, "shadowed": getattr(iniconfig, "SHADOW", False),
                    "numpy": numpy.__version__, "python": sys.executable}
    """
    image = make_image(tmp_path, score)
    build_wheel(image / "wheels", "edge_hello", "1.0", {"edge_hello/__init__.py": "GREETING = 'hi'\n"})
    # iniconfig is installed in the agent's environment too (pytest needs it): the image's wins
    build_wheel(image / "wheels", "iniconfig", "99.0", {"iniconfig/__init__.py": "SHADOW = True\n"})
    wheels = ["wheels/edge_hello-1.0-py3-none-any.whl", "wheels/iniconfig-99.0-py3-none-any.whl"]
    envs = tmp_path / "envs"
    python = ensure_image_env(image, envs, wheels, fsync=False)
    assert python == str(envs / SHA / "bin" / "python")
    marker = envs / SHA / "edge-env.json"
    built = marker.stat().st_mtime_ns
    assert ensure_image_env(image, envs, wheels, fsync=False) == python  # idempotent: no rebuild
    assert marker.stat().st_mtime_ns == built
    import iniconfig as agents_iniconfig  # the agent itself still has its own

    assert not hasattr(agents_iniconfig, "SHADOW")

    got = json.loads(pools(image, python=python).run(b"{}"))
    import numpy

    assert got == {"hello": "hi", "shadowed": True, "numpy": numpy.__version__, "python": python}
    assert sorted(p.name for p in envs.iterdir()) == [".lock", SHA]
    assert remove_image_env(envs, SHA) is True
    assert sorted(p.name for p in envs.iterdir()) == [".lock"]
    assert remove_image_env(envs, SHA) is False


def test_an_image_without_wheels_runs_in_the_agent_env(tmp_path: Path) -> None:
    image = make_image(tmp_path, SCORE)
    assert ensure_image_env(image, tmp_path / "envs", []) == sys.executable
    assert not (tmp_path / "envs").exists()


def test_a_corrupt_wheel_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    image = make_image(tmp_path, SCORE)
    (image / "wheels").mkdir()
    (image / "wheels" / "broken-1.0-py3-none-any.whl").write_bytes(b"this is not a zip file")
    envs = tmp_path / "envs"
    with pytest.raises(ImageEnvError) as e:
        ensure_image_env(image, envs, ["wheels/broken-1.0-py3-none-any.whl"], fsync=False)
    assert e.value.code == ErrorCode.IMAGE_ENV_FAILED
    assert "installing the image's wheels failed" in e.value.message
    assert "broken-1.0-py3-none-any.whl" in e.value.message  # pip's own words are in the message
    assert sorted(p.name for p in envs.iterdir()) == [".lock"]


@pytest.mark.parametrize(
    "wheel",
    ["../outside-1.0-py3-none-any.whl", "/etc/passwd", "wheels/missing-1.0-py3-none-any.whl", "score.py"],
)
def test_listed_wheels_must_be_wheel_files_in_the_image(tmp_path: Path, wheel: str) -> None:
    image = make_image(tmp_path, SCORE)
    (tmp_path / "images" / "outside-1.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(ImageEnvError):
        ensure_image_env(image, tmp_path / "envs", [wheel], fsync=False)


def test_requests_are_served_first_come_first_served(
    tmp_path: Path, pools: Callable[..., WorkerPool]
) -> None:
    """With more callers than workers, a thread that just got an answer cannot take the worker back
    ahead of callers already waiting: every caller gets a fair share, none waits for seconds."""
    pool = pools(make_image(tmp_path, "def run(raw):\n    return raw\n"), size=1, timeout_s=10)
    counts = [0] * 4
    stop = threading.Event()

    def caller(i: int) -> None:
        while not stop.is_set():
            pool.run(b'"x"')
            counts[i] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert min(counts) > 0.5 * max(counts), counts  # unfair hand-off gave shares like 977 / 15012


RAW_SCORE = """
    from azureml.contrib.services import aml_request
    from azureml.contrib.services.aml_request import rawhttp
    from azureml.contrib.services.aml_response import AMLResponse

    def init():
        pass

    @rawhttp
    def run(request):
        body = {"module": aml_request.__file__, "method": request.method, "args": request.args.to_dict(),
                "header": request.headers.get("x-thing"), "data": request.get_data(as_text=True)}
        import json
        return AMLResponse(json.dumps(body), 207, {"Content-Type": "application/json", "X-Two": "a, b"})
"""


def test_rawhttp_gets_the_request_from_the_agents_azureml_modules(
    tmp_path: Path, pools: Callable[..., WorkerPool]
) -> None:
    """Without Azure's packages, ``azureml.contrib.services`` is the agent's (standard library only)."""
    from agent.serving.worker_protocol import HttpRequest

    pool = pools(make_image(tmp_path, RAW_SCORE))
    assert pool.mode == "rawhttp"
    req = HttpRequest("PATCH", "/score", "a=1&a=2", (("x-thing", "yes"),), b"\xc3\xa9")
    res = pool.score(req)
    doc = json.loads(res.body)
    assert res.status == 207 and res.content_type == "application/json"
    assert doc["module"].endswith("agent/serving/azureml_shim/azureml/contrib/services/aml_request.py")
    assert doc == {**doc, "method": "PATCH", "args": {"a": "1"}, "header": "yes", "data": "\u00e9"}
    assert [v for k, v in res.headers if k == "X-Two"] == ["a", "b"]
    assert ("x-ms-run-function-failed", "False") in res.headers


def test_an_image_that_ships_azureml_contrib_services_gets_its_own(
    tmp_path: Path, pools: Callable[..., WorkerPool]
) -> None:
    """The agent's modules come last on sys.path, as namespace portions: the image's own package wins
    (here at the image's root; a wheel's site-packages comes before the agent's modules too)."""
    own = """
        _rawHttpRequested = False
        def rawhttp(func):
            global _rawHttpRequested
            _rawHttpRequested = True
            return func
    """
    score = RAW_SCORE.replace("from azureml.contrib.services.aml_response import AMLResponse", "")
    score = score[: score.index("        import json")] + "        return body\n"
    files = {"azureml/contrib/services/aml_request.py": own}
    files |= {f"{d}/__init__.py": "" for d in ("azureml", "azureml/contrib", "azureml/contrib/services")}
    image = make_image(tmp_path, score)
    for name, text in files.items():
        (image / name).parent.mkdir(parents=True, exist_ok=True)
        (image / name).write_text(textwrap.dedent(text))
    pool = pools(image)
    assert pool.mode == "rawhttp"  # its rawhttp's flag is the one read
    doc = json.loads(pool.run(b"{}"))
    assert doc["module"] == str(image / "azureml" / "contrib" / "services" / "aml_request.py")
    assert doc["method"] == "POST"  # and run() still gets the agent's request object
