"""``rawhttp`` and ``AMLRequest`` as a scoring script uses them, without Flask.

Azure ML's inference server passes a ``@rawhttp`` run() the Flask (werkzeug) request. This is the
part of werkzeug's request that scoring scripts use, with werkzeug's semantics where it matters:
``args`` and ``form`` are multi-dicts whose ``[key]``/``get`` give the first value; ``headers`` is
case-insensitive and yields ``(name, value)`` pairs (so ``dict(request.headers)`` works), with names
as gunicorn and werkzeug present them (``X-Custom-Header``; duplicates joined with ``,``; names with
``_`` dropped); ``full_path`` always has its ``?``; ``get_json()`` refuses a body whose content type
is not JSON unless ``force=True``; ``files`` are ``FileStorage`` objects (``.read()``, ``.save()``,
``.filename``). Standard library only: the worker may run under an image's own interpreter.

``rawhttp`` sets the module's ``_rawHttpRequested`` flag, as Azure ML's does: the worker reads it
after importing the script to decide how to call run().
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from http.cookies import SimpleCookie
from typing import IO, Any, TypeVar

#: Lets the worker tell this module from a real azureml.contrib.services an image ships.
EDGE_SHIM = True

_rawHttpRequested = False  # Azure ML's name: code that checks the flag reads this one

F = TypeVar("F", bound=Callable[..., Any])


def rawhttp(func: F) -> F:
    """Ask for run() to be called with the request object (an :class:`AMLRequest`)."""
    global _rawHttpRequested
    _rawHttpRequested = True
    return func


class HTTPError(Exception):
    """werkzeug's HTTPException, as far as run() can see one: raised from ``get_json``; in run() it
    is an exception like any other (the server answers 500)."""

    code = 500

    def __init__(self, description: str) -> None:
        super().__init__(f"{self.code}: {description}")
        self.description = description


class BadRequest(HTTPError):
    code = 400


class UnsupportedMediaType(HTTPError):
    code = 415


class MultiDict:
    """werkzeug's MultiDict, read side: several values per key, ``d[key]`` and ``get`` the first."""

    def __init__(self, pairs: Iterable[tuple[str, Any]] = ()) -> None:
        self._lists: dict[str, list[Any]] = {}
        for k, v in pairs:
            self._lists.setdefault(k, []).append(v)

    def __getitem__(self, key: str) -> Any:
        if key in self._lists:
            return self._lists[key][0]
        raise KeyError(key)

    def get(self, key: str, default: Any = None, type: Callable[[Any], Any] | None = None) -> Any:
        if key not in self._lists:
            return default
        value = self._lists[key][0]
        if type is None:
            return value
        try:
            return type(value)
        except (ValueError, TypeError):
            return default

    def getlist(self, key: str, type: Callable[[Any], Any] | None = None) -> list[Any]:
        values = list(self._lists.get(key, ()))
        if type is None:
            return values
        out = []
        for v in values:
            with contextlib.suppress(ValueError, TypeError):
                out.append(type(v))
        return out

    def __contains__(self, key: object) -> bool:
        return key in self._lists

    def __iter__(self) -> Iterator[str]:
        return iter(self._lists)

    def __len__(self) -> int:
        return len(self._lists)

    def __bool__(self) -> bool:
        return bool(self._lists)

    def keys(self) -> list[str]:
        return list(self._lists)

    def values(self) -> list[Any]:
        return [v[0] for v in self._lists.values()]

    def items(self, multi: bool = False) -> list[tuple[str, Any]]:
        if multi:
            return [(k, v) for k, vs in self._lists.items() for v in vs]
        return [(k, vs[0]) for k, vs in self._lists.items()]

    def lists(self) -> list[tuple[str, list[Any]]]:
        return [(k, list(vs)) for k, vs in self._lists.items()]

    def to_dict(self, flat: bool = True) -> dict[str, Any]:
        if flat:
            return {k: vs[0] for k, vs in self._lists.items()}
        return {k: list(vs) for k, vs in self._lists.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.items(multi=True)!r})"


