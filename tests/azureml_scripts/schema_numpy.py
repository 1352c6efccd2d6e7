"""run() decorated with inference_schema's NumpyParameterType (the azureml docs' pattern): the
server takes ``data`` from the JSON body (or the query string of a GET) and inference_schema turns
it into a numpy array of the sample's dtype and shape."""

import os

import numpy as np
import onnxruntime as ort
from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
from inference_schema.schema_decorators import input_schema, output_schema

session: ort.InferenceSession | None = None


def init() -> None:
    global session
    path = os.path.join(os.environ["AZUREML_MODEL_DIR"], "mlp.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@input_schema("data", NumpyParameterType(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)))
@output_schema(NumpyParameterType(np.array([[0.1, 0.2, 0.7]], dtype=np.float32)))
def run(data: np.ndarray) -> list[list[float]]:
    assert session is not None
    return session.run(None, {"x": data})[0].tolist()  # type: ignore[no-any-return]
