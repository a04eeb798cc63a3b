"""Connection endpoints for the upstream agents: one per origin, redirect targets filtered."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from ..outbound import OutboundPolicy, PolicyResolver, ResolvingThrough


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
