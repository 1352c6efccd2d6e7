"""An undecorated Azure ML scoring script: run() gets the request body as text (azureml docs'
"Write a scoring script" example, with the ONNX model of the test)."""

import json
import os

import numpy as np
import onnxruntime as ort

session: ort.InferenceSession | None = None


def init() -> None:
    global session
    path = os.path.join(os.environ["AZUREML_MODEL_DIR"], "mlp.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run(raw_data: str) -> dict[str, object]:
    assert session is not None
    data = np.array(json.loads(raw_data)["data"], dtype=np.float32)
    y = session.run(None, {"x": data})[0]
    return {"y": y.tolist()}
