"""The registry API (C{/v2/...}): parse -> policy -> source -> relay, one way.

Parse (L{routing}) picks the upstream and the names; policy (L{policy}) checks
the repository and chooses whose credentials go upstream; the source
(L{source.Sources}: the cache or the upstream) gives an upstream-shaped answer;
the relay (L{relay}) rewrites it for this client and streams it.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.server import Request

from . import errors, routes
from .cache.blobs import Origin
from .cache.reader import BytesAnswer, FileAnswer
from .config import is_registry_name
from .exchange import Exchange, Served, Settings, answer, small_body
from .headers import upstream_request_headers
from .policy import Credentials, check_repository, choose_credentials, is_proxy_token, pull_scope
from .relay import client_view, rewrite_headers, stream
from .routing import Selection, UpstreamTable
from .source import Sources, from_upstream
from .upload import MAX_SMALL_BODY, BytesBody, UploadBody
from .upstream import Upstream, discard

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_UNREACHABLE = (ConnectError, DNSLookupError, TimeoutError, ResponseNeverReceived, ResponseFailed)


class RegistryAPI:
    """Answers C{/v2/...} for the configured upstreams."""

    def __init__(self, table: UpstreamTable[Served], sources: Sources, settings: Settings, clock: IReactorTime) -> None:
        self._table = table
        self._sources = sources
        self._settings = settings
        self._clock = clock

    async def handle(self, request: Request, route: routes.Route, query: bytes, exchange: Exchange) -> None:
        # parse
        selection, route = self._table.select(request.getHeader(b"host"), route, query)
        served = selection.upstream
        upstream = served.upstream
        exchange.upstream = served.config.name
        # policy
        check_repository(served.config, route.name)
        if route.kind is routes.Kind.UPLOAD_START:
            query = self._mount_source(query, selection)
        credentials = choose_credentials(request.method, route.kind, request.requestHeaders)
        exchange.credentials = credentials.value
        if route.kind is routes.Kind.PING:
            return await self._ping(request, selection, credentials, exchange)
        # source
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
        else:
            origin = Origin(
                upstream, served.tokens, route.name or "", url, headers, credentials, pull_scope(route.kind, route.name)
            )
            response, cache_status = await self._sources.answer(
                request.method, route.kind, route.reference, origin, body, served.config.tags
            )
            if cache_status is not None:
                exchange.cache = cache_status
            if not isinstance(response, (FileAnswer, BytesAnswer)):
                exchange.upstream_status = response.code
        # relay
        await self._relay(request, selection, response, exchange)

    async def _relay(self, request: Request, selection: Selection[Served], response: IResponse, exchange: Exchange) -> None:
        upstream = selection.upstream.upstream
        view = client_view(request, self._settings.public_url, selection)
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

    async def _ping(self, request: Request, selection: Selection[Served], credentials: Credentials, exchange: Exchange) -> None:
        """C{/v2/}: the upstream's answer; answered here for the proxy's own token, or from what the proxy knows."""
        if is_proxy_token(request.getHeader(b"authorization")):
            # The client holds the proxy's token: it is authenticated as far as the proxy cares.
            return answer(request, 200, b"application/json", b"{}", api_version=True)
        served = selection.upstream
        upstream = served.upstream
        try:
            response, _ = await from_upstream(
                upstream,
                served.tokens,
                request.method,
                upstream.url("/v2/", b""),
                upstream_request_headers(request.requestHeaders),
                None,
                credentials,
                "",
            )
        except _UNREACHABLE:
            if self._sources.manifests is None:
                raise
            # The upstream is down but the cache may serve: answer the ping as the upstream
            # would (clients like skopeo give up on a failed ping before asking for content).
            return self._ping_for(request, selection, exchange)
        exchange.upstream_status = response.code
        await self._relay(request, selection, response, exchange)

    def _ping_for(self, request: Request, selection: Selection[Served], exchange: Exchange) -> None:
        """/v2/ answered for an unreachable upstream from what the proxy knows of it."""
        upstream = selection.upstream.upstream
        exchange.cache = "regproxy; hit; fwd=stale"
        if upstream.scheme == "bearer":
            view = client_view(request, self._settings.public_url, selection)
            service = f',service="{upstream.service}"' if upstream.service else ""
            request.responseHeaders.setRawHeaders(
                b"www-authenticate", [f'Bearer realm="{view.token_realm}"{service}'.encode()]
            )
            body = errors.error_body("UNAUTHORIZED", "authentication required")
            return answer(request, 401, b"application/json", body, api_version=True)
        return answer(request, 200, b"application/json", b"{}", api_version=True)

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
        sending = Deferred.fromCoroutine(upstream.fetch(method, url, headers, body, timeout=0))
        timer: list[IDelayedCall] = []

        def start_timer(_: None) -> None:
            if not sending.called and upstream.response_timeout:
                timer.append(self._clock.callLater(upstream.response_timeout, sending.cancel))

        body.whole.addCallback(start_timer)
        try:
            response, _ = await sending
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
        data = small_body(request, MAX_SMALL_BODY)
        return BytesBody(data) if data else None
