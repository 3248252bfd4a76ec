"""Raw HTTP through the standalone challenge protocol in memory, answers parsed by the stdlib.

The protocol writes bytes; :func:`parse_responses` reads them back with ``http.client``, an
independent HTTP/1.1 parser, so framing mistakes (a wrong Content-Length, a body after HEAD)
show up as parse errors or wrong bodies rather than being read the way they were written.
"""

from __future__ import annotations

import http.client
import io
import urllib.parse
from typing import Any

from twisted.internet.testing import StringTransport

Parsed = tuple[int, dict[bytes, list[bytes]], bytes]


class _Stream(io.BytesIO):
    def close(self) -> None:  # http.client closes its file after each body; keep reading
        pass


class _Socket:
    def __init__(self, stream: io.BytesIO) -> None:
        self._stream = stream

    def makefile(self, *args: Any, **kwargs: Any) -> io.BytesIO:
        return self._stream


def _parse_one(stream: _Stream, method: str) -> Parsed:
    response = http.client.HTTPResponse(_Socket(stream), method=method)  # type: ignore[arg-type]
    response.begin()
    body = response.read()
    headers: dict[bytes, list[bytes]] = {}
    for name, value in response.getheaders():
        headers.setdefault(name.encode("latin-1"), []).append(value.encode("latin-1"))
    return response.status, headers, body


def parse_responses(data: bytes, methods: list[str]) -> list[Parsed]:
    """Every response in ``data`` (one per entry of ``methods``, the requests' methods, in
    order); fails if bytes are left over."""
    stream = _Stream(data)
    out = [_parse_one(stream, method) for method in methods]
    rest = stream.read()
    assert rest == b"", f"bytes after the last response: {rest[:80]!r}"
    return out


def parse_all(data: bytes, first_method: str) -> list[Parsed]:
    """Every response in ``data``: the first to a ``first_method`` request, the rest to GETs."""
    stream = _Stream(data)
    out: list[Parsed] = []
    while stream.tell() < len(data):
        out.append(_parse_one(stream, first_method if not out else "GET"))
    return out


def connect(factory: Any) -> tuple[Any, StringTransport]:
    """A protocol from ``factory`` connected to an in-memory transport."""
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def request_bytes(method: str, url: str, headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 request for ``url`` in origin form, with a Host field unless given."""
    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fields = {"Host": parts.netloc, **(headers or {})}
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n"


def raw_request(
    factory: Any, method: str, url: str, headers: dict[str, str] | None = None
) -> Parsed:
    """One request on a fresh connection; (status, headers, body)."""
    proto, transport = connect(factory)
    proto.dataReceived(request_bytes(method, url, headers))
    (parsed,) = parse_responses(transport.value(), [method])
    return parsed
