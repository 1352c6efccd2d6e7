"""Image bundles: one uncompressed tar holding ``bundle.json`` and the image's files.

Builds are reproducible: members are sorted, owned by 0:0, dated at the epoch, with normalised
modes, and ``bundle.json`` is canonical JSON, so the same inputs give the same bytes and the same
sha256. The archive is not compressed: model weights barely compress, and an uncompressed tar lets
the agent resume downloads by byte range and unpack with in-kernel copies (see docs/bundle.md).

:func:`build` writes any files; :func:`build_image` is ``edge-deploy image build``: ONNX models,
an optional ``score.py``, pinned wheels, tags and a smoke test, checked before anything is written.
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_core import strictjson
from edge_core.bundle import BUNDLE_METADATA, ENTRY_SCRIPT, FORMAT, MODELS_DIR, WHEELS_DIR
from edge_core.errors import BuildError
from edge_core.fsutil import hash_file

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-6

#: Model names, tag keys and included file names: they become file names in the bundle, so nothing
#: the agent's unpacker would refuse (slashes, backslashes, leading dots) and nothing a shell or a
#: URL needs quoted.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: The manifest's own patterns (edge_core/schemas/manifest.schema.json): the agent compares bundle.json's
#: name and version with the manifest's, so an image named otherwise could never be deployed.
IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
#: ``{distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl`` (the wheel file name spec).
WHEEL_RE = re.compile(r"(?P<dist>[A-Za-z0-9._]+)-[A-Za-z0-9._+!]+(-[A-Za-z0-9._]+){3,4}\.whl")
_RESERVED = {BUNDLE_METADATA, ENTRY_SCRIPT, MODELS_DIR, WHEELS_DIR}
#: Modules Azure ML's inference server brings along that the agent does not: a script importing
#: one needs the image to ship its wheel (module -> distribution, and the pip line to fetch it).
#: ``azureml.contrib.services`` is not here: the agent provides it (agent/serving/azureml_shim).
SERVER_PROVIDED = {"inference_schema": ("inference-schema", "inference-schema==1.8")}


@dataclass(frozen=True)
class SmokeTest:
    """The sample request the device sends once an image is installed, and the response it expects.

    With a ``score.py``, ``request`` is the JSON body of ``POST /score`` and ``expected`` the response
    JSON. Without one, ``request`` is an Open Inference Protocol v2 infer request for ``model`` and
    ``expected`` the v2 response (at least ``{"outputs": [...]}``). ``model`` may be left out when
    the image has one model.
    """

    request: Any
    expected: Any
    model: str | None = None
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL


@dataclass(frozen=True)
class Built:
    path: Path
    sha256: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "size": self.size}


# --- the archive ---------------------------------------------------------------------------------


def _info(name: str, size: int, executable: bool = False) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o755 if executable else 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _write(out: Path, meta: Mapping[str, Any], files: Mapping[str, Path], keep_exec: bool) -> str:
    # allow_nan=False: NaN is not JSON, and the device (or any other reader) may parse strictly.
    meta_bytes = json.dumps(meta, sort_keys=True, indent=2, allow_nan=False).encode() + b"\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed: ``out`` is never a half-written bundle that a server could hand out.
    tmp = out.with_name(out.name + ".tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_info(BUNDLE_METADATA, len(meta_bytes)), io.BytesIO(meta_bytes))
            for arc, src in sorted(files.items()):
                st = src.stat()
                with open(src, "rb") as f:
                    tar.addfile(_info(arc, st.st_size, keep_exec and bool(st.st_mode & 0o100)), f)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hash_file(out)


def _file_entries(files: Mapping[str, Path], known: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    return {
        arc: {"sha256": known.get(arc) or hash_file(src), "size": src.stat().st_size}
        for arc, src in sorted(files.items())
    }


def build(
    out: Path, name: str, version: str, files: Mapping[str, Path], extra: Mapping[str, Any] | None = None
) -> str:
    """Write a bundle to ``out`` from ``{path inside the bundle: source file}``; return its sha256.

    The low-level writer (test rigs, benchmarks): no checks, and ``extra`` is merged into bundle.json
    as given. Images are built with :func:`build_image`.
    """
    meta: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "files": _file_entries(files, {}),
        **(extra or {}),
    }
    return _write(out, meta, files, keep_exec=True)


def read_metadata(path: Path) -> dict[str, Any]:
    """``bundle.json`` of a built bundle (ValueError if ``path`` is not a bundle)."""
    try:
        with tarfile.open(path, "r:") as tar:
            try:
                f = tar.extractfile(BUNDLE_METADATA)
            except KeyError:
                f = None
            if f is None:
                raise ValueError(f"{path} has no {BUNDLE_METADATA}")
            doc = json.loads(f.read())
    except tarfile.TarError as exc:
        raise ValueError(f"{path} is not a bundle (an uncompressed tar): {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: {BUNDLE_METADATA} is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: {BUNDLE_METADATA} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: {BUNDLE_METADATA} is not a JSON object")
    return doc


# --- inputs --------------------------------------------------------------------------------------


def parse_model_arg(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (the name is then the file's stem).

    A path that itself contains ``=`` is read as a path when what precedes the ``=`` is not a valid
    name (``./a=b.onnx``)."""
    left, sep, right = text.partition("=")
    if sep and NAME_RE.fullmatch(left):
        return left, Path(right)
    path = Path(text)
    return path.stem, path


