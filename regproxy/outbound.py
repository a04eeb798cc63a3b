"""Where the proxy may connect, and where it may send a client's credentials.

A registry mirror holds its clients' registry credentials and sits next to
internal services; an upstream (or anything it redirects to) must not be able to
steer either. Three rules, checked here and nowhere else:

* a token realm is learnt only from the configured upstream's own answers, on
  the upstream's host, a host of the same parent domain (C{registry-1.docker.io}
  -> C{auth.docker.io}) or one the configuration names, over a scheme at least
  as secure as the upstream's; or it is pinned in the configuration;
* a redirect target uses HTTPS (or the upstream's own scheme), is on the
  configured redirect hosts if there are any, and never reaches a loopback,
  private, link-local or otherwise special address, unless the upstream itself
  is in that address class (a loopback test registry may redirect to loopback)
  or the configuration allows private targets;
* that address rule is enforced on the resolved addresses at connect time, so a
  public name that resolves to an internal address is refused too.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.logger import Logger
from zope.interface import implementer

from .headers import origin

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

log = Logger()


def address_class(address: Address) -> str:
    """The category an address falls in, for the redirect rule."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_class(address.ipv4_mapped)
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified or address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "special"
    return "public"


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _host_class(host: str) -> str | None:
    """The class of a host that is an address literal (or C{localhost}), else C{None}."""
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"
    literal = _literal(host)
    return None if literal is None else address_class(literal)


@dataclass
class OutboundPolicy:
    """The outbound rules for one configured upstream.

    @ivar base: the upstream's URL.
    @ivar realm_hosts: extra hosts a token realm may be on.
    @ivar pinned_realm: the realm to use, whatever the upstream says.
    @ivar redirect_hosts: host globs redirect targets must match (any host if empty).
    @ivar allow_private_redirects: redirect targets may be on private addresses.
    """

    base: str
    realm_hosts: Sequence[str] = ()
    pinned_realm: str | None = None
    redirect_hosts: Sequence[str] = ()
    allow_private_redirects: bool = False
    _origin: tuple[str, str, int] = field(init=False)

    def __post_init__(self) -> None:
        found = origin(self.base)
        if found is None:
            raise ValueError(f"not an http(s) URL: {self.base!r}")
        self._origin = found

    @property
    def upstream_origin(self) -> tuple[str, str, int]:
        return self._origin

    def allowed_classes(self) -> frozenset[str]:
        """Address classes a redirect target may resolve to."""
        allowed = {"public"}
        own = _host_class(self._origin[1])
        if own is not None:
            allowed.add(own)
        if self.allow_private_redirects:
            allowed |= {"private", "loopback"}
        return frozenset(allowed)

    def address_allowed(self, address: Address) -> bool:
        return address_class(address) in self.allowed_classes()

    # realms

    def realm_problem(self, realm: str) -> str | None:
        """Why C{realm} must not be used as this upstream's token realm (C{None}: it may)."""
        if not realm.isascii() or any(c <= " " for c in realm):
            return "it is not a plain ASCII URL"
        found = origin(realm)
        if found is None:
            return "it is not an http(s) URL"
        scheme, host, _ = found
        if self._origin[0] == "https" and scheme != "https":
            return "it is not https, and the upstream is"
        if host == self._origin[1] or _sibling(host, self._origin[1]):
            return None
        if any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in self.realm_hosts):
            return None
        return f"its host {host!r} is neither the upstream's, of its domain, nor a configured realm host"

    # redirects

    def redirect_problem(self, target: str) -> str | None:
        """Why the proxy must not follow a redirect to C{target} (C{None}: it may)."""
        if not target.isascii():
            return "the target is not an ASCII URL"
        found = origin(target)
        if found is None:
            return "the target is not an http(s) URL"
        if found == self._origin:
            return None
        scheme, host, _ = found
        if self._origin[0] == "https" and scheme != "https":
            return "it leads from https to plain http"
        if self.redirect_hosts and not any(fnmatch.fnmatchcase(host, p.lower()) for p in self.redirect_hosts):
            return f"{host!r} is not one of the configured redirect hosts"
        literal = _literal(host)
        if literal is not None and not self.address_allowed(literal):
            return f"{host} is a {address_class(literal)} address"
        if host == "localhost" or host.endswith(".localhost"):
            if "loopback" not in self.allowed_classes():
                return f"{host} is a loopback name"
        return None


def _sibling(host: str, upstream_host: str) -> bool:
    """Whether C{host} is in the parent domain of C{upstream_host} (at least two labels deep).

    C{auth.docker.io} for C{registry-1.docker.io}; but nothing for C{ghcr.io},
    whose parent would be a public suffix.
    """
    if _literal(upstream_host) is not None or _literal(host) is not None:
        return False
    labels = upstream_host.split(".")
    if len(labels) < 3:
        return False
    parent = ".".join(labels[1:])
    return host == parent or host.endswith("." + parent)


# Connect-time enforcement: a resolver that hides forbidden addresses.


@implementer(IResolutionReceiver)
class _Filtered:
    def __init__(self, receiver: IResolutionReceiver, policy: OutboundPolicy, host: str) -> None:
        self._receiver = receiver
        self._policy = policy
        self._host = host
        self._refused: list[str] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        literal = _literal(host) if isinstance(host, str) else None
        if literal is not None and self._policy.address_allowed(literal):
            self._receiver.addressResolved(address)
        else:
            self._refused.append(str(host))

    def resolutionComplete(self) -> None:
        if self._refused:
            log.warn(
                "redirect target {host} resolves to forbidden address(es) {addresses}: not connecting to them",
                host=self._host,
                addresses=", ".join(self._refused),
            )
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class PolicyResolver:
    """A name resolver that only reports addresses the policy allows."""

    def __init__(self, inner: IHostnameResolver, policy: OutboundPolicy) -> None:
        self._inner = inner
        self._policy = policy

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        return self._inner.resolveHostName(
            _Filtered(resolutionReceiver, self._policy, hostName), hostName, portNumber, addressTypes, transportSemantics
        )


@implementer(IReactorPluggableNameResolver)
class ResolvingThrough:
    """The reactor, with another name resolver: what C{HostnameEndpoint} connects with."""

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        old, self.nameResolver = self.nameResolver, resolver
        return old

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
