"""What travels with one request along the path, and what the steps share.

L{Exchange} is the per-request context: the route's kind, the upstream,
whose credentials, the cache status, the timings. Every step fills in what
it learns; the access log and the metrics read it at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.web.server import Request

from . import errors
from .config import Network, UpstreamConfig
from .upstream import Upstream
from .upstream.tokens import UpstreamTokens


@dataclass
class Exchange:
    """What the access log and the metrics say about one request."""

    started: float = 0.0
    request_id: str = ""
    upstream_status: int | None = None
    note: str = ""
    upstream: str = "-"
    credentials: str = "-"
    client: str = "-"
    cache: str = "-"
    kind: str = "other"
    #: When the answer's head was ready (time to first byte).
    head_ready: float | None = None
    #: The body came from the upstream as it is (not from the cache).
    relayed: bool = False


@dataclass
class Settings:
    """Request-handling settings that come from configuration."""

    public_url: str | None = None
    idle_timeout: float = 120.0
    #: A client that leaves its download unread this long is dropped (slow read).
    client_timeout: float = 120.0
    #: Browser origins allowed to read answers (CORS); none by default.
    cors_origins: frozenset[str] = frozenset()
    #: Client addresses allowed (all if empty), and proxies whose X-Forwarded-For is believed.
    clients: Sequence[Network] = ()
    trusted_proxies: Sequence[Network] = ()
    #: Requests per second per client address (0: no limit) and the burst allowed.
    rate_limit: float = 0.0
    rate_burst: float = 0.0


@dataclass
class Served:
    """One configured upstream at run time: its configuration, client and own tokens."""

    config: UpstreamConfig
    upstream: Upstream
    tokens: UpstreamTokens
    #: Its connection pools (closed when the proxy stops).
    pools: list[Any] = field(default_factory=list)


def answer(request: Request, code: int, content_type: bytes, body: bytes, api_version: bool = False) -> None:
    """A complete small answer the proxy gives itself."""
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    if api_version:
        request.responseHeaders.setRawHeaders(*errors.API_VERSION_HEADER)
    request.write(body)
    request.finish()


def small_body(request: Request, limit: int) -> bytes:
    """A (buffered, bounded) request body; the request classes refuse larger ones before reading them."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read(limit + 1)
    if len(data) > limit:
        raise errors.RegistryError(413, "SIZE_INVALID", f"request body larger than {limit} bytes")
    return data
