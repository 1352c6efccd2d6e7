"""``AMLResponse`` as a scoring script uses it, without Flask.

Azure ML's is a Flask Response; this one keeps its constructor and what the server reads back:
``status_code``, ``headers`` and ``get_data()``. Its rules are Azure ML's (azureml-inference-server-
http 1.5.1, ``api/aml_response.py``): ``json_str=True`` sends ``json.dumps(message)`` as
``application/json``; a ``str`` or ``bytes`` message goes as it is, ``text/html; charset=utf-8``
unless ``response_headers`` has a ``Content-Type``; ``None`` is ``{}``; every header value is split
on commas into repeated headers; ``x-ms-run-function-failed`` is set to ``run_function_failed``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from .aml_request import Headers

#: Lets the worker tell this module from a real azureml.contrib.services an image ships.
EDGE_SHIM = True

_DEFAULT_TYPE = "text/html; charset=utf-8"


class AMLResponse:
    """run()'s HTTP response: body, status and headers, sent as they are."""

    def __init__(
        self,
        message: Any,
        status_code: int,
        response_headers: Mapping[str, str] | None = None,
        json_str: bool = False,
        run_function_failed: bool = False,
    ) -> None:
        response_headers = response_headers or {}
        self.status_code = int(status_code)
        self.headers = Headers()
        if message is None:
            self._body: Any = json.dumps({})
            self.headers.add("Content-Type", "application/json")
        elif json_str:
            self._body = json.dumps(message)
            self.headers.add("Content-Type", "application/json")
        else:
            self._body = message
            if "Content-Type" not in response_headers:  # Azure ML looks for this exact spelling
                self.headers.add("Content-Type", _DEFAULT_TYPE)
        self.headers["x-ms-run-function-failed"] = run_function_failed
        # Repeated headers are written comma-separated (RFC 2616 4.2), and sent one per value.
        for header, value in response_headers.items():
            for v in value.split(","):
                self.headers.add_header(header, v.strip())

    @property
    def status(self) -> str:
        try:
            return f"{self.status_code} {HTTPStatus(self.status_code).phrase}"
        except ValueError:
            return f"{self.status_code} UNKNOWN"

    @property
    def content_type(self) -> str | None:
        value = self.headers.get("Content-Type")
        return None if value is None else str(value)

    @content_type.setter
    def content_type(self, value: str) -> None:
        self.headers["Content-Type"] = value

    @property
    def mimetype(self) -> str | None:
        ct = self.content_type
        return None if ct is None else ct.split(";")[0].strip().lower()

    def get_data(self, as_text: bool = False) -> Any:
        body = self._body
        if isinstance(body, str):
            data = body.encode("utf-8")
        elif isinstance(body, bytes | bytearray | memoryview):
            data = bytes(body)
        elif isinstance(body, Iterable):  # werkzeug sends an iterable's items, one after the other
            data = b"".join(x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in body)
        else:
            raise TypeError(f"the response body must be str, bytes or an iterable, not {type(body).__name__}")
        return data.decode("utf-8", "replace") if as_text else data

    def set_data(self, value: str | bytes) -> None:
        self._body = value

    @property
    def data(self) -> bytes:
        return bytes(self.get_data())

    @data.setter
    def data(self, value: str | bytes) -> None:
        self.set_data(value)

    @property
    def is_json(self) -> bool:
        mt = self.mimetype or ""
        return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))

    def get_json(self) -> Any:
        return json.loads(self.get_data())

    @property
    def json(self) -> Any:
        return self.get_json()

    def __repr__(self) -> str:
        return f"<AMLResponse [{self.status_code}]>"
