"""Small real models for the demo, the tests and the benchmarks.

``mlp`` builds an ONNX multi-layer perceptron with ``onnx.helper`` (deterministic weights from a
seed); ``iris`` trains scikit-learn classifiers on the Iris data set that ships inside scikit-learn
and converts them with skl2onnx. Both need the dev extras (onnx, scikit-learn, skl2onnx).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def mlp(path: Path, sizes: Sequence[int] = (64, 256, 256, 10), seed: int = 0, opset: int = 17) -> Path:
    """A float32 MLP with ReLU between layers and a dynamic batch dimension: input ``x``, output ``y``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        last = i == len(sizes) - 2
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
        prev = f"a{i}" if last else f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def iris(out_dir: Path) -> dict[str, Any]:
    """Train two classifiers on Iris and write them as ONNX (plain tensors out: no ZipMap).
    Returns paths, a few test rows, and the class names."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    data = load_iris()
    x = data.data.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, data.target, test_size=0.3, random_state=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    scores = {}
    for name, clf in (
        ("logreg", LogisticRegression(max_iter=500)),
        ("forest", RandomForestClassifier(n_estimators=30, max_depth=4, random_state=0)),
    ):
        clf.fit(x_train, y_train)
        scores[name] = float(clf.score(x_test, y_test))
        onx = to_onnx(clf, x_train[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
        paths[name] = out_dir / f"iris-{name}.onnx"
        paths[name].write_bytes(onx.SerializeToString())
    return {
        "paths": paths,
        "test_rows": x_test[:5],
        "test_labels": y_test[:5],
        "accuracy": scores,
        "classes": [str(c) for c in data.target_names],
    }
