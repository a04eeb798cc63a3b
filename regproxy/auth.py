"""Bearer-token auth as seen through the proxy.

The upstream's C{WWW-Authenticate} challenge names its token realm (for Docker Hub
C{auth.docker.io}); clients behind a mirror often cannot reach it, so every
challenge is rewritten to point at the proxy's own token endpoint, which forwards
to the realm learnt from the upstream. C{service} and C{scope} are kept, with
repository names in C{scope} given the spelling the client used.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
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


#: What asks a token server for a refresh token (docker login's identity token).
_OFFLINE = {("offline_token", "true"), ("access_type", "offline")}


def token_query(
    query: bytes,
    rename: Callable[[str], str],
    foreign: Collection[str] = (),
    service: str | None = None,
    refresh_tokens: bool = True,
) -> bytes:
    """The token request's query (or OAuth2 form) for the upstream realm.

    Every parameter is kept, in order, byte for byte (percent-escapes that are
    not UTF-8, a latin-1 password, survive: the text is read and written as
    latin-1); each C{scope} (Docker repeats the parameter, one per scope) is
    renamed. Scopes naming C{foreign} repositories (another upstream's) are
    dropped: this realm can't grant them. C{service} replaces the client's
    (it may have come from another upstream's challenge). Without
    C{refresh_tokens} no refresh token is asked for: one proxy name serving
    several registries can't hand out one registry's refresh token, which
    docker would then present to all of them; without one, docker keeps the
    credentials and sends them for each.
    """
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    kept: list[tuple[str, str]] = []
    for key, value in pairs:
        if not refresh_tokens and (key, value.lower()) in _OFFLINE:
            continue
        if key == "scope":
            items = [i for i in value.split(" ") if not _names_one_of(i, foreign)]
            if not items:
                continue
            value = map_scope(" ".join(items), rename)
        elif key == "service" and service:
            value = service
        kept.append((key, value))
    if service and not any(k == "service" for k, _ in kept):
        kept.append(("service", service))
    return urlencode(kept, quote_via=quote, safe="", encoding="latin-1").encode("ascii")


def _names_one_of(item: str, names: Collection[str]) -> bool:
    kind, sep, rest = item.partition(":")
    name, sep2, _ = rest.rpartition(":")
    return bool(sep and sep2 and kind.split("(")[0] == "repository" and name in names)