def parse_tag(text: str) -> tuple[str, str]:
    """``key=value``; the key is a name (``team``, ``app.kubernetes.io``), the value any text."""
    key, sep, value = text.partition("=")
    if not sep:
        raise BuildError(f"tag {text!r} is not key=value")
    _check_tag(key, value)
    return key, value


def _check_tag(key: str, value: str) -> None:
    if not NAME_RE.fullmatch(key) or len(key) > 128:
        raise BuildError(f"tag key {key!r} must match {NAME_RE.pattern} (at most 128 characters)")
    if len(value) > 256 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise BuildError(f"tag {key}: the value must be at most 256 characters, without control characters")


def wheel_distribution(path: Path) -> str:
    """The normalised distribution name of a wheel (PEP 503: ``Foo_Bar`` and ``foo-bar`` are one)."""
    m = WHEEL_RE.fullmatch(path.name)
    if not m:
        raise BuildError(
            f"{path}: not a wheel file name (expected NAME-VERSION[-BUILD]-PYTHON-ABI-PLATFORM.whl)"
        )
    return re.sub(r"[-_.]+", "-", m.group("dist")).lower()


def load_json(path: Path, what: str) -> Any:
    """Strict JSON from a file, read as the agent reads bundle.json (edge_core.strictjson): a sample
    request the device would refuse is refused here first."""
    try:
        return strictjson.loads(path.read_bytes())
    except strictjson.StrictJSONError as exc:
        raise BuildError(f"{what} {path}: not valid JSON: {exc}") from None


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise BuildError(
            f"{what} {path}: no such file" if not path.exists() else f"{what} {path}: not a file"
        )


def _top_level_names(tree: ast.Module) -> tuple[set[str], bool]:
    """Names a module binds at import time (including under if/try/with), and whether it has a
    ``from x import *`` that could bind anything."""
    names: set[str] = set()
    star = False
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    star = True
                else:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.stmt | ast.excepthandler):
            todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt | ast.excepthandler))
    return names, star


def _check_python(path: Path, what: str, entry: bool) -> None:
    """Parse (never run) a script: a syntax error found on the device would fail the deployment
    after the download; an entry script must also define Azure ML's ``init()`` and ``run(data)``."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        raise BuildError(f"{what} {path}: not valid Python: {exc.msg} (line {exc.lineno})") from None
    except ValueError as exc:  # NUL bytes (3.11); undecodable source
        raise BuildError(f"{what} {path}: not valid Python: {exc}") from None
    if entry:
        names, star = _top_level_names(tree)
        missing = [n for n in ("init", "run") if n not in names]
        if missing and not star:
            raise BuildError(
                f"{what} {path}: does not define {' and '.join(missing)}(); an entry script defines "
                "init() (called once) and run(data) (called per request)"
            )


def imported_modules(path: Path) -> set[str]:
    """The top-level names of the modules a script imports, anywhere in it (absolute imports)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _check_server_provided(scripts: Sequence[Path], dists: Mapping[str, Path]) -> None:
    """A script that imports what Azure ML's server installs (inference_schema) fails its init() on
    the device unless the image ships the wheel: said here, with how to get the wheels."""
    for path in scripts:
        for module in sorted(imported_modules(path) & set(SERVER_PROVIDED)):
            dist, pin = SERVER_PROVIDED[module]
            if dist not in dists:
                raise BuildError(
                    f"{path}: imports {module}, which Azure ML's inference server installs but the "
                    f"device does not: add its wheel and its dependencies' with --wheel (fetch them "
                    f"for the device's Python and platform with `pip download --only-binary :all: "
                    f"-d wheels/ {pin}`, then pass each wheels/*.whl)"
                )


# --- models --------------------------------------------------------------------------------------


