"""``edge-deploy image build``: real ONNX models (made with onnx.helper) built into image bundles
through the CLI (as a process and in-process) and the Python API; signatures, digests,
reproducibility, layout, refusals, and the agent's store installing the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.update.store import BundleStore
from deploy import bundle, cli
from edge_core.errors import BuildError
from edge_core.fsutil import hash_file

ROOT = Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(7)
W1 = RNG.standard_normal((4, 8)).astype(np.float32)
B1 = RNG.standard_normal(8).astype(np.float32)
W2 = RNG.standard_normal((8, 3)).astype(np.float32)
B2 = RNG.standard_normal(3).astype(np.float32)
SAMPLE = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loadable by any onnxruntime >= 1.17 (the runtime dependency's floor)
    onnx.save(model, str(path))
    return path


def make_mlp(path: Path) -> Path:
    """input [batch, 4] -> MatMul+Add+Relu -> MatMul+Add -> probs [batch, 3] and label [batch]."""
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "B2"], ["probs"]),
        helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        [numpy_helper.from_array(a, n) for a, n in ((W1, "W1"), (B1, "B1"), (W2, "W2"), (B2, "B2"))],
    )
    return _save(graph, path)


def mlp_forward(x: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    h = np.maximum(np.asarray(x, dtype=np.float32) @ W1 + B1, 0)
    probs = h @ W2 + B2
    return probs, probs.argmax(axis=1)


def make_pair(path: Path) -> Path:
    """Two inputs with a dynamic batch (one symbolic, one unknown): a [batch, 3] + b [?, 3]; and a
    sequence output, which the v2 protocol cannot carry."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("SequenceConstruct", ["sum"], ["parts"]),
        ],
        "pair",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 3]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, None),
        ],
    )
    return _save(graph, path)


def make_wheel(directory: Path, filename: str) -> Path:
    path = directory / filename
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/__init__.py", "")
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("src")
    make_mlp(d / "mlp.onnx")
    make_pair(d / "pair.onnx")
    (d / "score.py").write_text(
        "import helper\n\ndef init():\n    pass\n\ndef run(data):\n    return helper.answer(data)\n"
    )
    (d / "helper.py").write_text("def answer(data):\n    return {'label': [0]}\n")
    make_wheel(d, "foo-1.0-py3-none-any.whl")
    make_wheel(d, "bar_baz-2.1-py3-none-any.whl")
    probs, label = mlp_forward(SAMPLE)
    request = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": SAMPLE}]}
    expected = {
        "outputs": [
            {"name": "probs", "datatype": "FP32", "shape": [2, 3], "data": probs.ravel().tolist()},
            {"name": "label", "datatype": "INT64", "shape": [2], "data": label.tolist()},
        ]
    }
    (d / "v2-request.json").write_text(json.dumps(request))
    (d / "v2-expected.json").write_text(json.dumps(expected))
    (d / "score-request.json").write_text(json.dumps({"data": SAMPLE}))
    (d / "score-expected.json").write_text(json.dumps({"label": [0]}))
    return d


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "r:") as tar:
        return tar.getmembers()


MLP_SIGNATURE = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [
        {"name": "probs", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ],
}


