"""Bearer-token auth as seen through the proxy.

The upstream's C{WWW-Authenticate} challenge names its token realm (for Docker Hub
C{auth.docker.io}); clients behind a mirror often cannot reach it, so every
challenge is rewritten to point at the proxy's own token endpoint, which forwards
to the realm learnt from the upstream. C{service} and C{scope} are kept, with
repository names in C{scope} given the spelling the client used.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass
class Challenge:
    """One C{WWW-Authenticate} challenge: a scheme and its ordered auth-params."""

    scheme: str
    params: list[tuple[str, str]] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        for k, v in self.params:
            if k.lower() == key:
                return v
        return None

    def replace(self, key: str, value: str) -> None:
        self.params = [(k, value if k.lower() == key else v) for k, v in self.params]

    def render(self) -> str:
        if not self.params:
            return self.scheme
        inner = ",".join(f'{k}="{_quote(v)}"' for k, v in self.params)
        return f"{self.scheme} {inner}"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_challenge(value: str) -> Challenge | None:
    """Parse a single-challenge C{WWW-Authenticate} value; C{None} if it isn't one we understand."""
    scheme, _, rest = value.strip().partition(" ")
    if not scheme:
        return None
    challenge = Challenge(scheme)
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if match is None or match.end() == pos:
            return None
        challenge.params.append((match[1], _unquote(match[2])))
        pos = match.end()
    return challenge


def map_scope(scope: str, rename: Callable[[str], str]) -> str:
    """Apply C{rename} to the repository names of a space-separated scope list.

    C{repository:NAME:ACTIONS} (also C{repository(plugin):...}); other resource
    types (C{registry:catalog:*}) pass unchanged. The name is everything between
    the first and the last colon, as in the token spec's grammar.
    """
    out = []
    for item in scope.split(" "):
        kind, sep, rest = item.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if sep and sep2 and kind.split("(")[0] == "repository" and name:
            item = f"{kind}:{rename(name)}:{actions}"
        out.append(item)
    return " ".join(out)


def rewrite_challenge(value: str, proxy_realm: str, rename: Callable[[str], str]) -> tuple[str, str | None]:
    """Rewrite a Bearer challenge to the proxy's realm.

    @return: the new header value and the upstream realm it named (C{None} when
        the value was not a Bearer challenge, which is then returned unchanged).
    """
    challenge = parse_challenge(value)
    if challenge is None or challenge.scheme.lower() != "bearer":
        return value, None
    realm = challenge.get("realm")
    if realm is None:
        return value, None
    challenge.replace("realm", proxy_realm)
    scope = challenge.get("scope")
    if scope is not None:
        challenge.replace("scope", map_scope(scope, rename))
    return challenge.render(), realm


def token_query(query: bytes, rename: Callable[[str], str]) -> bytes:
    """The token request's query for the upstream realm: every parameter kept, in order,
    each C{scope} (Docker repeats the parameter, one per scope) renamed."""
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    pairs = [(k, map_scope(v, rename) if k == "scope" else v) for k, v in pairs]
    return urlencode(pairs, quote_via=quote, safe="").encode("ascii")
