"""The proxy's twisted.web resource: the boundary, and the one-way request path.

C{render} is the one bridge from twisted.web to C{async def}. A registry
request then flows one way: parse (L{routing}: which upstream, which names) ->
policy (L{policy}: client, repository, whose credentials) -> source
(L{source}: the upstream) -> relay (L{relay}: rewrite and stream). Everything
the proxy answers by itself is OCI error JSON; every request gets one
access-log line, whoever answered it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestGenerationFailed, RequestTransmissionFailed
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from . import errors, landing, routes
from .accesslog import AccessLog, request_id, timestamp
from .auth import token_query
from .cache.blobs import BlobCache, Origin, identity
from .cache.manifests import ManifestCache
from .cache.reader import BytesAnswer, FileAnswer
from .cache.sendfile import ClientGone
from .config import Network, UpstreamConfig, is_registry_name
from .headers import client_response_headers, upstream_request_headers
from .metrics import Metrics, status_class
from .pipe import BodyIdleTimeout, ClientStalled
from .policy import (
    Credentials,
    RateLimiter,
    check_repository,
    choose_credentials,
    client_address,
    client_allowed,
    is_proxy_token,
    pull_scope,
)
from .relay import ClientView, close_if_body_pending, gone, rewrite_headers, stream, token_path
from .routing import NameMap, Selection, UpstreamTable
from .source import from_upstream
from .token import parse_request, proxy_token_document
from .upload import MAX_FORM_BODY, MAX_SMALL_BODY, BytesBody, UploadBody
from .upstream import Upstream, discard
from .upstream.tokens import UpstreamTokens

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
#: Answered whatever the client address rules say (load balancers, probes).
_ALWAYS_OPEN = frozenset({b"/healthz", b"/readyz"})


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


class RegistryProxy(Resource):
    """Answers the registry API, the token endpoint, C{/healthz} and C{/}."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        upstreams: Upstream | Sequence[Served],
        clock: IReactorTime,
        settings: Settings | None = None,
        cache: BlobCache | None = None,
        manifests: ManifestCache | None = None,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        super().__init__()
        if isinstance(upstreams, Upstream):
            upstreams = [Served(upstreams.config, upstreams, UpstreamTokens(upstreams, clock))]
        self._table: UpstreamTable[Served] = UpstreamTable((s.config, s) for s in upstreams)
        self._clock = clock
        self._settings = settings or Settings()
        self._rates = RateLimiter(self._settings.rate_limit, self._settings.rate_burst)
        self._cache = cache
        self._manifests = manifests
        self.metrics = metrics
        self.access_log = access_log
        #: Requests being answered, and whether the proxy is draining (SIGTERM).
        self.active = 0
        self.draining = False
        #: Body bytes sent to clients since start (the landing page shows it).
        self.bytes_served = 0
        self._idle_waiters: list[Deferred[None]] = []
        #: Checks /readyz makes besides draining (listeners up, cache writable).
        self.readiness: list[Callable[[], str | None]] = []

    @property
    def table(self) -> UpstreamTable[Served]:
        return self._table

    # twisted.web boundary

    def render(self, request: Request) -> int:  # type: ignore[override]
        request.defaultContentType = None
        self._cors(request)
        exchange = Exchange(started=self._clock.seconds(), request_id=request_id())
        request.responseHeaders.setRawHeaders(b"x-request-id", [exchange.request_id.encode()])
        if self.draining and getattr(request, "channel", None) is not None:
            request.channel.persistent = False  # the client should come back to another instance
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self.active += 1
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        # Asked for before the handler runs: an answer the proxy gives at once
        # (a 404, /healthz) finishes the request before fromCoroutine returns.
        finished = request.notifyFinish()
        finished.addBoth(self._access_log, request, exchange)
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
        if failure.check(CancelledError) or gone(request):
            exchange.note = exchange.note or "client gone"
            return
        upload = getattr(request, "upload", None)
        if upload is not None and isinstance(upload.error, errors.RegistryError):
            failure = Failure(upload.error)
        close_if_body_pending(request)
        if request.startedWriting or failure.check(ClientStalled, ClientGone):
            # Headers (and maybe part of the body) are out: never finish() a short
            # body, the client must see the transfer fail.
            self.log.warn(
                "{method} {uri}: {what}, dropping client: {error}",
                method=request.method.decode(),
                uri=request.uri.decode("latin-1"),
                what="client stopped reading" if failure.check(ClientStalled) else "upstream failed mid-response",
                error=failure.getErrorMessage(),
            )
            exchange.note = "truncated"
            if getattr(request, "close_delimited", False) and request.channel.transport is not None:
                # The body's end is the connection's end: only a reset says it was cut.
                request.channel.transport.abortConnection()  # type: ignore[attr-defined]
            else:
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

    def _access_log(self, result: object, request: Request, exchange: Exchange) -> None:
        """One line per request, and the request's metrics."""
        now = self._clock.seconds()
        duration = now - exchange.started
        client = exchange.client if exchange.client != "-" else str(getattr(request.getClientAddress(), "host", "-"))
        if exchange.note == "" and isinstance(result, Failure):
            exchange.note = "client gone"
        # A client that left before any answer got none: nginx's 499, not the 200 twisted.web starts from.
        status = request.code if request.startedWriting or not isinstance(result, Failure) else 499
        if self.access_log is not None:
            self.access_log.write(
                {
                    "time": timestamp(),
                    "request_id": exchange.request_id,
                    "client": client,
                    "method": request.method.decode("latin-1"),
                    "path": request.uri.decode("latin-1"),
                    "status": status,
                    "bytes": request.sentLength,
                    "duration": round(duration, 6),
                    "upstream": exchange.upstream,
                    "upstream_status": exchange.upstream_status,
                    "cache": None if exchange.cache == "-" else exchange.cache,
                    "credentials": exchange.credentials,
                    "user_agent": (request.getHeader(b"user-agent") or b"").decode("latin-1"),
                    "note": exchange.note or None,
                }
            )
        else:
            # Separate fields, so that `twist --log-format=json` gives machine-readable lines.
            self.log.info(
                '{client} "{method} {uri}" {status} {bytes} {duration:.3f}s upstream={upstream}{note}{cached}',
                client=client,
                method=request.method.decode("latin-1"),
                uri=request.uri.decode("latin-1"),
                status=status,
                bytes=request.sentLength,
                duration=duration,
                upstream=exchange.upstream_status or "-",
                registry=exchange.upstream,
                credentials=exchange.credentials,
                cache=exchange.cache,
                request_id=exchange.request_id,
                note=f" ({exchange.note})" if exchange.note else "",
                cached=f' cache="{exchange.cache}"' if exchange.cache != "-" else "",
            )
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight.dec()
            cache = _cache_label(exchange.cache)
            upstream = exchange.upstream
            metrics.requests.labels(upstream, exchange.kind, request.method.decode("latin-1")[:8], status_class(status), cache).inc()
            metrics.duration.labels(upstream, exchange.kind).observe(duration)
            if exchange.head_ready is not None:
                metrics.first_byte.labels(upstream, exchange.kind).observe(exchange.head_ready - exchange.started)
            if request.sentLength:
                metrics.client_bytes.labels(upstream, exchange.kind, cache).inc(request.sentLength)
                if exchange.relayed:
                    metrics.upstream_bytes.labels(upstream, exchange.kind).inc(request.sentLength)
        self.bytes_served += request.sentLength
        self.active -= 1
        if self.active <= 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def channel_answer(self, client: str, status: int, note: str) -> None:
        """Log a request the channel answered itself (a malformed one, a slow head, one over the limits)."""
        if self.access_log is not None:
            self.access_log.write(
                {
                    "time": timestamp(),
                    "request_id": request_id(),
                    "client": client,
                    "method": None,
                    "path": None,
                    "status": status,
                    "bytes": 0,
                    "duration": 0.0,
                    "upstream": None,
                    "upstream_status": None,
                    "cache": None,
                    "credentials": None,
                    "user_agent": None,
                    "note": note,
                }
            )
        else:
            self.log.info('{client} "- -" {status} 0 0.000s upstream=- ({note})', client=client, status=status, note=note)
        if self.metrics is not None:
            self.metrics.requests.labels("-", "other", "-", status_class(status), "none").inc()

    def idle(self) -> Deferred[None]:
        """Fires when no request is being answered (for draining)."""
        if self.active <= 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def figures(self) -> dict[str, object]:
        """Live figures for the landing page."""
        out: dict[str, object] = {"active": self.active, "draining": self.draining, "bytes_served": self.bytes_served}
        if self._cache is not None:
            counts = dict(self._cache.counts)
            if self._manifests is not None:
                counts.update({f"manifest_{k}": v for k, v in self._manifests.counts.items()})
            out["cache"] = counts
            out["cache_size"] = self._cache.store.total_size()
            out["cache_limit"] = self._cache.store.max_size
        if self._manifests is not None:
            out["budgets"] = {
                f"{upstream} ({who})": (b.remaining, b.limit)
                for (upstream, who), b in self._manifests.budgets.budgets.items()
                if who.startswith("proxy")
            }
        return out

    def _ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        for check in self.readiness:
            problem = check()
            if problem is not None:
                return False, problem
        return True, "ok"

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
        self._check_client(request, exchange, raw_path)
        if method == b"OPTIONS":
            return self._preflight(request)
        if raw_path.startswith(b"/v2"):
            try:
                path = raw_path.decode("ascii")
            except UnicodeDecodeError:
                raise errors.RegistryError(404, "NAME_UNKNOWN", "no such repository (not ASCII)") from None
            route = routes.parse(path, method)
            exchange.kind = route.kind.value
            if method not in routes.ALLOWED_METHODS[route.kind]:
                allow = b", ".join(sorted(routes.ALLOWED_METHODS[route.kind]))
                raise errors.RegistryError(
                    405, "UNSUPPORTED", f"{method.decode('latin-1')} is not allowed here", headers={b"Allow": [allow]}
                )
            return await self._registry(request, route, query, exchange)
        if raw_path == b"/token" or raw_path.startswith(b"/token/"):
            if method not in (b"GET", b"POST"):
                raise errors.unsupported("the token endpoint takes GET and POST", 405)
            suffix = unquote(raw_path[len(b"/token/") :].decode("latin-1")) if raw_path != b"/token" else ""
            exchange.kind = "token"
            return await self._token(request, suffix, query, exchange)
        if raw_path == b"/healthz" and method in (b"GET", b"HEAD"):
            exchange.kind = "health"
            return _answer(request, 200, b"text/plain; charset=utf-8", b"ok\n")
        if raw_path == b"/readyz" and method in (b"GET", b"HEAD"):
            exchange.kind = "health"
            ready, why = self._ready()
            return _answer(request, 200 if ready else 503, b"text/plain; charset=utf-8", why.encode() + b"\n")
        if raw_path == b"/" and method in (b"GET", b"HEAD"):
            exchange.kind = "landing"
            page = landing.render(self._table.configs, self.public_base(request), self.figures())
            return _answer(request, 200, b"text/html; charset=utf-8", page)
        raise errors.unsupported(f"nothing at {raw_path.decode('latin-1')!r}")

    def _check_client(self, request: Request, exchange: Exchange, raw_path: bytes) -> None:
        """The client's real address may use the proxy, at its rate."""
        settings = self._settings
        peer = str(getattr(request.getClientAddress(), "host", ""))
        exchange.client = client_address(peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for"), settings.trusted_proxies)
        if raw_path in _ALWAYS_OPEN:
            return
        if not client_allowed(exchange.client, settings.clients):
            raise errors.RegistryError(403, "DENIED", "this proxy does not serve your address")
        wait = self._rates.retry_after(exchange.client, self._clock.seconds())
        if wait > 0:
            raise errors.RegistryError(
                429,
                "TOOMANYREQUESTS",
                f"this proxy allows {settings.rate_limit:g} requests per second per client; slow down",
                headers={b"Retry-After": [b"%d" % max(1, round(wait))]},
            )

    def _preflight(self, request: Request) -> None:
        if request.responseHeaders.hasHeader(b"access-control-allow-origin"):
            for name, values in _PREFLIGHT.items():
                request.responseHeaders.setRawHeaders(name, values)
        request.responseHeaders.setRawHeaders(b"allow", [_PREFLIGHT[b"Access-Control-Allow-Methods"][0]])
        request.setResponseCode(204)
        request.finish()

    def public_base(self, request: Request, by_host: bool = False) -> str:
        """The URL clients use to reach the proxy: configured, or from this request.

        A client that reached an upstream through a host name of its own must
        come back to that name (it is what selects the upstream), so only the
        configured scheme is used then.
        """
        configured = self._settings.public_url
        if configured and not by_host:
            return configured.rstrip("/")
        scheme = configured.partition("://")[0] if configured else ("https" if request.isSecure() else "http")
        raw = request.getHeader(b"host")
        if raw is not None and _SAFE_HOST.fullmatch(raw) is not None:
            host = raw.decode("ascii")
        else:
            address = request.getHost()
            host = f"{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 80)}"
        return f"{scheme}://{host}"

    def _view(self, request: Request, selection: Selection[Served]) -> ClientView:
        base = self.public_base(request, selection.by_host)
        served = selection.upstream
        return ClientView(base, base + token_path(served.config.name, served.config.default or selection.by_host))

    # registry API

    async def _registry(self, request: Request, route: routes.Route, query: bytes, exchange: Exchange) -> None:
        selection, route = self._table.select(request.getHeader(b"host"), route, query)
        served = selection.upstream
        upstream = served.upstream
        exchange.upstream = served.config.name
        check_repository(served.config, route.name)
        if route.kind is routes.Kind.UPLOAD_START:
            query = self._mount_source(query, selection)
        credentials = choose_credentials(request.method, route.kind, request.requestHeaders)
        exchange.credentials = credentials.value
        if route.kind is routes.Kind.PING and is_proxy_token(request.getHeader(b"authorization")):
            # The client holds the proxy's token: it is authenticated as far as the proxy cares.
            return _answer(request, 200, b"application/json", b"{}", api_version=True)
        if route.kind is routes.Kind.PING and self._manifests is not None:
            try:
                response, _ = await from_upstream(
                    upstream, served.tokens, request.method, upstream.url("/v2/", b""),
                    upstream_request_headers(request.requestHeaders), None, credentials, "",
                )
            except (ConnectError, DNSLookupError, TimeoutError, ResponseNeverReceived, ResponseFailed):
                # The upstream is down but the cache may serve: answer the ping as the upstream
                # would (clients like skopeo give up on a failed ping before asking for content).
                return self._ping_for(request, selection, exchange)
            exchange.upstream_status = response.code
            view = self._view(request, selection)
            exchange.head_ready = self._clock.seconds()
            await stream(
                request, response, rewrite_headers(response, view, selection.names, upstream.origin, upstream.prefix),
                self._clock, self._settings.idle_timeout, self._settings.client_timeout,
            )
            return
        url = upstream.url(route.upstream_path(route.name), query)
        headers = upstream_request_headers(request.requestHeaders)
        body = self._body(request)
        if isinstance(body, UploadBody):
            if credentials is not Credentials.CLIENT:
                headers.removeHeader(b"authorization")
            response = await self._fetch_upload(upstream, request.method, url, headers, body)
            exchange.upstream_status = response.code
            body.answered = True
            if body.error is not None:
                # The upload broke off on our side (size limit): whatever the
                # upstream made of the cut body is not the answer.
                discard(response)
                raise body.error
        elif self._manifests is not None and route.kind is routes.Kind.MANIFEST and request.method in (b"GET", b"HEAD"):
            assert route.name is not None and route.reference is not None
            origin = Origin(upstream, served.tokens, route.name, url, headers, credentials, pull_scope(route.kind, route.name))
            response, exchange.cache = await self._manifests.serve(
                origin, route.reference, request.method, served.config.tags
            )
            if not isinstance(response, BytesAnswer):
                exchange.upstream_status = response.code
        elif (
            self._manifests is not None
            and route.kind in (routes.Kind.TAGS, routes.Kind.CATALOG)
            and request.method in (b"GET", b"HEAD")
        ):
            origin = Origin(upstream, served.tokens, route.name or "", url, headers, credentials, pull_scope(route.kind, route.name))
            response, exchange.cache = await self._manifests.listing(origin, request.method)
            exchange.upstream_status = response.code
        elif self._cache is not None and route.kind is routes.Kind.BLOB and request.method in (b"GET", b"HEAD"):
            assert route.name is not None and route.reference is not None
            origin = Origin(upstream, served.tokens, route.name, url, headers, credentials, pull_scope(route.kind, route.name))
            response, exchange.cache = await self._cache.serve(origin, route.reference, request.method)
            if not isinstance(response, FileAnswer):
                exchange.upstream_status = response.code
        else:
            scope = pull_scope(route.kind, route.name)
            response, _ = await from_upstream(
                upstream, served.tokens, request.method, url, headers, body, credentials, scope
            )
            exchange.upstream_status = response.code
            if (
                self._cache is not None
                and request.method == b"DELETE"
                and response.code in (200, 202, 204)
                and route.name is not None
                and route.reference is not None
            ):
                # Deleted through the proxy: the cache must not go on serving it through this repository.
                self._cache.store.unlink(upstream.name, route.name, route.reference)
            if (
                self._cache is not None
                and response.code == 200
                and route.name is not None
                and route.kind in (routes.Kind.MANIFEST, routes.Kind.TAGS, routes.Kind.BLOB)
                and credentials is not Credentials.NONE
            ):
                who, ttl = identity(credentials, headers)
                self._cache.note_readable(who, ttl, upstream.name, route.name)
        view = self._view(request, selection)
        exchange.head_ready = self._clock.seconds()
        exchange.relayed = not isinstance(response, (FileAnswer, BytesAnswer))
        await stream(
            request,
            response,
            rewrite_headers(response, view, selection.names, upstream.origin, upstream.prefix),
            self._clock,
            self._settings.idle_timeout,
            self._settings.client_timeout,
        )

    def _ping_for(self, request: Request, selection: Selection[Served], exchange: Exchange) -> None:
        """/v2/ answered for an unreachable upstream from what the proxy knows of it."""
        upstream = selection.upstream.upstream
        exchange.cache = "regproxy; hit; fwd=stale"
        if upstream.scheme == "bearer":
            view = self._view(request, selection)
            service = f',service="{upstream.service}"' if upstream.service else ""
            request.responseHeaders.setRawHeaders(b"www-authenticate", [f'Bearer realm="{view.token_realm}"{service}'.encode()])
            body = errors.error_body("UNAUTHORIZED", "authentication required")
            return _answer(request, 401, b"application/json", body, api_version=True)
        return _answer(request, 200, b"application/json", b"{}", api_version=True)

    def _mount_source(self, query: bytes, selection: Selection[Served]) -> bytes:
        """A cross-repository mount's C{from=} in the upstream's spelling; from another upstream, no mount.

        A mount across two upstreams can't be done by either: the mount is not
        attempted and the upload starts as an ordinary one (202), which the
        distribution spec lets a registry answer to any mount it can't do.
        """
        if b"from=" not in query:
            return query
        parts = query.split(b"&")
        out = []
        foreign = False
        for part in parts:
            key, sep, value = part.partition(b"=")
            if key == b"from" and sep:
                name = unquote(value.decode("latin-1"))
                first, slash, _ = name.partition("/")
                if slash and is_registry_name(first) and not selection.by_host:
                    found = self._table.by_name(first)
                    if found is None or found[1] is not selection.upstream:
                        foreign = True
                        continue
                renamed = selection.names.to_upstream(name)
                part = b"from=" + quote(renamed, safe="/").encode("ascii")
            out.append(part)
        if foreign:
            out = [p for p in out if not p.startswith(b"mount=")]
        return b"&".join(out)

    async def _fetch_upload(
        self, upstream: Upstream, method: bytes, url: str, headers: Headers, body: UploadBody
    ) -> IResponse:
        """Send a streamed upload; the response timeout runs from the end of the client's body.

        An upload takes as long as the client takes to send it, so the usual
        timeout can't start with the request; but once the whole body is in, an
        upstream that never answers must not hold the client forever.
        """
        exchange = Deferred.fromCoroutine(upstream.fetch(method, url, headers, body, timeout=0))
        timer: list[IDelayedCall] = []

        def start_timer(_: None) -> None:
            if not exchange.called and upstream.response_timeout:
                timer.append(self._clock.callLater(upstream.response_timeout, exchange.cancel))

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

    # token endpoint

    async def _token(self, request: Request, suffix: str, query: bytes, exchange: Exchange) -> None:
        form = _small_body(request, MAX_FORM_BODY) if request.method == b"POST" else b""
        asked = parse_request(request.method, query, form, request.requestHeaders.hasHeader(b"authorization"))
        selection, foreign = self._table.select_for_token(request.getHeader(b"host"), suffix, asked.repository_names)
        served = selection.upstream
        exchange.upstream = served.config.name
        if not asked.credentials and asked.pull_only:
            exchange.credentials = Credentials.PROXY.value
            return _answer(request, 200, b"application/json", proxy_token_document(self._clock.seconds()))
        upstream = served.upstream
        if upstream.scheme is None:
            await upstream.discover()
        if upstream.scheme != "bearer":
            # It takes no tokens (no auth, or Basic straight on each request):
            # the proxy's own token is as good as any, whatever the client sent.
            exchange.credentials = Credentials.PROXY.value
            return _answer(request, 200, b"application/json", proxy_token_document(self._clock.seconds()))
        exchange.credentials = Credentials.CLIENT.value
        realm = await upstream.token_realm()
        names: NameMap = selection.names
        headers = upstream_request_headers(request.requestHeaders)
        # A refresh token is one registry's: only where the name the client logged in to means one registry.
        refresh = selection.by_host or len(self._table.upstreams) == 1
        if request.method == b"GET":
            rewritten = token_query(query, names.to_upstream, foreign, upstream.service, refresh)
            url = realm + ("&" if "?" in realm else "?") + rewritten.decode("ascii") if rewritten else realm
            body: IBodyProducer | None = None
        else:
            url = realm
            body = BytesBody(token_query(form, names.to_upstream, foreign, upstream.service, refresh))
        response = await upstream.send(request.method, url, headers, body)
        exchange.upstream_status = response.code
        exchange.head_ready = self._clock.seconds()
        await stream(
            request,
            response,
            client_response_headers(response.headers),
            self._clock,
            self._settings.idle_timeout,
            self._settings.client_timeout,
        )


def _cache_label(status: str) -> str:
    """A cache status as a metric label: hit, stored, collapsed, revalidated, stale, passed, or none."""
    if status == "-":
        return "none"
    if "fwd=stale" in status:
        return "stale"
    for label in ("revalidated", "collapsed", "stored"):
        if label in status:
            return label
    return "hit" if "hit" in status else "passed"


def _cancel_when_client_leaves(failure: Failure, work: Deferred[None]) -> Failure:
    """The client disconnected: stop the upstream exchange (and its transfer)."""
    work.cancel()
    return failure


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


def _answer(request: Request, code: int, content_type: bytes, body: bytes, api_version: bool = False) -> None:
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    if api_version:
        request.responseHeaders.setRawHeaders(*errors.API_VERSION_HEADER)
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