def test_cli_builds_a_full_image_and_inspects_it(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "iris-3.tar"
    r = run_cli(
        "image", "build", "--name", "iris", "--version", "3",
        "--model", f"iris={src / 'mlp.onnx'}", "--model", str(src / "pair.onnx"),
        "--score", str(src / "score.py"), "--include", str(src / "helper.py"),
        "--wheel", str(src / "foo-1.0-py3-none-any.whl"),
        "--tag", "team=vision", "--tag", "stage=canary",
        "--sample-request", str(src / "score-request.json"),
        "--expected-response", str(src / "score-expected.json"),
        "--smoke-model", "iris", "--rtol", "0.001",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed == {"path": str(out), "sha256": hash_file(out), "size": out.stat().st_size}

    # Layout: bundle.json first, then the files sorted; every member normalised.
    infos = members(out)
    assert [m.name for m in infos] == [
        "bundle.json",
        "helper.py",
        "models/iris.onnx",
        "models/pair.onnx",
        "score.py",
        "wheels/foo-1.0-py3-none-any.whl",
    ]
    assert all(m.isreg() and m.mode == 0o644 and m.mtime == 0 and m.uid == m.gid == 0 for m in infos)

    meta = bundle.read_metadata(out)
    assert meta == {
        "format": 1,
        "name": "iris",
        "version": "3",
        "tags": {"stage": "canary", "team": "vision"},
        "entry_script": "score.py",
        "models": [
            {
                "name": "iris",
                "file": "models/iris.onnx",
                "sha256": hash_file(src / "mlp.onnx"),
                **MLP_SIGNATURE,
            },
            {
                "name": "pair",
                "file": "models/pair.onnx",
                "sha256": hash_file(src / "pair.onnx"),
                "inputs": [
                    {"name": "a", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "b", "datatype": "FP32", "shape": [-1, 3]},
                ],
                "outputs": [
                    {"name": "sum", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "parts", "datatype": None, "shape": None, "onnx_type": "seq(tensor(float))"},
                ],
            },
        ],
        "wheels": ["wheels/foo-1.0-py3-none-any.whl"],
        "files": {
            arc: {"sha256": hash_file(p), "size": p.stat().st_size}
            for arc, p in {
                "helper.py": src / "helper.py",
                "models/iris.onnx": src / "mlp.onnx",
                "models/pair.onnx": src / "pair.onnx",
                "score.py": src / "score.py",
                "wheels/foo-1.0-py3-none-any.whl": src / "foo-1.0-py3-none-any.whl",
            }.items()
        },
        "smoke_test": {
            "model": "iris",
            "request": {"data": SAMPLE},
            "expected": {"label": [0]},
            "rtol": 0.001,
            "atol": 1e-6,
        },
    }

    shown = run_cli("image", "inspect", str(out))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == meta

    # The agent's store unpacks it and every file is there with its recorded digest.
    store = BundleStore(tmp_path / "store", fsync=False)
    image = store.install(printed["sha256"], out, "iris", "3")
    for arc, entry in meta["files"].items():
        assert hash_file(image / arc) == entry["sha256"]
    assert json.loads((image / "bundle.json").read_text()) == meta


def test_v2_smoke_test_is_run_at_build_time_and_recorded(src: Path, tmp_path: Path) -> None:
    request = json.loads((src / "v2-request.json").read_text())
    expected = json.loads((src / "v2-expected.json").read_text())
    built = bundle.build_image(
        tmp_path / "b.tar",
        "iris",
        "3",
        {"iris": src / "mlp.onnx"},
        smoke_test=bundle.SmokeTest(request, expected),
    )
    assert built.sha256 == hash_file(built.path) and built.size == built.path.stat().st_size
    meta = bundle.read_metadata(built.path)
    assert meta["entry_script"] is None and meta["wheels"] == [] and meta["tags"] == {}
    assert meta["smoke_test"] == {
        "model": "iris",
        "request": request,
        "expected": expected,
        "rtol": 1e-4,
        "atol": 1e-6,
    }
    assert [m.name for m in members(built.path)] == ["bundle.json", "models/iris.onnx"]
    BundleStore(tmp_path / "store", fsync=False).install(built.sha256, built.path, "iris", "3")

    # Outputs are matched by name: the operator may list them in any order, or only some.
    only_label = {"outputs": [expected["outputs"][1]]}
    bundle.build_image(
        tmp_path / "c.tar",
        "iris",
        "3",
        {"iris": src / "mlp.onnx"},
        smoke_test=bundle.SmokeTest(request, only_label),
    )


def test_a_smoke_test_the_model_does_not_reproduce_is_refused(src: Path, tmp_path: Path) -> None:
    expected = json.loads((src / "v2-expected.json").read_text())
    real = expected["outputs"][0]["data"][3]
    expected["outputs"][0]["data"][3] = real + 0.5
    (tmp_path / "wrong.json").write_text(json.dumps(expected))
    out = tmp_path / "never.tar"
    r = run_cli(
        "image", "build", "--name", "iris", "--version", "3", "--model", str(src / "mlp.onnx"),
        "--sample-request", str(src / "v2-request.json"), "--expected-response", str(tmp_path / "wrong.json"),
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 2
    assert "does not match what model 'mlp' answers" in r.stderr
    assert f"outputs[0].data[3]: expected {real + 0.5}, got " in r.stderr
    assert not out.exists()

    # Within the tolerance it passes; a wrong integer label never does.
    near = json.loads((src / "v2-expected.json").read_text())
    near["outputs"][0]["data"][0] += 1e-3
    smoke = bundle.SmokeTest(json.loads((src / "v2-request.json").read_text()), near, rtol=0.0, atol=1e-2)
    bundle.build_image(tmp_path / "ok.tar", "iris", "3", [("mlp", src / "mlp.onnx")], smoke_test=smoke)
    near["outputs"][1]["data"][0] += 1
    with pytest.raises(BuildError, match=r"outputs\[1\]\.data\[0\]: expected"):
        bundle.build_image(tmp_path / "no.tar", "iris", "3", [("mlp", src / "mlp.onnx")], smoke_test=smoke)


def test_builds_are_reproducible_whatever_the_order_and_file_metadata(src: Path, tmp_path: Path) -> None:
    def build(out: Path, root: Path, reverse: bool) -> bundle.Built:
        models = [("iris", root / "mlp.onnx"), ("pair", root / "pair.onnx")]
        wheels = [root / "foo-1.0-py3-none-any.whl", root / "bar_baz-2.1-py3-none-any.whl"]
        tags = {"team": "vision", "stage": "canary"}
        smoke = bundle.SmokeTest({"data": SAMPLE}, {"label": [0]}, model="iris")
        if reverse:
            models, wheels, tags = models[::-1], wheels[::-1], dict(reversed(tags.items()))
        return bundle.build_image(
            out, "iris", "3", models, score=root / "score.py", include=[root / "helper.py"],
            wheels=wheels, tags=tags, smoke_test=smoke,
        )  # fmt: skip

    a = build(tmp_path / "a.tar", src, reverse=False)
    # Another checkout: other directory, other mtimes, an executable bit, reformatted JSON inputs.
    other = tmp_path / "checkout"
    shutil.copytree(src, other)
    os.utime(other / "mlp.onnx", (1_700_000_000, 1_700_000_000))
    (other / "score.py").chmod(0o755)
    b = build(tmp_path / "b.tar", other, reverse=True)
    assert a.sha256 == b.sha256 and a.path.read_bytes() == b.path.read_bytes()

    # And the CLI, flags in yet another order, gives the same bytes.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (other / "req.json").write_text(json.dumps({"data": SAMPLE}, indent=4))
    r = run_cli(
        "image", "build", "--tag", "stage=canary", "--wheel", str(other / "bar_baz-2.1-py3-none-any.whl"),
        "--model", f"pair={other / 'pair.onnx'}", "--include", str(other / "helper.py"),
        "--name", "iris", "--version", "3", "--score", str(other / "score.py"),
        "--model", f"iris={src / 'mlp.onnx'}",
        "--wheel", str(src / "foo-1.0-py3-none-any.whl"), "--tag", "team=vision",
        "--sample-request", str(other / "req.json"), "--expected-response", str(src / "score-expected.json"),
        "--smoke-model", "iris",
        cwd=cwd,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] == a.sha256
    assert json.loads(r.stdout)["path"] == "iris-3.tar"  # --out defaults to NAME-VERSION.tar, here
    assert (cwd / "iris-3.tar").read_bytes() == a.path.read_bytes()

    # A different input is a different image.
    c = bundle.build_image(tmp_path / "c.tar", "iris", "4", {"iris": src / "mlp.onnx"})
    assert c.sha256 != a.sha256


def cli_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        rc = cli.main(list(args))
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{src}/score.py"], "model {src}/score.py: onnxruntime cannot load it as an ONNX model"),
        (["--model", "{src}/missing.onnx"], "model {src}/missing.onnx: no such file"),
        (["--model", "m={src}/mlp.onnx", "--model", "m={src}/pair.onnx"], "model name 'm' is given twice"),
        (["--model", "{src}/mlp.onnx", "--model", "{src}/mlp.onnx"], "model name 'mlp' is given twice"),
        (["--model", "{src}/.hidden.onnx"], "model name '.hidden'"),
        (["--model", "{src}/mlp.onnx", "--tag", "team"], "tag 'team' is not key=value"),
        (["--model", "{src}/mlp.onnx", "--tag", "te am=x"], "tag key 'te am'"),
        (["--model", "{src}/mlp.onnx", "--tag", "a=1", "--tag", "a=2"], "tag 'a' is given twice"),
        (["--model", "{src}/mlp.onnx", "--wheel", "{src}/helper.py"], "only .whl files"),
        (["--model", "{src}/mlp.onnx", "--wheel", "{src}/nowheel.whl"], "not a wheel file name"),
        (
            ["--model", "{src}/mlp.onnx", "--wheel", "{src}/foo-1.0-py3-none-any.whl",
             "--wheel", "{src}/Foo-2.0-py3-none-any.whl"],
            "is the same distribution (foo)",
        ),
        (["--model", "{src}/mlp.onnx", "--score", "{src}/helper.py"], "does not define init and run()"),
        (["--model", "{src}/mlp.onnx", "--score", "{src}/broken.py"], "not valid Python"),
        (["--model", "{src}/mlp.onnx", "--include", "{src}/helper.py"], "the image has no score.py"),
        (
            ["--model", "{src}/mlp.onnx", "--score", "{src}/score.py", "--include", "{src}/score.py"],
            "included file",
        ),
        (["--model", "{src}/mlp.onnx", "--rtol", "0.1"], "need --sample-request"),
        (["--model", "{src}/mlp.onnx", "--sample-request", "{src}/v2-request.json"], "go together"),
        (
            ["--model", "{src}/mlp.onnx", "--model", "{src}/pair.onnx",
             "--sample-request", "{src}/v2-request.json", "--expected-response", "{src}/v2-expected.json"],
            "several models (mlp, pair); name one",
        ),
        (
            ["--model", "{src}/mlp.onnx", "--sample-request", "{src}/v2-request.json",
             "--expected-response", "{src}/v2-expected.json", "--smoke-model", "nope"],
            "no model named 'nope'",
        ),
        (
            ["--model", "{src}/pair.onnx", "--sample-request", "{src}/v2-request.json",
             "--expected-response", "{src}/v2-expected.json"],
            "the sample request does not fit model 'pair'",
        ),
        (
            ["--model", "{src}/mlp.onnx", "--sample-request", "{src}/score.py",
             "--expected-response", "{src}/v2-expected.json"],
            "sample request {src}/score.py: not valid JSON",
        ),
        (
            ["--model", "{src}/mlp.onnx", "--sample-request", "{src}/v2-request.json",
             "--expected-response", "{src}/v2-expected.json", "--atol", "-1"],
            "atol must be a finite number >= 0",
        ),
    ],
)  # fmt: skip
def test_refusals(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    make_wheel(src, "Foo-2.0-py3-none-any.whl")
    make_wheel(src, "nowheel.whl")
    (src / "broken.py").write_text("def init(:\n")
    shutil.copy(src / "mlp.onnx", src / ".hidden.onnx")
    out = tmp_path / "x.tar"
    argv = ["image", "build", "--name", "iris", "--version", "3", "--out", str(out)]
    rc, err = cli_main(capsys, *argv, *(a.format(src=src) for a in args))
    assert rc == 2
    assert message.format(src=src) in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_image_name_and_version_must_be_deployable(src: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="image name"):
        bundle.build_image(tmp_path / "x.tar", "iris classifier", "3", {"iris": src / "mlp.onnx"})
    with pytest.raises(BuildError, match="image version"):
        bundle.build_image(tmp_path / "x.tar", "iris", "3/4", {"iris": src / "mlp.onnx"})
    with pytest.raises(BuildError, match="model name '-bad'"):
        bundle.build_image(tmp_path / "x.tar", "iris", "3", {"-bad": src / "mlp.onnx"})
    with pytest.raises(BuildError, match="at least one model"):
        bundle.build_image(tmp_path / "x.tar", "iris", "3", {})


def test_a_model_with_external_weights_is_refused(tmp_path: Path) -> None:
    """The device gets models/<name>.onnx alone: weights in a side file would not be there."""
    d = tmp_path / "ext"
    d.mkdir()
    model = onnx.load(str(make_mlp(tmp_path / "mlp.onnx")))
    onnx.save(model, str(d / "mlp.onnx"), save_as_external_data=True, location="mlp.data", size_threshold=0)
    with pytest.raises(BuildError, match=r"external data files"):
        bundle.build_image(tmp_path / "x.tar", "iris", "3", {"iris": d / "mlp.onnx"})


def test_entry_script_checks_parse_but_never_run(tmp_path: Path, src: Path) -> None:
    script = tmp_path / "app.py"
    # Bound under try/except and by import: still found. Never executed: the raise would fail it.
    script.write_text(
        "raise SystemExit('executed')\n"
        "try:\n    from impl import init\nexcept ImportError:\n    pass\n"
        "run = print\n"
    )
    built = bundle.build_image(tmp_path / "x.tar", "iris", "3", {"iris": src / "mlp.onnx"}, score=script)
    meta = bundle.read_metadata(built.path)
    assert meta["entry_script"] == "score.py" and "score.py" in meta["files"]  # stored under its fixed name


def test_low_level_build_and_read_metadata_errors(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"m")
    (tmp_path / "model.onnx").chmod(0o755)
    out = tmp_path / "b.tar"
    digest = bundle.build(out, "img", "1", {"model.onnx": tmp_path / "model.onnx"}, {"extra": True})
    assert digest == hash_file(out)
    assert bundle.read_metadata(out)["extra"] is True
    assert members(out)[1].mode == 0o755  # build() keeps the executable bit, as before
    (tmp_path / "not.tar").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a bundle"):
        bundle.read_metadata(tmp_path / "not.tar")
    with tarfile.open(tmp_path / "empty.tar", "w") as tar:
        tar.addfile(tarfile.TarInfo("other"))
    with pytest.raises(ValueError, match=r"has no bundle\.json"):
        bundle.read_metadata(tmp_path / "empty.tar")


def test_helpers() -> None:
    assert bundle.parse_model_arg("iris=a/b.onnx") == ("iris", Path("a/b.onnx"))
    assert bundle.parse_model_arg("a/b.onnx") == ("b", Path("a/b.onnx"))
    assert bundle.parse_model_arg("./x=y.onnx") == ("x=y", Path("./x=y.onnx"))
    assert bundle.parse_tag("app.kubernetes.io=web=1") == ("app.kubernetes.io", "web=1")
    assert bundle.wheel_distribution(Path("Foo_Bar-1.0-1-cp311-cp311-manylinux_2_17_x86_64.whl")) == "foo-bar"
    assert bundle.wheel_distribution(Path("torch-2.3.0+cpu-cp311-cp311-linux_x86_64.whl")) == "torch"
