"""Relay: an upstream-shaped answer, rewritten for this client and streamed to it.

The answer may come from the upstream or (later) the cache: the relay doesn't
care. It makes every URL in the headers point back at the proxy under the
spelling the client used (challenge realm and scope, C{Location}, C{Link}),
drops what belongs to the upstream's own domain (L{client_response_headers}),
and streams the body through L{BodyPipe}: backpressure both ways, and a body
that breaks off is never finished as if complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from twisted.internet.interfaces import IReactorTime
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from .auth import rewrite_challenge
from .headers import client_response_headers, rewrite_link, rewrite_url
from .pipe import BodyPipe
from .routing import NameMap
from .upstream.pool import connection_lost_abruptly


@dataclass(frozen=True)
class ClientView:
    """How the client sees the proxy: its base URL and the token realm for this upstream."""

    base: str
    token_realm: str


def token_path(upstream_name: str, default: bool) -> str:
    """The proxy's token endpoint for an upstream (C{/token} for the default one)."""
    return "/token" if default else "/token/" + quote(upstream_name, safe=":")


_SAFE_HOST = re.compile(rb"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?")


def public_base(request: Request, public_url: str | None, by_host: bool = False) -> str:
    """The URL clients use to reach the proxy: configured, or from this request.

    A client that reached an upstream through a host name of its own must
    come back to that name (it is what selects the upstream), so only the
    configured scheme is used then. A Host header that isn't a plain host
    name (or address) and port is not believed.
    """
    if public_url and not by_host:
        return public_url.rstrip("/")
    scheme = public_url.partition("://")[0] if public_url else ("https" if request.isSecure() else "http")
    raw = request.getHeader(b"host")
    if raw is not None and _SAFE_HOST.fullmatch(raw) is not None:
        host = raw.decode("ascii")
    else:
        address = request.getHost()
        host = f"{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 80)}"
    return f"{scheme}://{host}"


def client_view(request: Request, public_url: str | None, selection: Any) -> ClientView:
    """How this client sees the proxy for the selected upstream: base URL and token realm."""
    base = public_base(request, public_url, selection.by_host)
    config = selection.upstream.config
    return ClientView(base, base + token_path(config.name, config.default or selection.by_host))


def rewrite_headers(
    response: IResponse,
    view: ClientView,
    names: NameMap,
    upstream_origin: tuple[str, str, int],
    upstream_prefix: str,
) -> Headers:
    """The upstream answer's headers as this client must see them."""
    headers = client_response_headers(response.headers)
    challenges = headers.getRawHeaders(b"www-authenticate")
    if challenges:
        headers.setRawHeaders(
            b"www-authenticate",
            [rewrite_challenge(v.decode("latin-1"), view.token_realm, names.to_client)[0].encode("latin-1") for v in challenges],
        )

    renames, prefix = (names.spelled, names.prefix) if names.url_prefix is None else ({}, names.url_prefix)

    def url_to_client(url: str) -> str:
        return rewrite_url(url, upstream_origin, upstream_prefix, view.base, renames, prefix)

    locations = headers.getRawHeaders(b"location")
    if locations:
        headers.setRawHeaders(b"location", [url_to_client(v.decode("latin-1")).encode("latin-1") for v in locations])
    links = headers.getRawHeaders(b"link")
    if links:
        headers.setRawHeaders(
            b"link", [rewrite_link(v.decode("latin-1"), url_to_client).encode("latin-1") for v in links]
        )
    return headers


def close_if_body_pending(request: Request) -> None:
    """Answering before the client sent its whole body: the connection can't carry another request."""
    pending = getattr(request, "body_pending", None)
    if pending is not None and pending() and not gone(request):
        request.channel.persistent = False
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])


def gone(request: Request) -> bool:
    """The request is answered or its client left (twisted.web drops C{channel} then)."""
    return bool(request.finished) or getattr(request, "channel", None) is None


async def stream(
    request: Request,
    response: IResponse,
    headers: Headers,
    clock: IReactorTime,
    idle_timeout: float,
    client_timeout: float,
) -> None:
    """Send status, headers and body; returns when the body is complete (fails if it broke off)."""
    close_if_body_pending(request)
    request.setResponseCode(response.code, response.phrase)
    for name, values in headers.getAllRawHeaders():
        request.responseHeaders.setRawHeaders(name, values)
    bodiless = request.method == b"HEAD" or response.code in NO_BODY_CODES
    if not bodiless and response.length is not UNKNOWN_LENGTH:
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])
    elif request.method == b"HEAD":
        # For HEAD the upstream's Content-Length is the entity's: keep it.
        length = response.headers.getRawHeaders(b"content-length")
        if length:
            request.responseHeaders.setRawHeaders(b"content-length", length[-1:])
    # An HTTP/1.0 upstream without Content-Length ends its body by closing:
    # relay it the same way. (An HTTP/1.1 one may be chunked or not; Twisted
    # doesn't say, so such a body is relayed chunked and dropped if its end
    # is in doubt.)
    close_delimited = (
        not bodiless
        and response.length is UNKNOWN_LENGTH
        and tuple(response.version[1:]) == (1, 0)
        and hasattr(request, "relay_close_delimited")
    )
    if close_delimited:
        request.relay_close_delimited()  # type: ignore[attr-defined]
    direct = getattr(response, "send_directly", None)
    if direct is not None and not bodiless:
        sending = direct(request)  # a cache hit on plain TCP: the kernel sends the file
        if sending is not None:
            # Read by the access log: the answer is over when the thread is done,
            # which may be after the client (that has every byte) hung up.
            request.sending = sending  # type: ignore[attr-defined]
            await sending
            return
    in_memory: bytes | None = getattr(response, "in_memory", None)
    if in_memory is not None:
        # A small body already here (a cached manifest): no pipe, no timers, no
        # producer to register; twisted.web buffers it for a slow client.
        if gone(request):
            return
        if in_memory and not bodiless:
            request.write(in_memory)
        request.finish()
        return
    pipe = BodyPipe(
        request, clock, idle_timeout, close_delimited, client_timeout, lambda: connection_lost_abruptly(response)
    )
    response.deliverBody(pipe)
    await pipe.done
    if not gone(request):
        request.finish()