def _session(path: Path, name: str, optimize: bool) -> Any:
    import onnxruntime as ort  # lazily: every other edge-deploy command starts faster without it

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: the builder's output is one JSON line
    if not optimize:
        # Reading the signature needs the graph checked, not optimised; large models load faster.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="edge-image-") as tmp:
        # Load the model alone in a directory, as the device will find it (models/<name>.onnx):
        # a model whose weights live in external data files next to it is refused here, not there.
        target = Path(tmp) / f"{name}.onnx"
        try:
            target.symlink_to(path.resolve())
        except OSError:
            target = path
        try:
            return ort.InferenceSession(str(target), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            msg = str(exc).replace(str(target), str(path))
            hint = ""
            if "xternal data" in msg:
                hint = " (its weights are in external data files: save it with the weights inside the .onnx)"
            raise BuildError(
                f"model {path}: onnxruntime cannot load it as an ONNX model{hint}: {msg}"
            ) from None


def _io_spec(arg: Any) -> dict[str, Any]:
    from edge_core import tensors

    onnx_type: str = arg.type
    datatype = tensors.v2_datatype(onnx_type)
    spec: dict[str, Any] = {"name": arg.name, "datatype": datatype}
    if onnx_type.startswith("tensor("):
        # Symbolic ("batch") and unknown (None) dimensions are -1, as in the v2 metadata API.
        spec["shape"] = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
    else:
        spec["shape"] = None  # a sequence or a map has no tensor shape
    if datatype is None:
        spec["onnx_type"] = onnx_type
    return spec


def signature(session: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The inputs and outputs of an onnxruntime session, in bundle.json's form."""
    return [_io_spec(a) for a in session.get_inputs()], [_io_spec(a) for a in session.get_outputs()]


def read_signature(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The inputs and outputs of an ONNX file, read with onnxruntime (BuildError if it cannot load)."""
    _require_file(path, "model")
    return signature(_session(path, path.stem, optimize=False))


def check_v2_smoke_test(session: Any, model: Mapping[str, Any], smoke: SmokeTest) -> None:
    """Run a v2 smoke test through onnxruntime; BuildError unless it reproduces ``smoke.expected``."""
    from edge_core import tensors

    name = model["name"]
    try:
        feeds = tensors.decode_request(smoke.request, model["inputs"])
        wanted = tensors.requested_outputs(smoke.request, model["outputs"])
    except ValueError as exc:
        raise BuildError(f"smoke test: the sample request does not fit model {name!r}: {exc}") from None
    if not wanted:
        raise BuildError(
            f"smoke test: model {name!r} has no output the v2 protocol can carry; add a score.py"
        )
    if not isinstance(smoke.expected, dict) or not isinstance(smoke.expected.get("outputs"), list):
        raise BuildError('smoke test: the expected response must be a v2 response {"outputs": [...]}')
    try:
        results = session.run(wanted, feeds)
    except Exception as exc:
        raise BuildError(f"smoke test: onnxruntime fails on the sample request: {exc}") from None
    actual = tensors.encode_response(name, zip(wanted, results, strict=True))
    diff = tensors.compare(smoke.expected, actual, smoke.rtol, smoke.atol)
    if diff:
        raise BuildError(
            f"smoke test: the expected response does not match what model {name!r} answers "
            f"(rtol {smoke.rtol:g}, atol {smoke.atol:g}): {diff}"
        )


# --- the image -----------------------------------------------------------------------------------


def _models_list(models: Mapping[str, Path] | Sequence[tuple[str, Path]]) -> list[tuple[str, Path]]:
    pairs = list(models.items()) if isinstance(models, Mapping) else list(models)
    if not pairs:
        raise BuildError("an image needs at least one model")
    seen: dict[str, Path] = {}
    for name, path in pairs:
        if not NAME_RE.fullmatch(name):
            raise BuildError(
                f"model name {name!r} ({path}) must match {NAME_RE.pattern}; give one with --model NAME=PATH"
            )
        if name in seen:
            raise BuildError(f"model name {name!r} is given twice ({seen[name]} and {path})")
        seen[name] = path
        _require_file(path, "model")
    return sorted(pairs)


def build_image(
    out: Path,
    name: str,
    version: str,
    models: Mapping[str, Path] | Sequence[tuple[str, Path]],
    *,
    score: Path | None = None,
    include: Sequence[Path] = (),
    wheels: Sequence[Path] = (),
    tags: Mapping[str, str] | None = None,
    smoke_test: SmokeTest | None = None,
) -> Built:
    """Check every input, then write an image bundle to ``out`` (see docs/bundle.md).

    ``models`` maps model names to ONNX files; ``score`` is the entry script (stored as
    ``score.py``); ``include`` are more files at the bundle's root for the script to import;
    ``wheels`` are pinned wheels, one per distribution. Raises BuildError, before writing anything,
    for an input the device could not use, including a v2 smoke test that onnxruntime does not
    reproduce. The order of models, includes, wheels and tags does not change the bytes.
    """
    if not IMAGE_NAME_RE.fullmatch(name):
        raise BuildError(f"image name {name!r} must match {IMAGE_NAME_RE.pattern}")
    if not VERSION_RE.fullmatch(version):
        raise BuildError(f"image version {version!r} must match {VERSION_RE.pattern}")
    model_list = _models_list(models)
    files: dict[str, Path] = {f"{MODELS_DIR}/{m}.onnx": p for m, p in model_list}

    if score is not None:
        _require_file(score, "entry script")
        _check_python(score, "entry script", entry=True)
        files[ENTRY_SCRIPT] = score
    if include and score is None:
        raise BuildError("--include files are for score.py to import, and the image has no score.py")
    for path in include:
        _require_file(path, "included file")
        if not NAME_RE.fullmatch(path.name) or path.name in _RESERVED:
            raise BuildError(
                f"included file {path}: its name must match {NAME_RE.pattern} and not be one of "
                f"{', '.join(sorted(_RESERVED))}"
            )
        if path.name in files:
            raise BuildError(f"included file {path}: another included file is also named {path.name}")
        if path.suffix == ".py":
            _check_python(path, "included file", entry=False)
        files[path.name] = path

    dists: dict[str, Path] = {}
    for path in wheels:
        if path.suffix != ".whl":
            raise BuildError(f"wheel {path}: only .whl files can be bundled (no sdists or other archives)")
        _require_file(path, "wheel")
        dist = wheel_distribution(path)
        if dist in dists:
            raise BuildError(
                f"wheel {path}: {dists[dist].name} is the same distribution ({dist}); "
                "wheels are pinned, one version per distribution"
            )
        if not zipfile.is_zipfile(path):
            raise BuildError(f"wheel {path}: not a zip archive")
        dists[dist] = path
        files[f"{WHEELS_DIR}/{path.name}"] = path

    if score is not None:
        _check_server_provided([score, *(p for p in include if p.suffix == ".py")], dists)

    tag_map = dict(tags or {})
    for key, value in tag_map.items():
        _check_tag(key, value)

    smoke_doc: dict[str, Any] | None = None
    smoke_model: str | None = None
    if smoke_test is not None:
        smoke_model = _smoke_model(smoke_test, [m for m, _ in model_list])
        for what, tol in (("rtol", smoke_test.rtol), ("atol", smoke_test.atol)):
            if not (math.isfinite(tol) and tol >= 0):
                raise BuildError(f"smoke test: {what} must be a finite number >= 0, got {tol}")
        try:
            json.dumps([smoke_test.request, smoke_test.expected], allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise BuildError(f"smoke test: the request and expected response must be JSON: {exc}") from None
        smoke_doc = {
            "model": smoke_model,
            "request": smoke_test.request,
            "expected": smoke_test.expected,
            "rtol": float(smoke_test.rtol),
            "atol": float(smoke_test.atol),
        }

    hashes: dict[str, str] = {}
    model_docs: list[dict[str, Any]] = []
    for model_name, path in model_list:
        arc = f"{MODELS_DIR}/{model_name}.onnx"
        # Only a v2 smoke test runs here, and it runs with the graph optimised as the device will.
        run_smoke = smoke_test is not None and score is None and model_name == smoke_model
        session = _session(path, model_name, optimize=run_smoke)
        inputs, outputs = signature(session)
        hashes[arc] = hash_file(path)
        doc = {"name": model_name, "file": arc, "sha256": hashes[arc], "inputs": inputs, "outputs": outputs}
        if run_smoke and smoke_test is not None:
            check_v2_smoke_test(session, doc, smoke_test)
        del session  # one model in memory at a time
        model_docs.append(doc)

    meta: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "tags": tag_map,
        "entry_script": ENTRY_SCRIPT if score is not None else None,
        "models": model_docs,
        "wheels": sorted(f for f in files if f.startswith(f"{WHEELS_DIR}/")),
        "files": _file_entries(files, hashes),
        "smoke_test": smoke_doc,
    }
    # Modes are not taken from the sources: an executable bit differs between checkouts and CI
    # runners, would change the digest, and nothing in an image is executed directly.
    digest = _write(out, meta, files, keep_exec=False)
    return Built(out, digest, out.stat().st_size)


def _smoke_model(smoke: SmokeTest, names: list[str]) -> str:
    if smoke.model is None:
        if len(names) != 1:
            raise BuildError(f"smoke test: the image has several models ({', '.join(names)}); name one")
        return names[0]
    if smoke.model not in names:
        raise BuildError(f"smoke test: no model named {smoke.model!r}; the image has {', '.join(names)}")
    return smoke.model
