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
from urllib.parse import parse_qsl

from .policy import new_proxy_token

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
