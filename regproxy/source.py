"""Source: where an answer comes from: the upstream itself, or the cache (L{Sources}).

The upstream source sends the request with the credentials policy chose: the
client's own, none, or the proxy's own token for this upstream and scope. In
the last case a 401 is the upstream teaching the proxy how it authenticates
(or that a cached token went stale): the proxy learns the challenge, gets a
token and tries once more before the client sees anything. Whatever comes back
is an upstream-shaped answer (status, headers, a body to stream) for the relay.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from . import routes
from .policy import Credentials
from .upstream import Upstream, discard
from .upstream.tokens import UpstreamTokens

_AUTHORIZATION = b"authorization"


async def from_upstream(
    upstream: Upstream,
    tokens: UpstreamTokens,
    method: bytes,
    url: str,
    headers: Headers,
    body: IBodyProducer | None,
    credentials: Credentials,
    scope: str,
) -> tuple[IResponse, str]:
    """Fetch from the upstream with the chosen credentials; returns the answer and the URL it came from."""
    if credentials is not Credentials.CLIENT:
        headers.removeHeader(_AUTHORIZATION)  # a proxy token, or nothing: never forwarded
    if credentials is not Credentials.PROXY:
        response, source = await upstream.fetch(method, url, headers, body)
        _learn(upstream, response, source)
        return response, source
    auth = await tokens.authorization(scope)
    if auth is not None:
        headers.setRawHeaders(_AUTHORIZATION, [auth])
    response, source = await upstream.fetch(method, url, headers, body)
    _learn(upstream, response, source)
    if response.code != 401 or (auth is not None and not tokens.stale(scope)):
        # A fresh token refused: it lacks the rights; fetching another won't help.
        return response, source
    # The upstream wants credentials (a first challenge), or a token went stale.
    tokens.forget(scope)
    retry = await tokens.authorization(scope, fresh=True)
    if retry is None or retry == auth:
        return response, source
    discard(response)
    headers.setRawHeaders(_AUTHORIZATION, [retry])
    response, source = await upstream.fetch(method, url, headers, body)
    _learn(upstream, response, source)
    return response, source


def _learn(upstream: Upstream, response: IResponse, source: str) -> None:
    challenges = response.headers.getRawHeaders(b"www-authenticate")
    if challenges:
        upstream.note_challenges(challenges, source)


class Sources:
    """Which source answers a read: the cache for blobs, manifests and listings, else the upstream.

    The relay doesn't care which one answered; it gets an upstream-shaped
    answer and a C{Cache-Status} (C{None} when the cache wasn't asked).
    """

    def __init__(self, blobs: Any = None, manifests: Any = None) -> None:
        self.blobs = blobs
        self.manifests = manifests

    async def answer(
        self, method: bytes, kind: routes.Kind, reference: str | None, origin: Any, body: IBodyProducer | None, tags: Any
    ) -> tuple[IResponse, str | None]:
        reads = method in (b"GET", b"HEAD")
        if reads and self.manifests is not None and kind is routes.Kind.MANIFEST and reference is not None:
            return await self.manifests.serve(origin, reference, method, tags)  # type: ignore[no-any-return]
        if reads and self.manifests is not None and kind in (routes.Kind.TAGS, routes.Kind.CATALOG):
            return await self.manifests.listing(origin, method)  # type: ignore[no-any-return]
        if reads and self.blobs is not None and kind is routes.Kind.BLOB and reference is not None:
            return await self.blobs.serve(origin, reference, method)  # type: ignore[no-any-return]
        response, _ = await from_upstream(
            origin.upstream, origin.tokens, method, origin.url, origin.headers, body, origin.credentials, origin.scope
        )
        self._learn(method, kind, reference, origin, response)
        return response, None

    def _learn(self, method: bytes, kind: routes.Kind, reference: str | None, origin: Any, response: IResponse) -> None:
        """What a relayed answer tells the cache: a delete to forget, a right to read to remember."""
        if self.blobs is None or not origin.repository:
            return
        name = origin.upstream.name
        if method == b"DELETE" and response.code in (200, 202, 204) and reference is not None:
            # Deleted through the proxy: the cache must not go on serving it through this repository.
            self.blobs.store.unlink(name, origin.repository, reference)
        if (
            response.code == 200
            and kind in (routes.Kind.MANIFEST, routes.Kind.TAGS, routes.Kind.BLOB)
            and origin.credentials is not Credentials.NONE
        ):
            from .cache.blobs import identity

            who, ttl = identity(origin.credentials, origin.headers)
            self.blobs.note_readable(who, ttl, name, origin.repository)
