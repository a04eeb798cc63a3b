"""A small blocking HTTP client for talking to the proxy as a registry client would."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> object:
        return json.loads(self.body)

    def error_code(self) -> str:
        return json.loads(self.body)["errors"][0]["code"]  # type: ignore[no-any-return]


def connect(url: str, ca: Path | None = None, timeout: float = 60) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    assert parts.hostname
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        return http.client.HTTPSConnection(parts.hostname, parts.port, context=context, timeout=timeout)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def request(
    method: str,
    url: str,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    ca: Path | None = None,
    sink: Callable[[bytes], None] | None = None,
) -> Reply:
    """One request; with C{sink} the body is streamed to it instead of kept."""
    conn = connect(url, ca)
    parts = urlsplit(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    conn.putrequest(method, target, skip_accept_encoding=True)
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    for k, v in items:
        conn.putheader(k, v)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    data = b""
    if sink is None:
        data = response.read()
    else:
        while chunk := response.read(1 << 20):
            sink(chunk)
    conn.close()
    return Reply(response.status, response.headers, data)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def token(proxy_url: str, scopes: list[str], service: str, creds: tuple[str, str] | None = None, ca: Path | None = None) -> str:
    """Get a bearer token through the proxy's token endpoint, as docker does."""
    query = urlencode([("service", service)] + [("scope", s) for s in scopes])
    headers = {"Authorization": basic(*creds)} if creds else {}
    reply = request("GET", f"{proxy_url}/token?{query}", headers, ca=ca)
    assert reply.status == 200, reply.body
    return json.loads(reply.body)["token"]  # type: ignore[no-any-return]


def sha256_of(method: str, url: str, headers: dict[str, str], ca: Path | None = None) -> tuple[Reply, str, int]:
    h = hashlib.sha256()
    size = 0

    def sink(chunk: bytes) -> None:
        nonlocal size
        h.update(chunk)
        size += len(chunk)

    reply = request(method, url, headers, ca=ca, sink=sink)
    return reply, "sha256:" + h.hexdigest(), size
