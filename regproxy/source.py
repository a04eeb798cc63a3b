"""Source: where an answer comes from. Today the upstream itself.

The upstream source sends the request with the credentials policy chose: the
client's own, none, or the proxy's own token for this upstream and scope. In
the last case a 401 is the upstream teaching the proxy how it authenticates
(or that a cached token went stale): the proxy learns the challenge, gets a
token and tries once more before the client sees anything. Whatever comes back
is an upstream-shaped answer (status, headers, a body to stream) for the relay.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

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
