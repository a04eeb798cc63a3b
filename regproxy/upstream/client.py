"""One configured upstream registry and the exchanges with it.

The upstream is fixed by configuration: the request only supplies a path below
it, so the proxy can never be made to dial an arbitrary host. Redirects the
upstream answers (Docker Hub sends blob GETs to a CDN with a 307) are followed
here, under the outbound policy, and credentials never travel to a host other
than the registry.

The relay uses the raw Twisted C{Agent}, not treq: treq always adds gzip
decoding and a cookie jar and re-encodes URLs, and the relay must pass bytes,
headers and URLs through exactly. treq serves the requests the proxy makes on
its own behalf (L{regproxy.upstream.tokens}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import treq
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse

from .. import errors
from ..auth import Challenge, parse_challenge
from ..config import UpstreamConfig, single_upstream
from ..headers import origin, without_credentials
from ..outbound import OutboundPolicy

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def ascii_url(raw: bytes) -> str:
    """A URL from a header, with any byte that can't stand in a URL percent-encoded.

    Upstreams sometimes send raw UTF-8 in C{Location}; browsers encode it the same way.
    """
    return "".join(chr(b) if 0x20 < b < 0x7F else f"%{b:02X}" for b in raw)


def timed_out(result: object, timeout: float) -> object:
    """C{addTimeout}'s cancellation, as a TimeoutError however the Agent reports it.

    Cancelling an Agent request that is waiting for the response head fails it
    with C{ResponseNeverReceived([CancelledError])}, not a bare
    C{CancelledError}, so Twisted's default conversion misses it.
    """
    if isinstance(result, Failure):
        raise TimeoutError(f"no response head within {timeout:g}s")
    return result


def _error_kind(error: BaseException) -> str:
    """A bounded label for an upstream failure."""
    from twisted.internet.defer import CancelledError
    from twisted.internet.error import ConnectError, DNSLookupError

    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, CancelledError):
        return "cancelled"
    if isinstance(error, (ConnectError, DNSLookupError)):
        return "unreachable"
    text = repr(error)
    if "SSL" in text or "certificate" in text or "Verification" in text:
        return "tls"
    return "other"


class _Discard(Protocol):
    """Swallows a body we do not pass on (a redirect's), so the connection can be reused."""

    def dataReceived(self, data: bytes) -> None:
        pass


def discard(response: IResponse) -> None:
    response.deliverBody(_Discard())


async def read_bounded(response: IResponse, limit: int, what: str) -> bytes:
    """A small upstream body read whole (a token, a manifest); more than C{limit} bytes is a 502."""
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise errors.RegistryError(502, "UNAVAILABLE", f"upstream {what} larger than {limit} bytes")
        chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)


def policy_for(config: UpstreamConfig) -> OutboundPolicy:
    """The outbound rules an upstream's configuration sets."""
    return OutboundPolicy(
        config.url,
        realm_hosts=config.realm_hosts,
        pinned_realm=config.realm,
        redirect_hosts=config.redirect_hosts,
        allow_private_redirects=config.allow_private_redirects,
    )


@dataclass
class Upstream:
    """A registry the proxy forwards to, and what it has learnt about it.

    @ivar config: the upstream's configuration.
    @ivar realm: the token realm, pinned or learnt from the upstream's own challenges.
    @ivar service: the C{service} its challenges name (token requests carry it).
    @ivar scheme: the auth scheme its challenges use (C{bearer}, C{basic}), once seen.
    """

    config: UpstreamConfig
    agent: IAgent
    clock: IReactorTime
    #: For requests with bodies: a fresh connection each, because a body that
    #: streams from the client can't be replayed if a pooled connection turns
    #: out to be stale (Twisted retries only bodiless requests).
    body_agent: IAgent | None = None
    response_timeout: float = 60.0
    max_redirects: int = 5
    policy: OutboundPolicy | None = None
    #: The endpoint factory's trusted origins, told about the realm once it is learnt.
    trusted_origins: set[tuple[str, str, int]] | None = None
    realm: str | None = None
    service: str | None = None
    scheme: str | None = None
    metrics: Any = None
    log: Logger = field(default_factory=Logger)

    def __post_init__(self) -> None:
        self.base = self.config.url.rstrip("/")
        found = origin(self.base)
        if found is None:
            raise ValueError(f"upstream must be an http(s) URL: {self.base!r}")
        self.origin = found
        self.prefix = urlsplit(self.base).path.rstrip("/")
        if self.policy is None:
            self.policy = policy_for(self.config)
        if self.policy.pinned_realm is not None:
            self._trust(self.policy.pinned_realm)
            self.realm = self.policy.pinned_realm
            self.scheme = "bearer"

    @classmethod
    def configured(
        cls, base: str, library_prefix: bool | None, agent: IAgent, clock: IReactorTime, **kw: object
    ) -> Upstream:
        """A single default upstream with the defaults that follow from its URL (Docker Hub or not)."""
        return cls(single_upstream(base, library_prefix=library_prefix), agent, clock, **kw)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def library_prefix(self) -> bool:
        return self.config.library_prefix

    def url(self, path: str, query: bytes) -> str:
        """The upstream URL for an API path and the client's raw query (kept byte-exact)."""
        url = self.base + path
        if query:
            url += "?" + query.decode("ascii")
        return url

    def _trust(self, realm: str) -> None:
        found = origin(realm)
        if found is not None and self.trusted_origins is not None:
            self.trusted_origins.add(found)

    # what the upstream's challenges teach

    def note_challenges(self, values: list[bytes], source: str) -> None:
        """Learn from the C{WWW-Authenticate} values of an answer that came from C{source}."""
        for value in values:
            challenge = parse_challenge(value.decode("latin-1"))
            if challenge is not None:
                self.note_challenge(challenge, source)

    def note_challenge(self, challenge: Challenge, source: str) -> None:
        """Remember the auth scheme, token realm and service of a challenge from C{source}.

        Only the configured upstream's own answers count (a CDN or any other
        redirect target has no say), only realms the outbound policy accepts, and
        never over a pinned realm.
        """
        assert self.policy is not None
        if origin(source) != self.origin:
            return
        scheme = challenge.scheme.lower()
        if scheme == "basic":
            self.scheme = scheme
            return
        if scheme != "bearer":
            return
        self.scheme = scheme
        service = challenge.get("service")
        if service is not None and service.isascii() and service != self.service:
            self.service = service
        realm = challenge.get("realm")
        if realm is None or realm == self.realm or self.policy.pinned_realm is not None:
            return
        problem = self.policy.realm_problem(realm)
        if problem is not None:
            self.log.warn(
                "upstream {name} names the token realm {realm!r}, which is not used: {problem}",
                name=self.name,
                realm=realm,
                problem=problem,
            )
            return
        self.log.info("upstream {name} token realm is {realm}", name=self.name, realm=realm)
        self._trust(realm)
        self.realm = realm

    async def discover(self) -> str | None:
        """Ask the upstream's C{/v2/} how it authenticates (scheme, realm, service).

        @return: the realm its Bearer challenge named, trusted or not.
        """
        response = await self.send(b"GET", self.url("/v2/", b""), Headers(), None)
        discard(response)
        named = None
        for value in response.headers.getRawHeaders(b"www-authenticate", []):
            challenge = parse_challenge(value.decode("latin-1"))
            if challenge is not None:
                self.note_challenge(challenge, self.base)
                if challenge.scheme.lower() == "bearer" and challenge.get("realm"):
                    named = challenge.get("realm")
        if self.scheme is None:
            self.scheme = "unknown" if response.code == 401 else "none"
        return named

    async def token_realm(self) -> str:
        """The upstream's token realm, asking its C{/v2/} if no challenge was seen yet.

        @raise errors.RegistryError: it has none, or names one the proxy does not trust.
        """
        if self.realm is None:
            named = await self.discover()
            if self.realm is None:
                if named is not None:
                    raise errors.RegistryError(
                        502,
                        "UNAVAILABLE",
                        f"the upstream registry {self.name} names a token realm this proxy does not trust",
                    )
                raise errors.RegistryError(
                    404, "UNSUPPORTED", f"the upstream registry {self.name} does not use token authentication"
                )
        return self.realm

    # requests

    async def send(
        self,
        method: bytes,
        url: str,
        headers: Headers,
        body: IBodyProducer | None,
        timeout: float | None = None,
    ) -> IResponse:
        """One request, no redirects; fails with TimeoutError if no response head arrives in time.

        C{timeout=0} waits for as long as it takes (a streamed upload's response
        comes only after the whole body).
        """
        agent = self.agent if body is None or self.body_agent is None else self.body_agent
        d: Deferred[IResponse] = agent.request(method, url.encode("ascii"), headers, body)
        limit = self.response_timeout if timeout is None else timeout
        if limit:
            d.addTimeout(limit, self.clock, onTimeoutCancel=timed_out)
        if self.metrics is None:
            return await d
        try:
            response = await d
        except BaseException as e:
            self.metrics.upstream_errors.labels(self.name, _error_kind(e)).inc()
            raise
        self.metrics.upstream_requests.labels(self.name, method.decode("latin-1"), f"{response.code // 100}xx").inc()
        return response

    async def fetch(
        self,
        method: bytes,
        url: str,
        headers: Headers,
        body: IBodyProducer | None = None,
        timeout: float | None = None,
    ) -> tuple[IResponse, str]:
        """Send a request, following redirects server-side for GET and HEAD.

        Each hop keeps C{Range}, C{Accept} and C{If-*}; a hop to another origin
        loses C{Authorization} and cookies for good (presigned blob URLs reject
        them, and they are the registry's alone). A hop the outbound policy
        forbids is a 502, and nothing is sent there.

        @return: the final response and the URL it came from.
        """
        follow = method in (b"GET", b"HEAD")
        for _ in range(self.max_redirects + 1):
            response = await self.send(method, url, headers, body, timeout)
            location = response.headers.getRawHeaders(b"location")
            if not (follow and response.code in _REDIRECTS and location):
                return response, url
            discard(response)
            try:
                target = urljoin(url, ascii_url(location[0]))
            except ValueError:
                raise errors.RegistryError(502, "UNAVAILABLE", "upstream redirected to a malformed URL") from None
            assert self.policy is not None
            problem = self.policy.redirect_problem(target)
            if problem is not None:
                self.log.warn("not following a redirect to {target}: {problem}", target=target, problem=problem)
                raise errors.RegistryError(502, "UNAVAILABLE", f"upstream redirected to a forbidden target: {problem}")
            if origin(target) != origin(url):
                headers = without_credentials(headers)
            self.log.debug("following {code} to {target}", code=response.code, target=target)
            url = target
        raise errors.RegistryError(502, "UNAVAILABLE", "too many redirects from upstream")
