"""An undecorated script that takes ``request_headers`` and returns whatever the request asks for:
the odd return values (None, bytes, numpy, a str) and failures scoring scripts produce."""

import json

import numpy as np


def init() -> None:
    pass


def run(data: str, request_headers: dict[str, str]) -> object:
    try:
        doc = json.loads(data)
    except ValueError:
        return {"text": data}  # not JSON: run() still gets it, as text
    kind = doc.get("return") if isinstance(doc, dict) else None
    if kind == "none":
        return None
    if kind == "bytes":
        return b"\x00\x01"
    if kind == "string":
        return "a string"
    if kind == "json_string":
        return json.dumps({"a": 1})
    if kind == "numpy":
        return {"scalar": np.float32(1.5), "array": np.arange(3)}
    if kind == "raise":
        raise ValueError("bad value")
    if kind == "headers":
        return {k: v for k, v in request_headers.items() if k.lower().startswith("x-custom")}
    return doc
