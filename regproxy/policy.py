"""Policy: who may ask, for which repositories, with whose credentials upstream.

Decided after routing and before any upstream request, from configuration only:

* the client's real address (C{X-Forwarded-For} is believed only from the
  configured trusted proxies) against the optional client allow list, and a
  per-client request rate (token bucket, off by default);
* the repository against the upstream's C{allow}/C{deny} globs (C{*} within a
  path component, C{**} across them); denied is a C{403 DENIED}, no upstream
  request;
* whose credentials go upstream: the client's own when it brings any; else,
  for reads only, the proxy's own token for that upstream (anonymous, or the
  operator's account). The token the proxy hands anonymous clients grants
  nothing upstream and is never forwarded.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from twisted.web.http_headers import Headers

from . import errors, routes
from .config import Network, UpstreamConfig

#: Prefix of the tokens the proxy hands anonymous clients; they never leave the proxy.
PROXY_TOKEN_PREFIX = "regproxy-anonymous."

#: Endpoints an anonymous client may read with the proxy's own upstream token.
_PULL_KINDS = frozenset({routes.Kind.MANIFEST, routes.Kind.BLOB, routes.Kind.TAGS, routes.Kind.REFERRERS})
_READS = frozenset({b"GET", b"HEAD"})


def new_proxy_token() -> str:
    return PROXY_TOKEN_PREFIX + secrets.token_urlsafe(24)


def is_proxy_token(authorization: bytes | None) -> bool:
    """Whether an C{Authorization} value carries a token this proxy handed out."""
    if authorization is None:
        return False
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and token.strip().startswith(PROXY_TOKEN_PREFIX.encode())


class Credentials(Enum):
    """Whose credentials a request goes upstream with."""

    CLIENT = "client"  # the client's own Authorization, passed through
    PROXY = "proxy"  # the proxy's own token for this upstream and scope
    NONE = "none"  # nothing (a write from a client that brought no credentials)


def choose_credentials(method: bytes, kind: routes.Kind, headers: Headers) -> Credentials:
    """The client's credentials if it has any of its own; the proxy's for reads; else none."""
    values = headers.getRawHeaders(b"authorization")
    if values and not is_proxy_token(values[0]):
        return Credentials.CLIENT
    if method in _READS and kind in _PULL_KINDS:
        return Credentials.PROXY
    return Credentials.NONE


def pull_scope(kind: routes.Kind, upstream_name: str | None) -> str:
    """The token scope a read of this endpoint needs."""
    if kind is routes.Kind.CATALOG:
        return "registry:catalog:*"
    if upstream_name is None:
        return ""
    return f"repository:{upstream_name}:pull"


# repositories


@lru_cache(maxsize=1024)
def repository_glob(pattern: str) -> re.Pattern[str]:
    """C{*} matches within one path component, C{**} across components."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def repository_allowed(config: UpstreamConfig, name: str) -> bool:
    """Whether clients may use repository C{name} (the upstream's spelling) of this upstream."""
    if any(repository_glob(p).fullmatch(name) for p in config.deny):
        return False
    return not config.allow or any(repository_glob(p).fullmatch(name) for p in config.allow)


def check_repository(config: UpstreamConfig, name: str | None) -> None:
    if name is not None and not repository_allowed(config, name):
        raise errors.RegistryError(403, "DENIED", f"this proxy does not serve {config.name}/{name}")


# clients


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Sequence[Network]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def client_address(peer: str, forwarded_for: Sequence[bytes] | None, trusted: Sequence[Network]) -> str:
    """The real client address: C{X-Forwarded-For} walked from the right while the hop is a trusted proxy."""
    address = _address(peer)
    if address is None or not trusted or not _within(address, trusted):
        return peer
    hops = [h.strip() for value in forwarded_for or [] for h in value.decode("latin-1").split(",")]
    for hop in reversed(hops):
        found = _address(hop)
        if found is None:
            return str(address)
        address = found
        if not _within(address, trusted):
            return str(address)
    return str(address)


def client_allowed(address: str, allowed: Sequence[Network]) -> bool:
    if not allowed:
        return True
    found = _address(address)
    return found is not None and _within(found, allowed)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Requests per second per client, as a token bucket; bounded memory (least recently seen go first)."""

    def __init__(self, rate: float, burst: float = 0.0, max_clients: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst or max(rate * 2, 1.0)
        self._max = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def retry_after(self, client: str, now: float) -> float:
        """0 if the request may go now; else the seconds until it could."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        self._buckets[client] = bucket
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate
