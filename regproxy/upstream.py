"""One configured upstream registry and the exchanges with it.

The upstream is fixed by configuration: the request only supplies a path below
it, so the proxy can never be made to dial an arbitrary host. Redirects the
upstream answers (Docker Hub sends blob GETs to a CDN with a 307) are followed
here, and credentials never travel to a host other than the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from . import errors
from .auth import parse_challenge
from .headers import origin, without_credentials
from .outbound import OutboundPolicy, PolicyResolver, ResolvingThrough

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
DOCKER_HUB_NAMESPACES = frozenset({"docker.io", "registry-1.docker.io", "index.docker.io"})


def ascii_url(raw: bytes) -> str:
    """A URL from a header, with any byte that can't stand in a URL percent-encoded.

    Upstreams sometimes send raw UTF-8 in C{Location}; browsers encode it the same way.
    """
    return "".join(chr(b) if 0x20 < b < 0x7F else f"%{b:02X}" for b in raw)


class _Discard(Protocol):
    """Swallows a body we do not pass on (a redirect's), so the connection can be reused."""

    def dataReceived(self, data: bytes) -> None:
        pass


def discard(response: IResponse) -> None:
    response.deliverBody(_Discard())


@implementer(IAgentEndpointFactory)
class OriginEndpoints:
    """Endpoints for the Agent, built once per origin instead of once per request.

    Building an endpoint (host name checks, TLS connection creator) showed up as
    about 6% of the CPU of a proxied manifest request. The origins are few (the
    upstream, its token realm, its CDN), and the cache is bounded anyway.
    """

    _MAX = 256

    def __init__(
        self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float, outbound: OutboundPolicy | None = None
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = connect_timeout
        self._outbound = outbound
        #: Origins the configuration chose (the upstream, its realm): connected to as
        #: they resolve. Any other origin is a redirect target, whose addresses the
        #: outbound policy filters at connect time.
        self.trusted: set[tuple[str, str, int]] = set()
        if outbound is not None:
            self.trusted.add(outbound.upstream_origin)
            self._filtered: Any = ResolvingThrough(reactor, PolicyResolver(reactor.nameResolver, outbound))
        self._cache: dict[tuple[bytes, bytes, int, bool], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        trusted = self._outbound is None or (uri.scheme.decode("ascii"), host.lower(), uri.port) in self.trusted
        key = (uri.scheme, uri.host, uri.port, trusted)
        endpoint = self._cache.get(key)
        if endpoint is None:
            if len(self._cache) >= self._MAX:
                self._cache.clear()
            reactor = self._reactor if trusted else self._filtered
            endpoint = HostnameEndpoint(reactor, host, uri.port, timeout=self._timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
            elif uri.scheme != b"http":
                raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
            self._cache[key] = endpoint
        return endpoint


@dataclass
class Upstream:
    """A registry the proxy forwards to.

    @ivar base: the upstream's base URL, e.g. C{https://registry-1.docker.io}.
    @ivar library_prefix: whether one-component names mean C{library/<name>}.
    @ivar namespaces: the registry host names this upstream stands for; a
        containerd C{?ns=} outside this set is refused rather than answered
        with another registry's content.
    @ivar realm: the token realm, learnt from the upstream's own challenges.
    """

    base: str
    library_prefix: bool
    namespaces: frozenset[str]
    agent: IAgent
    clock: IReactorTime
    #: For requests with bodies: a fresh connection each, because a body that
    #: streams from the client can't be replayed if a pooled connection turns
    #: out to be stale (Twisted retries only bodiless requests).
    body_agent: IAgent | None = None
    response_timeout: float = 60.0
    max_redirects: int = 5
    realm: str | None = None
    policy: OutboundPolicy | None = None
    #: The endpoint factory's trusted origins, told about the realm once it is learnt.
    trusted_origins: set[tuple[str, str, int]] | None = None
    log: Logger = field(default_factory=Logger)

    def __post_init__(self) -> None:
        self.base = self.base.rstrip("/")
        found = origin(self.base)
        if found is None:
            raise ValueError(f"upstream must be an http(s) URL: {self.base!r}")
        self.origin = found
        self.prefix = urlsplit(self.base).path.rstrip("/")
        if self.policy is None:
            self.policy = OutboundPolicy(self.base)
        if self.policy.pinned_realm is not None:
            self._trust(self.policy.pinned_realm)
            self.realm = self.policy.pinned_realm

    def _trust(self, realm: str) -> None:
        found = origin(realm)
        if found is not None and self.trusted_origins is not None:
            self.trusted_origins.add(found)

    @classmethod
    def configured(
        cls, base: str, library_prefix: bool | None, agent: IAgent, clock: IReactorTime, **kw: object
    ) -> Upstream:
        """An upstream with the defaults that follow from its URL (Docker Hub or not)."""
        host = urlsplit(base).netloc.lower()
        hub = host in DOCKER_HUB_NAMESPACES
        prefix = hub if library_prefix is None else library_prefix
        namespaces = {host, urlsplit(base).hostname or host}
        if prefix:
            namespaces |= DOCKER_HUB_NAMESPACES
        return cls(base, prefix, frozenset(namespaces), agent, clock, **kw)  # type: ignore[arg-type]

    def url(self, path: str, query: bytes) -> str:
        """The upstream URL for an API path and the client's raw query (kept byte-exact)."""
        url = self.base + path
        if query:
            url += "?" + query.decode("ascii")
        return url

    def note_challenge(self, realm: str, source: str) -> None:
        """Remember the token realm named by a challenge that came from C{source}.

        Only the configured upstream's own answers count (a CDN or any other
        redirect target has no say), only realms the outbound policy accepts, and
        never over a pinned realm.
        """
        assert self.policy is not None
        if realm == self.realm or self.policy.pinned_realm is not None or origin(source) != self.origin:
            return
        problem = self.policy.realm_problem(realm)
        if problem is not None:
            self.log.warn(
                "upstream {base} names the token realm {realm!r}, which is not used: {problem}",
                base=self.base,
                realm=realm,
                problem=problem,
            )
            return
        self.log.info("upstream {base} token realm is {realm}", base=self.base, realm=realm)
        self._trust(realm)
        self.realm = realm

    async def token_realm(self) -> str:
        """The upstream's token realm, asking its C{/v2/} if no challenge was seen yet."""
        if self.realm is None:
            response = await self.send(b"GET", self.url("/v2/", b""), Headers(), None)
            discard(response)
            named = None
            for value in response.headers.getRawHeaders(b"www-authenticate", []):
                challenge = parse_challenge(value.decode("latin-1"))
                if challenge and challenge.scheme.lower() == "bearer" and challenge.get("realm"):
                    named = challenge.get("realm") or ""
                    self.note_challenge(named, self.base)
            if self.realm is None:
                if named is not None:
                    raise errors.RegistryError(
                        502, "UNAVAILABLE", "the upstream registry names a token realm this proxy does not trust"
                    )
                raise errors.RegistryError(
                    404, "UNSUPPORTED", "the upstream registry does not use token authentication"
                )
        return self.realm

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
            d.addTimeout(limit, self.clock)
        return await d

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
        them, and they are the registry's alone).

        @return: the final response and the URL it came from.
        """
        follow = method in (b"GET", b"HEAD")
        for _ in range(self.max_redirects + 1):
            response = await self.send(method, url, headers, body, timeout)
            location = response.headers.getRawHeaders(b"location")
            if not (follow and response.code in _REDIRECTS and location):
                return response, url
            discard(response)
            target = urljoin(url, ascii_url(location[0]))
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
