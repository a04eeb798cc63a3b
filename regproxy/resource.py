"""The proxy's twisted.web resource: the boundary, and the one-way request path.

C{render} is the one bridge from twisted.web to C{async def}. A registry
request then flows one way: parse (L{routing}: which upstream, which names) ->
policy (L{policy}: client, repository, whose credentials) -> source
(L{source}: the upstream) -> relay (L{relay}: rewrite and stream). Everything
the proxy answers by itself is OCI error JSON; every request gets one
access-log line, whoever answered it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestGenerationFailed, RequestTransmissionFailed
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from . import errors, landing, routes
from .accesslog import AccessLog, entry, request_id, timestamp
from .cache.blobs import BlobCache
from .cache.manifests import ManifestCache
from .cache.sendfile import ClientGone
from .exchange import Exchange, Served, Settings, answer
from .metrics import Metrics, record_request, status_class
from .pipe import BodyIdleTimeout, ClientLeft, ClientStalled
from .policy import RateLimiter, client_address, client_allowed
from .registry import RegistryAPI
from .relay import close_if_body_pending, gone, public_base
from .routing import UpstreamTable
from .source import Sources
from .token import TokenEndpoint
from .upstream import Upstream
from .upstream.tokens import UpstreamTokens

__all__ = ["Exchange", "RegistryProxy", "Served", "Settings"]

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
#: Answered whatever the client address rules say (load balancers, probes).
_ALWAYS_OPEN = frozenset({b"/healthz", b"/readyz"})


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
        self._registry = RegistryAPI(self._table, Sources(cache, manifests), self._settings, clock)
        self._tokens = TokenEndpoint(self._table, self._settings, clock)
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
        # A client leaving a body read from the cache fails it at once, before
        # twisted.web has marked the request gone.
        if failure.check(CancelledError, ClientLeft) or gone(request):
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
        sending: Deferred[None] | None = getattr(request, "sending", None)
        if sending is not None and not sending.called:
            # A sendfile answer still in its thread: log when it is over (with its byte count).
            def later(outcome: object) -> object:
                self._access_log(result, request, exchange)
                return outcome

            sending.addBoth(later)
            return
        now = self._clock.seconds()
        duration = now - exchange.started
        client = exchange.client if exchange.client != "-" else str(getattr(request.getClientAddress(), "host", "-"))
        if exchange.note == "" and isinstance(result, Failure):
            exchange.note = "client gone"
        # A client that left before any answer got none: nginx's 499, not the 200 twisted.web starts from.
        status = request.code if request.startedWriting or not isinstance(result, Failure) else 499
        if self.access_log is not None:
            self.access_log.write(entry(request, exchange, status, client, duration))
        else:
            # One pre-rendered field for the text, the same values as separate
            # keys for `twist --log-format=json` (which writes every key): the
            # logger's flattening of a many-field format cost more than the rest
            # of a cached manifest's answer (benchmarks/README.md, "Profiles").
            method = request.method.decode("latin-1")
            uri = request.uri.decode("latin-1")
            note = f" ({exchange.note})" if exchange.note else ""
            cached = f' cache="{exchange.cache}"' if exchange.cache != "-" else ""
            upstream = exchange.upstream_status or "-"
            self.log.info(
                "{line}",
                line=f'{client} "{method} {uri}" {status} {request.sentLength} {duration:.3f}s upstream={upstream}{note}{cached}',
                client=client,
                method=method,
                uri=uri,
                status=status,
                bytes=request.sentLength,
                duration=duration,
                upstream=upstream,
                registry=exchange.upstream,
                credentials=exchange.credentials,
                cache=exchange.cache,
                request_id=exchange.request_id,
                note=exchange.note or None,
            )
        if self.metrics is not None:
            record_request(self.metrics, request, exchange, status, duration)
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
            return await self._registry.handle(request, route, query, exchange)
        if raw_path == b"/token" or raw_path.startswith(b"/token/"):
            if method not in (b"GET", b"POST"):
                raise errors.unsupported("the token endpoint takes GET and POST", 405)
            suffix = unquote(raw_path[len(b"/token/") :].decode("latin-1")) if raw_path != b"/token" else ""
            exchange.kind = "token"
            return await self._tokens.handle(request, suffix, query, exchange)
        if raw_path == b"/healthz" and method in (b"GET", b"HEAD"):
            exchange.kind = "health"
            return answer(request, 200, b"text/plain; charset=utf-8", b"ok\n")
        if raw_path == b"/readyz" and method in (b"GET", b"HEAD"):
            exchange.kind = "health"
            ready, why = self._ready()
            return answer(request, 200 if ready else 503, b"text/plain; charset=utf-8", why.encode() + b"\n")
        if raw_path == b"/" and method in (b"GET", b"HEAD"):
            exchange.kind = "landing"
            page = landing.render(self._table.configs, public_base(request, self._settings.public_url), self.figures())
            return answer(request, 200, b"text/html; charset=utf-8", page)
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


def _cancel_when_client_leaves(failure: Failure, work: Deferred[None]) -> Failure:
    """The client disconnected: stop the upstream exchange (and its transfer)."""
    work.cancel()
    return failure


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

