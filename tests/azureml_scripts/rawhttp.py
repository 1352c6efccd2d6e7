"""A ``@rawhttp`` script (the azureml docs' "binary data" example): run() gets the request object
and answers an AMLResponse with its own status, content type and headers."""

import json
import os

import numpy as np
import onnxruntime as ort
from azureml.contrib.services.aml_request import AMLRequest, rawhttp
from azureml.contrib.services.aml_response import AMLResponse

session: ort.InferenceSession | None = None


def init() -> None:
    global session
    path = os.path.join(os.environ["AZUREML_MODEL_DIR"], "mlp.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@rawhttp
def run(request: AMLRequest) -> object:
    assert session is not None
    mode = request.args.get("mode", "")
    if request.method == "GET":
        if mode == "request":
            return {
                "path": request.path,
                "full_path": request.full_path,
                "args": request.args.to_dict(flat=False),
                "custom": request.headers.get("X-Custom-Header"),
                "has_custom": "x-custom-header" in request.headers,
                "method": request.method,
                "query_string": request.query_string.decode(),
            }
        return AMLResponse(request.full_path, 200)
    if request.method == "OPTIONS":
        return AMLResponse("", 204, {"Allow": "GET, POST, OPTIONS"})
    if mode == "fail":
        return AMLResponse("the model is warming up", 503)
    if mode == "bytes":
        return AMLResponse(request.get_data(), 200, {"Content-Type": "application/octet-stream"})
    if mode == "none":
        return AMLResponse(None, 202)
    if mode == "raise":
        raise RuntimeError("rawhttp run() failed")
    if mode == "form":
        files = {k: [f.filename, f.content_type, len(f.read())] for k, f in request.files.items()}
        return {"form": request.form.to_dict(), "files": files, "values": request.values.to_dict(flat=False)}
    if mode == "dict":
        return {"length": len(request.get_data()), "json": request.is_json}
    body = request.get_json()
    y = session.run(None, {"x": np.array(body["data"], dtype=np.float32)})[0]
    return AMLResponse(
        json.dumps({"y": y.tolist()}), 201, {"Content-Type": "application/json", "X-Model": "mlp, onnx"}
    )
