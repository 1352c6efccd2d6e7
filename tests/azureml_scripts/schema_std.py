"""The AutoML-generated shape of a decorated script: StandardPythonParameterType around a numpy
sample, a second parameter with a default and ``convert_to_provided_type=False``."""

import os

import numpy as np
import onnxruntime as ort
from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
from inference_schema.schema_decorators import input_schema, output_schema

session: ort.InferenceSession | None = None

input_sample = NumpyParameterType(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
method_sample = StandardPythonParameterType("predict")
output_sample = StandardPythonParameterType({"Results": [[0.1, 0.2, 0.7]]})


def init() -> None:
    global session
    path = os.path.join(os.environ["AZUREML_MODEL_DIR"], "mlp.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@input_schema("Inputs", StandardPythonParameterType({"data": input_sample}))
@input_schema(
    "GlobalParameters", StandardPythonParameterType({"method": method_sample}), convert_to_provided_type=False
)
@output_schema(output_sample)
def run(Inputs: dict[str, np.ndarray], GlobalParameters: dict[str, str] = {"method": "predict"}) -> object:  # noqa: B006
    assert session is not None
    y = session.run(None, {"x": Inputs["data"]})[0]
    if GlobalParameters.get("method") == "argmax":
        return {"Results": y.argmax(axis=1).tolist()}
    return {"Results": y.tolist()}
