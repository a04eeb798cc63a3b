"""The proxy's token endpoint (C{/token}, C{/token/<upstream>}): what every rewritten challenge names.

A client that brings no credentials and asks only to pull is answered at once
with a token of the proxy's own: it grants nothing upstream, and when it comes
back the proxy uses its own upstream token instead (L{regproxy.source}). A
client with credentials (Basic, an OAuth2 password or refresh-token form, a
bearer token) or asking for more than pull is forwarded to the realm learnt
from the selected upstream itself, with every scope renamed to the upstream's
spelling and the upstream's own C{service}; so private repositories and pushes
work with the client's own rights.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IBodyProducer
from twisted.web.server import Request

from .auth import token_query
from .exchange import answer, small_body
from .headers import client_response_headers, upstream_request_headers
from .policy import Credentials, new_proxy_token
from .relay import stream
from .upload import MAX_FORM_BODY, BytesBody

#: How long a proxy token is good for; it grants nothing, so the figure is only
#: how often clients come back for a new one.
PROXY_TOKEN_SECONDS = 3600


@dataclass(frozen=True)
class TokenRequest:
    """What a token request asks for, and whether it carries credentials."""

    scopes: tuple[str, ...]
    credentials: bool

    @property
    def repository_names(self) -> list[str]:
        names = []
        for scope in self.scopes:
            for item in scope.split(" "):
                kind, sep, rest = item.partition(":")
                name, sep2, _ = rest.rpartition(":")
                if sep and sep2 and kind.split("(")[0] == "repository" and name:
                    names.append(name)
        return names

    @property
    def pull_only(self) -> bool:
        """Every scope asks for C{pull} on a repository, and nothing else (or there is no scope)."""
        for scope in self.scopes:
            for item in scope.split(" "):
                if not item:
                    continue
                kind, _, rest = item.partition(":")
                _, sep, actions = rest.rpartition(":")
                if kind.split("(")[0] != "repository" or not sep or actions != "pull":
                    return False
        return True


def parse_request(method: bytes, query: bytes, form: bytes, authorization: bool) -> TokenRequest:
    """The scopes and credentials of a GET (query) or OAuth2 POST (form) token request."""
    if method == b"POST":
        pairs = parse_qsl(form.decode("latin-1"), keep_blank_values=True)
        scopes = tuple(v for k, v in pairs if k == "scope")
        grant = {k: v for k, v in pairs}.get("grant_type", "")
        credentials = authorization or grant in ("password", "refresh_token") or "password" in dict(pairs)
        return TokenRequest(scopes, credentials)
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    return TokenRequest(tuple(v for k, v in pairs if k == "scope"), authorization)


def proxy_token_document(now: float | None = None) -> bytes:
    """A token response with a fresh proxy token (both spellings clients read)."""
    token = new_proxy_token()
    issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))
    return json.dumps(
        {"token": token, "access_token": token, "expires_in": PROXY_TOKEN_SECONDS, "issued_at": issued}
    ).encode()


class TokenEndpoint:
    """C{/token} and C{/token/<upstream>}: the proxy's own token, or the selected upstream's realm."""

    def __init__(self, table: Any, settings: Any, clock: IReactorTime) -> None:
        self._table = table
        self._settings = settings
        self._clock = clock

    async def handle(self, request: Request, suffix: str, query: bytes, exchange: Any) -> None:
        form = small_body(request, MAX_FORM_BODY) if request.method == b"POST" else b""
        asked = parse_request(request.method, query, form, request.requestHeaders.hasHeader(b"authorization"))
        selection, foreign = self._table.select_for_token(request.getHeader(b"host"), suffix, asked.repository_names)
        served = selection.upstream
        exchange.upstream = served.config.name
        if not asked.credentials and asked.pull_only:
            exchange.credentials = Credentials.PROXY.value
            return answer(request, 200, b"application/json", proxy_token_document(self._clock.seconds()))
        upstream = served.upstream
        if upstream.scheme is None:
            await upstream.discover()
        if upstream.scheme != "bearer":
            # It takes no tokens (no auth, or Basic straight on each request):
            # the proxy's own token is as good as any, whatever the client sent.
            exchange.credentials = Credentials.PROXY.value
            return answer(request, 200, b"application/json", proxy_token_document(self._clock.seconds()))
        exchange.credentials = Credentials.CLIENT.value
        realm = await upstream.token_realm()
        names = selection.names
        headers = upstream_request_headers(request.requestHeaders)
        # A refresh token is one registry's: only where the name the client logged in to means one registry.
        refresh = selection.by_host or len(self._table.upstreams) == 1
        body: IBodyProducer | None = None
        if request.method == b"GET":
            rewritten = token_query(query, names.to_upstream, foreign, upstream.service, refresh)
            url = realm + ("&" if "?" in realm else "?") + rewritten.decode("ascii") if rewritten else realm
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
