"""Build examples/iris.onnx: a tiny linear iris classifier written with onnx.helper, no training.

The weights are a hand-made nearest-centroid rule on the four iris measurements (sepal length and
width, petal length and width), good enough to tell the three species apart on typical flowers. The
model is committed (under 1 KB); this script is how it was made: `python examples/build_model.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: the species' mean measurements (Fisher's iris data, rounded): setosa, versicolor, virginica
CENTROIDS = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]], dtype=np.float32)


def build() -> onnx.ModelProto:
    # Nearest centroid as a linear layer: argmin |x - c|^2 = argmax (x.c - |c|^2 / 2).
    weights = CENTROIDS.T.copy()
    bias = -0.5 * (CENTROIDS**2).sum(axis=1)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["scores"]),
            helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
        ],
        "iris",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3]),
        ],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias.astype(np.float32), "b")],
    )
    # opset 13 and IR 7: loadable by every onnxruntime this project supports (>= 1.17)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    model.producer_name = "edge-ml examples/build_model.py"
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "iris.onnx"
    onnx.save(build(), out)
    print(f"{out} ({out.stat().st_size} bytes)")
