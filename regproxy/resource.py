"""The proxy's twisted.web resource: routing, forwarding, answering.

C{render} is the one bridge from twisted.web to C{async def}; everything the
proxy answers by itself is OCI error JSON, and every upstream answer is passed
on through L{BodyPipe} with the URLs in it pointing back at the proxy.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestGenerationFailed, RequestTransmissionFailed
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from . import errors, routes
from .auth import rewrite_challenge, token_query
from .headers import client_response_headers, rewrite_link, rewrite_url, upstream_request_headers
from .names import upstream_name
from .pipe import BodyIdleTimeout, BodyPipe
from .upload import MAX_FORM_BODY, MAX_SMALL_BODY, BytesBody, UploadBody
from .upstream import Upstream, discard

#: CORS, for configured origins only: a wildcard would let any web page read
#: what the proxy serves to the browser's network (an intranet registry, say).
_CORS_EXPOSE = (
    b"Docker-Content-Digest, Docker-Distribution-API-Version, Docker-Upload-UUID, "
    b"WWW-Authenticate, Location, Link, Range, Content-Range, Content-Length, "
    b"OCI-Subject, OCI-Filters-Applied, OCI-Chunk-Min-Length"
)
_PREFLIGHT = {
    b"Access-Control-Allow-Methods": [b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"],
    b"Access-Control-Allow-Headers": [
        b"Authorization, Accept, Content-Type, Content-Range, Range, If-None-Match, "
        b"If-Match, Docker-Distribution-API-Version"
    ],
    b"Access-Control-Max-Age": [b"86400"],
}
_SAFE_HOST = re.compile(rb"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?")
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


@dataclass
class Exchange:
    """What the access log says about one request."""

    upstream_status: int | None = None
    note: str = ""


@dataclass
class Settings:
    """Request-handling settings that come from configuration."""

    public_url: str | None = None
    idle_timeout: float = 120.0
    #: A client that leaves its download unread this long is dropped (slow read).
    client_timeout: float = 120.0
    #: Browser origins allowed to read answers (CORS); none by default.
    cors_origins: frozenset[str] = frozenset()


class RegistryProxy(Resource):
    """Answers the registry API, the token endpoint, C{/healthz} and C{/}."""

    isLeaf = True
    log = Logger()

    def __init__(self, upstream: Upstream, clock: IReactorTime, settings: Settings | None = None) -> None:
        super().__init__()
        self._upstream = upstream
        self._clock = clock
        self._settings = settings or Settings()

    # twisted.web boundary

    def render(self, request: Request) -> int:  # type: ignore[override]
        request.defaultContentType = None
        self._cors(request)
        exchange = Exchange()
        started = self._clock.seconds()
        # Asked for before the handler runs: an answer the proxy gives at once
        # (a 404, /healthz) finishes the request before fromCoroutine returns.
        finished = request.notifyFinish()
        finished.addBoth(self._access_log, request, exchange, started)
        d = Deferred.fromCoroutine(self._handle(request, exchange))
        d.addErrback(self._failed, request, exchange)
        finished.addErrback(_cancel_when_client_leaves, d)
        return NOT_DONE_YET

    def _cors(self, request: Request) -> None:
        origin = request.getHeader(b"origin")
        if origin is None or not self._settings.cors_origins:
            return
        request.responseHeaders.setRawHeaders(b"vary", [b"Origin"])
        if origin.decode("latin-1") in self._settings.cors_origins:
            request.responseHeaders.setRawHeaders(b"access-control-allow-origin", [origin])
            request.responseHeaders.setRawHeaders(b"access-control-expose-headers", [_CORS_EXPOSE])

    def _failed(self, failure: Failure, request: Request, exchange: Exchange) -> None:
        """Turn whatever went wrong into the right answer, or a dropped connection."""
        if failure.check(CancelledError) or _gone(request):
            exchange.note = exchange.note or "client gone"
            return
        upload = getattr(request, "upload", None)
        if upload is not None and isinstance(upload.error, errors.RegistryError):
            failure = Failure(upload.error)
        _close_if_body_pending(request)
        if request.startedWriting:
            # Headers (and maybe part of the body) are out: never finish() a short
            # body, the client must see the transfer fail.
            self.log.warn(
                "{method} {uri}: upstream failed mid-response, dropping client: {error}",
                method=request.method.decode(),
                uri=request.uri.decode("latin-1"),
                error=failure.getErrorMessage(),
            )
            exchange.note = "truncated"
            request.loseConnection()
            return
        error = _as_registry_error(failure)
        if error.code == "UNKNOWN":
            self.log.failure(
                "{method} {uri}: unexpected error",
                failure,
                method=request.method.decode(),
                uri=request.uri.decode("latin-1"),
            )
        elif error.status >= 500 and not failure.check(errors.RegistryError):
            self.log.warn(
                "{method} {uri}: {status} {error}",
                method=request.method.decode(),
                uri=request.uri.decode("latin-1"),
                status=error.status,
                error=failure.getErrorMessage(),
            )
        exchange.note = error.code
        errors.write_error(request, error)

    def _access_log(self, result: object, request: Request, exchange: Exchange, started: float) -> None:
        # Separate fields, so that `twist --log-format=json` gives machine-readable lines.
        self.log.info(
            '{client} "{method} {uri}" {status} {bytes} {duration:.3f}s upstream={upstream}{note}',
            client=getattr(request.getClientAddress(), "host", "-"),
            method=request.method.decode("latin-1"),
            uri=request.uri.decode("latin-1"),
            status=request.code,
            bytes=request.sentLength,
            duration=self._clock.seconds() - started,
            upstream=exchange.upstream_status or "-",
            note=f" ({exchange.note})" if exchange.note else "",
        )

    # dispatch

    async def _handle(self, request: Request, exchange: Exchange) -> None:
        refused = getattr(request, "body_error", None)
        if refused is not None:
            raise refused
        method = request.method
        raw_path, _, query = request.uri.partition(b"?")
        if method == b"CONNECT" or not raw_path.startswith(b"/"):
            raise errors.RegistryError(
                400, "UNSUPPORTED", "this is a registry, not a forward proxy: origin-form requests only"
            )
        if method == b"OPTIONS":
            return self._preflight(request)
        if raw_path.startswith(b"/v2"):
            try:
                path = raw_path.decode("ascii")
            except UnicodeDecodeError:
                raise errors.name_invalid(raw_path.decode("latin-1")) from None
            route = routes.parse(path, method)
            if method not in routes.ALLOWED_METHODS[route.kind]:
                allow = b", ".join(sorted(routes.ALLOWED_METHODS[route.kind]))
                raise errors.RegistryError(
                    405, "UNSUPPORTED", f"{method.decode('latin-1')} is not allowed here", headers={b"Allow": [allow]}
                )
            return await self._registry(request, route, query, exchange)
        if raw_path == b"/token":
            if method not in (b"GET", b"POST"):
                raise errors.unsupported("the token endpoint takes GET and POST", 405)
            return await self._token(request, query, exchange)
        if raw_path == b"/healthz" and method in (b"GET", b"HEAD"):
            return _answer(request, 200, b"text/plain; charset=utf-8", b"ok\n")
        if raw_path == b"/" and method in (b"GET", b"HEAD"):
            return _answer(request, 200, b"text/html; charset=utf-8", self._landing(request))
        raise errors.unsupported(f"nothing at {raw_path.decode('latin-1')!r}")

    def _preflight(self, request: Request) -> None:
        if request.responseHeaders.hasHeader(b"access-control-allow-origin"):
            for name, values in _PREFLIGHT.items():
                request.responseHeaders.setRawHeaders(name, values)
        request.responseHeaders.setRawHeaders(b"allow", [_PREFLIGHT[b"Access-Control-Allow-Methods"][0]])
        request.setResponseCode(204)
        request.finish()

    def public_base(self, request: Request) -> str:
        """The URL clients use to reach the proxy: configured, or from this request."""
        if self._settings.public_url:
            return self._settings.public_url.rstrip("/")
        scheme = "https" if request.isSecure() else "http"
        raw = request.getHeader(b"host")
        if raw is not None and _SAFE_HOST.fullmatch(raw) is not None:
            host = raw.decode("ascii")
        else:
            address = request.getHost()
            host = f"{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 80)}"
        return f"{scheme}://{host}"

    # registry API

    async def _registry(self, request: Request, route: routes.Route, query: bytes, exchange: Exchange) -> None:
        upstream = self._upstream
        names: dict[str, str] = {}
        up_name: str | None = None
        if route.name is not None:
            self._check_namespace(query)
            up_name = upstream_name(route.name, upstream.library_prefix)
            names[up_name] = route.name
        if route.kind is routes.Kind.UPLOAD_START and upstream.library_prefix:
            query = rename_mount_source(query)
        url = upstream.url(route.upstream_path(up_name), query)
        headers = upstream_request_headers(request.requestHeaders)
        body = self._body(request)
        if isinstance(body, UploadBody):
            response = await self._fetch_upload(request.method, url, headers, body)
            exchange.upstream_status = response.code
            body.answered = True
            if body.error is not None:
                # The upload broke off on our side (size limit): whatever the
                # upstream made of the cut body is not the answer.
                discard(response)
                raise body.error
        else:
            response, url = await upstream.fetch(request.method, url, headers, body)
            exchange.upstream_status = response.code
        await self._relay(request, response, names, url)

    async def _fetch_upload(self, method: bytes, url: str, headers: Headers, body: UploadBody) -> IResponse:
        """Send a streamed upload; the response timeout runs from the end of the client's body.

        An upload takes as long as the client takes to send it, so the usual
        timeout can't start with the request; but once the whole body is in, an
        upstream that never answers must not hold the client forever.
        """
        exchange = Deferred.fromCoroutine(self._upstream.fetch(method, url, headers, body, timeout=0))
        timer: list[IDelayedCall] = []

        def start_timer(_: None) -> None:
            if not exchange.called and self._upstream.response_timeout:
                timer.append(self._clock.callLater(self._upstream.response_timeout, exchange.cancel))

        body.whole.addCallback(start_timer)
        try:
            response, _ = await exchange
        except CancelledError:
            if timer and not timer[0].active():
                raise TimeoutError("no upstream response after the upload body") from None
            raise  # the client left
        finally:
            if timer and timer[0].active():
                timer[0].cancel()
        return response

    def _check_namespace(self, query: bytes) -> None:
        """containerd names the registry it mirrors in C{?ns=}: serve only the ones we front."""
        if b"ns=" not in query:
            return
        for key, value in parse_qsl(query.decode("latin-1")):
            if key == "ns" and value.lower() not in self._upstream.namespaces:
                raise errors.RegistryError(404, "NAME_UNKNOWN", f"this proxy does not mirror the registry {value!r}")

    def _body(self, request: Request) -> IBodyProducer | None:
        if request.method not in _BODY_METHODS:
            return None
        upload = getattr(request, "upload", None)
        if upload is not None:
            if upload.error is not None:
                raise upload.error
            return upload  # type: ignore[no-any-return]
        data = _small_body(request, MAX_SMALL_BODY)
        return BytesBody(data) if data else None

    async def _relay(self, request: Request, response: IResponse, names: dict[str, str], source: str) -> None:
        """Pass an upstream response on: status, rewritten headers, streamed body."""
        upstream = self._upstream
        base = self.public_base(request)
        headers = client_response_headers(response.headers)

        def to_client(name: str) -> str:
            return names.get(name, name)

        challenges = headers.getRawHeaders(b"www-authenticate")
        if challenges:
            rewritten = []
            for value in challenges:
                new, realm = rewrite_challenge(value.decode("latin-1"), base + "/token", to_client)
                if realm is not None:
                    upstream.note_challenge(realm, source)
                rewritten.append(new.encode("latin-1"))
            headers.setRawHeaders(b"www-authenticate", rewritten)

        def url_to_client(url: str) -> str:
            return rewrite_url(url, upstream.origin, upstream.prefix, base, names)

        locations = headers.getRawHeaders(b"location")
        if locations:
            headers.setRawHeaders(
                b"location", [url_to_client(v.decode("latin-1")).encode("latin-1") for v in locations]
            )
        links = headers.getRawHeaders(b"link")
        if links:
            headers.setRawHeaders(
                b"link", [rewrite_link(v.decode("latin-1"), url_to_client).encode("latin-1") for v in links]
            )
        await self._stream(request, response, headers)

    async def _stream(self, request: Request, response: IResponse, headers: Headers) -> None:
        _close_if_body_pending(request)
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
        pipe = BodyPipe(
            request, self._clock, self._settings.idle_timeout, close_delimited, self._settings.client_timeout
        )
        response.deliverBody(pipe)
        await pipe.done
        if not _gone(request):
            request.finish()

    # token endpoint

    async def _token(self, request: Request, query: bytes, exchange: Exchange) -> None:
        upstream = self._upstream

        def to_upstream(name: str) -> str:
            return upstream_name(name, upstream.library_prefix)

        realm = await upstream.token_realm()
        headers = upstream_request_headers(request.requestHeaders)
        body: IBodyProducer | None = None
        if request.method == b"GET":
            url = realm
            if query:
                url += ("&" if "?" in realm else "?") + token_query(query, to_upstream).decode("ascii")
        else:
            url = realm
            body = BytesBody(token_query(_small_body(request, MAX_FORM_BODY), to_upstream))
        response = await upstream.send(request.method, url, headers, body)
        exchange.upstream_status = response.code
        await self._stream(request, response, client_response_headers(response.headers))

    # landing page

    def _landing(self, request: Request) -> bytes:
        base = html.escape(self.public_base(request))
        upstream = html.escape(self._upstream.base)
        snippet = html.escape(json.dumps({"registry-mirrors": [self.public_base(request)]}, indent=2))
        host = html.escape(self.public_base(request).split("://", 1)[1])
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>regproxy</title></head><body>"
            f"<h1>regproxy</h1><p>A Docker/OCI registry proxy for <code>{upstream}</code>.</p>"
            f"<p>Docker: put this in <code>/etc/docker/daemon.json</code> and restart dockerd:</p>"
            f"<pre>{snippet}</pre>"
            f"<p>Or pull directly: <code>docker pull {host}/library/alpine:latest</code></p>"
            f'<p>containerd (<code>hosts.toml</code>): <code>[host."{base}"] capabilities = ["pull", "resolve"]</code></p>'
            "<p>Health: <a href='/healthz'>/healthz</a></p></body></html>\n"
        ).encode()


def rename_mount_source(query: bytes) -> bytes:
    """Give a cross-repository mount's C{from=} the upstream spelling (C{alpine} ->
    C{library/alpine}), leaving the rest of the query byte for byte."""
    parts = query.split(b"&")
    for i, part in enumerate(parts):
        key, sep, value = part.partition(b"=")
        if key == b"from" and sep:
            name = unquote(value.decode("latin-1"))
            renamed = upstream_name(name, True)
            if renamed != name:
                parts[i] = b"from=" + quote(renamed, safe="/").encode("ascii")
    return b"&".join(parts)


def _cancel_when_client_leaves(failure: Failure, work: Deferred[None]) -> Failure:
    """The client disconnected: stop the upstream exchange (and its transfer)."""
    work.cancel()
    return failure


def _gone(request: Request) -> bool:
    """The request is answered or its client left (twisted.web drops C{channel} then)."""
    return bool(request.finished) or getattr(request, "channel", None) is None


def _close_if_body_pending(request: Request) -> None:
    """Answering before the client sent its whole body: the connection can't carry another request."""
    pending = getattr(request, "body_pending", None)
    if pending is not None and pending() and not _gone(request):
        request.channel.persistent = False
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])


