"""Where the proxy may connect and send credentials: realms, redirects, resolved addresses."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostResolution, IResolutionReceiver
from twisted.web.server import Request
from zope.interface import implementer

from regproxy.outbound import OutboundPolicy, PolicyResolver, address_class
from tests.unit import fakes
from tests.unit.test_resource import Harness

HUB = OutboundPolicy("https://registry-1.docker.io")
LOCAL = OutboundPolicy("https://127.0.0.1:5000")


@pytest.mark.parametrize(
    "policy, realm, ok",
    [
        (HUB, "https://auth.docker.io/token", True),
        (HUB, "https://registry-1.docker.io/token", True),
        (HUB, "http://auth.docker.io/token", False),
        (HUB, "https://auth.evil.example/token", False),
        (HUB, "https://auth.docker.io.evil.example/token", False),
        (OutboundPolicy("https://ghcr.io"), "https://ghcr.io/token", True),
        (OutboundPolicy("https://ghcr.io"), "https://evil.io/token", False),
        (LOCAL, "https://127.0.0.1:6000/token", True),
        (LOCAL, "https://127.0.0.2/token", False),
        (OutboundPolicy("https://r.example", realm_hosts=("auth.example",)), "https://auth.example/t", True),
        (HUB, "https://auth.docker.io/t\u00f6ken", False),
        (HUB, "javascript:alert(1)", False),
    ],
)
def test_realm_policy(policy: OutboundPolicy, realm: str, ok: bool) -> None:
    """A realm is accepted only on the upstream's host, its parent domain or a configured host, never downgraded."""
    assert (policy.realm_problem(realm) is None) is ok


@pytest.mark.parametrize(
    "policy, target, ok",
    [
        (HUB, "https://production.cloudflare.docker.com/blob", True),
        (HUB, "http://production.cloudflare.docker.com/blob", False),
        (HUB, "https://169.254.169.254/latest/meta-data", False),
        (HUB, "https://10.0.0.1/blob", False),
        (HUB, "https://127.0.0.1/blob", False),
        (HUB, "https://[::1]/blob", False),
        (HUB, "https://[::ffff:10.0.0.1]/blob", False),
        (HUB, "https://localhost/blob", False),
        (HUB, "ftp://example.com/blob", False),
        (LOCAL, "https://127.0.0.1:7000/blob", True),
        (LOCAL, "https://169.254.169.254/", False),
        (LOCAL, "https://10.1.2.3/", False),
        (LOCAL, "http://127.0.0.1:7000/blob", False),
        (OutboundPolicy("http://10.0.0.5:5000"), "http://10.0.0.6:9000/minio", True),
        (OutboundPolicy("https://r.example", allow_private_redirects=True), "https://10.0.0.1/", True),
        (OutboundPolicy("https://r.example", redirect_hosts=("*.cdn.example",)), "https://a.cdn.example/", True),
        (OutboundPolicy("https://r.example", redirect_hosts=("*.cdn.example",)), "https://evil.example/", False),
    ],
)
def test_redirect_policy(policy: OutboundPolicy, target: str, ok: bool) -> None:
    """Redirect targets: https (or the upstream's scheme), configured hosts, no internal addresses of another class."""
    assert (policy.redirect_problem(target) is None) is ok


def test_address_classes() -> None:
    """The address classes the redirect rule reasons about."""
    cases = {"127.0.0.1": "loopback", "10.2.3.4": "private", "169.254.1.1": "link-local", "8.8.8.8": "public"}
    for text, kind in cases.items():
        assert address_class(ipaddress.ip_address(text)) == kind


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.complete = False

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.complete = True


class _StaticResolver:
    def __init__(self, *hosts: str) -> None:
        self.hosts = hosts

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, *a: Any, **k: Any) -> Any:
        receiver.resolutionBegan(None)
        for host in self.hosts:
            receiver.addressResolved(IPv4Address("TCP", host, portNumber))
        receiver.resolutionComplete()
        return None


def test_resolver_hides_internal_addresses_of_public_names() -> None:
    """A redirect target's name resolving to an internal address is not connected to (DNS rebinding)."""
    receiver = _Collect()
    PolicyResolver(_StaticResolver("10.0.0.7", "93.184.215.14", "169.254.169.254"), HUB).resolveHostName(
        receiver, "cdn.evil.example", 443
    )
    assert [a.host for a in receiver.addresses] == ["93.184.215.14"] and receiver.complete


def _redirecting(location: bytes, challenge_on_cdn: bool = False) -> Harness:
    registry = fakes.FakeRegistry()
    original = fakes.FakeRegistry.render

    def render(self: fakes.FakeRegistry, request: Request) -> bytes:
        host = request.getHeader(b"host") or b""
        if host.startswith(b"cdn.example") and challenge_on_cdn:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="https://steal.example/token",service="x"')
            return b"{}"
        if request.path.endswith(fakes.BLOB_DIGEST.encode()) and host.startswith(b"registry"):
            request.setResponseCode(307)
            request.setHeader(b"location", location)
            return b""
        return original(self, request)

    registry.render = render.__get__(registry)  # type: ignore[method-assign]
    return Harness(registry)


@pytest.mark.parametrize(
    "location",
    [b"http://cdn.example/blob", b"https://169.254.169.254/latest", b"https://10.0.0.1/x", b"file:///etc/passwd"],
)
def test_forbidden_redirect_not_followed(location: bytes) -> None:
    """A redirect to a forbidden target is a 502 OCI error and nothing is dialled there."""
    h = _redirecting(location)
    r, body = h.request("GET", f"/v2/library/x/blobs/{fakes.BLOB_DIGEST}", headers={b"Authorization": [b"Bearer T"]})
    assert r.code == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert [s.host for s in h.registry.seen if not s.host.startswith(b"registry")] == []


def test_realm_from_redirect_target_is_not_learnt() -> None:
    """A 401 challenge answered by a redirect target (a CDN) never sets the token realm."""
    h = _redirecting(b"https://cdn.example/data/blob", challenge_on_cdn=True)
    r, _ = h.request("GET", f"/v2/library/x/blobs/{fakes.BLOB_DIGEST}", headers={b"Authorization": [b"Bearer T"]})
    assert r.code == 401
    h.request("GET", "/token?service=x", headers={b"Authorization": [b"Basic dTpw"]})
    assert not [s for s in h.registry.seen if s.host.startswith(b"steal")]
    token_requests = [s for s in h.registry.seen if s.host.startswith(b"auth.example")]
    assert token_requests and token_requests[-1].headers[b"authorization"] == [b"Basic dTpw"]


def test_realm_on_foreign_host_is_refused_without_dialling() -> None:
    """An upstream naming a realm on an unexpected host: the token request is a clear error, the host never dialled."""
    registry = fakes.FakeRegistry()

    def render(self: fakes.FakeRegistry, request: Request) -> bytes:
        self.seen.append(fakes.Seen(request.method, request.getHeader(b"host") or b"", request.uri, {}, b""))
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="https://steal.example/token",service="x"')
        return b"{}"

    registry.render = render.__get__(registry)  # type: ignore[method-assign]
    h = Harness(registry)
    r, _ = h.request("GET", "/v2/")
    assert r.code == 401
    r, body = h.request("GET", "/token?service=x", headers={b"Authorization": [b"Basic dTpw"]})
    assert r.code == 502 and "realm" in json.loads(body)["errors"][0]["message"]
    assert all(s.host.startswith(b"registry") for s in h.registry.seen)