class Headers:
    """werkzeug's Headers: an ordered list of ``(name, value)``, looked up case-insensitively.
    Iterating yields the pairs, so ``dict(headers)`` is a plain dict of them."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._list: list[tuple[str, str]] = [(str(k), str(v)) for k, v in pairs]

    def get(self, key: str, default: Any = None, type: Callable[[str], Any] | None = None) -> Any:
        lower = key.lower()
        for k, v in self._list:
            if k.lower() == lower:
                if type is None:
                    return v
                try:
                    return type(v)
                except (ValueError, TypeError):
                    return default
        return default

    def getlist(self, key: str) -> list[str]:
        lower = key.lower()
        return [v for k, v in self._list if k.lower() == lower]

    get_all = getlist

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return str(value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and any(k.lower() == key.lower() for k, _ in self._list)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._list))

    def __len__(self) -> int:
        return len(self._list)

    def keys(self) -> list[str]:
        return [k for k, _ in self._list]

    def values(self) -> list[str]:
        return [v for _, v in self._list]

    def items(self) -> list[tuple[str, str]]:
        return list(self._list)

    def to_wsgi_list(self) -> list[tuple[str, str]]:
        return list(self._list)

    # --- the mutating side, used by AMLResponse ----------------------------------------------

    def add(self, key: str, value: Any) -> None:
        self._list.append((key, _header_value(value)))

    add_header = add

    def remove(self, key: str) -> None:
        lower = key.lower()
        self._list = [(k, v) for k, v in self._list if k.lower() != lower]

    def __delitem__(self, key: str) -> None:
        self.remove(key)

    def set(self, key: str, value: Any) -> None:
        """Replace the first header of that name in place (and drop the others), or append."""
        lower = key.lower()
        out: list[tuple[str, str]] = []
        done = False
        for k, v in self._list:
            if k.lower() != lower:
                out.append((k, v))
            elif not done:
                out.append((k, _header_value(value)))
                done = True
        if not done:
            out.append((key, _header_value(value)))
        self._list = out

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def setdefault(self, key: str, default: Any) -> str:
        if key in self:
            return self[key]
        self.add(key, default)
        return _header_value(default)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._list!r})"


def _header_value(value: Any) -> str:
    # werkzeug writes True as "True": Azure ML's x-ms-run-function-failed header relies on it
    return value if isinstance(value, str) else str(value)


class FileStorage:
    """An uploaded file of a multipart form (werkzeug's FileStorage): reads like its stream."""

    def __init__(
        self, data: bytes, name: str | None, filename: str | None, content_type: str | None, headers: Headers
    ) -> None:
        self.stream: IO[bytes] = io.BytesIO(data)
        self.name = name
        self.filename = filename
        self.headers = headers
        self.content_type = content_type
        self.mimetype = (content_type or "").split(";")[0].strip().lower()

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def save(self, dst: str | os.PathLike[str] | IO[bytes], buffer_size: int = 16384) -> None:
        if isinstance(dst, str | os.PathLike):
            with open(dst, "wb") as f:
                shutil.copyfileobj(self.stream, f, buffer_size)
        else:
            shutil.copyfileobj(self.stream, dst, buffer_size)

    def __getattr__(self, name: str) -> Any:
        # seek, tell, readline...: PIL's Image.open(file) and friends take it as a file
        return getattr(self.stream, name)

    def __bool__(self) -> bool:
        return bool(self.filename)

    def __repr__(self) -> str:
        return f"<FileStorage: {self.filename!r} ({self.content_type!r})>"


def _mime(content_type: str) -> tuple[str, dict[str, str]]:
    msg = Message()
    msg["content-type"] = content_type
    params = {k.lower(): v for k, v in msg.get_params(failobj=[])[1:]}
    return content_type.split(";")[0].strip().lower(), params


def _environ(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The WSGI environ gunicorn would build: ``HTTP_*`` per header, duplicates joined with ``,``,
    header names with ``_`` dropped (they could pose as another header)."""
    host, port = ([*list(meta.get("server") or ()), None, None])[:2]
    env: dict[str, Any] = {
        "REQUEST_METHOD": str(meta.get("method", "POST")),
        "SCRIPT_NAME": "",
        "PATH_INFO": str(meta.get("path", "/score")),
        "QUERY_STRING": str(meta.get("query", "")),
        "SERVER_NAME": str(host or "localhost"),
        "SERVER_PORT": str(port or ""),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": str(meta.get("client") or ""),
        "wsgi.url_scheme": str(meta.get("scheme", "http")),
    }
    for name, value in meta.get("headers") or ():
        if "_" in name:
            continue
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        env[key] = f"{env[key]},{value}" if key in env else value
    return env


def _headers_of(environ: Mapping[str, Any]) -> Headers:
    pairs = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            pairs.append((key[5:].replace("_", "-").title(), value))
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            pairs.append((key.replace("_", "-").title(), value))
    return Headers(pairs)


class AMLRequest:
    """The HTTP request a ``@rawhttp`` run() gets (werkzeug's Request, the parts scripts use)."""

    def __init__(self, meta: Mapping[str, Any], body: bytes) -> None:
        self.environ = _environ(meta)
        self.method: str = self.environ["REQUEST_METHOD"]
        self.scheme: str = self.environ["wsgi.url_scheme"]
        self.path: str = "/" + self.environ["PATH_INFO"].lstrip("/")
        self.root_path = ""
        self.query_string: bytes = self.environ["QUERY_STRING"].encode("latin-1")
        self.headers = _headers_of(self.environ)
        self.remote_addr: str | None = self.environ["REMOTE_ADDR"] or None
        self._body = body
        self._form: MultiDict | None = None
        self._files: MultiDict | None = None
        self._json: Any = None
        self._json_loaded = False
        self.args = MultiDict(
            urllib.parse.parse_qsl(self.query_string.decode("utf-8", "replace"), keep_blank_values=True)
        )

    # --- where it was sent -------------------------------------------------------------------

    @property
    def host(self) -> str:
        host = self.headers.get("Host")
        if host:
            return str(host)
        port = self.environ["SERVER_PORT"]
        return f"{self.environ['SERVER_NAME']}:{port}" if port else str(self.environ["SERVER_NAME"])

    @property
    def full_path(self) -> str:
        return f"{self.path}?{self.query_string.decode('latin-1')}"

    @property
    def host_url(self) -> str:
        return f"{self.scheme}://{self.host}/"

    url_root = host_url

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{urllib.parse.quote(self.path)}"

    @property
    def url(self) -> str:
        query = self.query_string.decode("latin-1")
        return self.base_url + (f"?{query}" if query else "")

    @property
    def is_secure(self) -> bool:
        return self.scheme in ("https", "wss")

    # --- what it says about its body -----------------------------------------------------------

    @property
    def content_type(self) -> str | None:
        value = self.headers.get("Content-Type")
        return None if value is None else str(value)

    @property
    def mimetype(self) -> str:
        return _mime(self.content_type or "")[0]

    @property
    def mimetype_params(self) -> dict[str, str]:
        return _mime(self.content_type or "")[1]

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length", type=int)
        return value if isinstance(value, int) else None

    @property
    def content_encoding(self) -> str | None:
        value = self.headers.get("Content-Encoding")
        return None if value is None else str(value)

    @property
    def is_json(self) -> bool:
        mt = self.mimetype
        return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))

    @property
    def user_agent(self) -> str:
        return str(self.headers.get("User-Agent", ""))

    @property
    def cookies(self) -> MultiDict:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(str(self.headers.get("Cookie", "")))
        except Exception:  # a malformed Cookie header: werkzeug ignores what it cannot parse too
            return MultiDict()
        return MultiDict((k, m.value) for k, m in jar.items())

    # --- the body ----------------------------------------------------------------------------

    @property
    def stream(self) -> IO[bytes]:
        return io.BytesIO(self._body)

    input_stream = stream

    def get_data(self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False) -> Any:
        if parse_form_data:
            self._parse_form()
        return self._body.decode("utf-8", "replace") if as_text else self._body

    @property
    def data(self) -> bytes:
        return self._body

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        if cache and self._json_loaded:
            return self._json
        if not (force or self.is_json):
            if silent:
                return None
            raise UnsupportedMediaType(
                "Did not attempt to load JSON data because the request Content-Type was not "
                "'application/json'."
            )
        try:
            value = json.loads(self._body)
        except ValueError as exc:
            if silent:
                return None
            raise BadRequest(f"Failed to decode JSON object: {exc}") from None
        if cache:
            self._json, self._json_loaded = value, True
        return value

    @property
    def json(self) -> Any:
        return self.get_json()

    @property
    def form(self) -> MultiDict:
        self._parse_form()
        assert self._form is not None
        return self._form

    @property
    def files(self) -> MultiDict:
        self._parse_form()
        assert self._files is not None
        return self._files

    @property
    def values(self) -> MultiDict:
        return MultiDict([*self.args.items(multi=True), *self.form.items(multi=True)])

    def _parse_form(self) -> None:
        if self._form is not None:
            return
        form: list[tuple[str, Any]] = []
        files: list[tuple[str, Any]] = []
        mt = self.mimetype
        if mt == "application/x-www-form-urlencoded":
            form = list(urllib.parse.parse_qsl(self._body.decode("utf-8", "replace"), keep_blank_values=True))
        elif mt == "multipart/form-data":
            head = f"Content-Type: {self.content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
            msg = BytesParser(policy=HTTP).parsebytes(head + self._body)
            for part in msg.iter_parts() if msg.is_multipart() else ():
                name = part.get_param("name", header="content-disposition")
                filename = part.get_filename()
                payload = part.get_payload(decode=True)
                data = payload if isinstance(payload, bytes) else b""
                if filename is not None:
                    headers = Headers((k, str(v)) for k, v in part.items())
                    files.append(
                        (str(name), FileStorage(data, str(name), filename, part.get("Content-Type"), headers))
                    )
                else:
                    charset = part.get_content_charset() or "utf-8"
                    form.append((str(name), data.decode(charset, "replace")))
        self._form, self._files = MultiDict(form), MultiDict(files)

    def __repr__(self) -> str:
        return f"<AMLRequest {self.url!r} [{self.method}]>"