def _small_body(request: Request, limit: int) -> bytes:
    """A (buffered, bounded) request body; the request classes refuse larger ones before reading them."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read(limit + 1)
    if len(data) > limit:
        raise errors.RegistryError(413, "SIZE_INVALID", f"request body larger than {limit} bytes")
    return data


def _answer(request: Request, code: int, content_type: bytes, body: bytes) -> None:
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


def _as_registry_error(failure: Failure) -> errors.RegistryError:
    """The answer for a failure that happened before anything was sent to the client."""
    if failure.check(errors.RegistryError):
        return failure.value  # type: ignore[return-value]
    if failure.check(TimeoutError, ConnectTimeout, BodyIdleTimeout):
        return errors.RegistryError(504, "UNAVAILABLE", "upstream registry timed out")
    if failure.check(
        ConnectError,
        DNSLookupError,
        ResponseNeverReceived,
        ResponseFailed,
        RequestTransmissionFailed,
        RequestGenerationFailed,
    ):
        return errors.RegistryError(502, "UNAVAILABLE", f"upstream registry unreachable: {_reason(failure)}")
    return errors.RegistryError(500, "UNKNOWN", "internal proxy error")


def _reason(failure: Failure) -> str:
    reasons: list[Failure] = getattr(failure.value, "reasons", []) or [failure]
    return "; ".join(r.getErrorMessage() for r in reasons)[:300]
