"""The proxy's request handling, in memory against a fake Docker-Hub-like upstream."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from regproxy.resource import Settings
from tests.unit.fakes import BLOB, BLOB_DIGEST, MANIFEST, MANIFEST_DIGEST, FakeRegistry, make_proxy

AUTH = {b"Authorization": [b"Bearer T"]}


class Harness:
    def __init__(
        self, registry: FakeRegistry | None = None, library_prefix: bool = True, settings: Settings | None = None
    ) -> None:
        self.registry = registry or FakeRegistry()
        self.client, self.client_agent, self.upstream_agent, self.clock = make_proxy(
            self.registry, library_prefix, settings
        )

    def settle(self, d: Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(100):
            if results:
                break
            self.upstream_agent.flush()
            self.clock.advance(0)
            self.client_agent.flush()
        assert results, "request never completed"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def request(self, method: str, url: str, **kw: Any) -> tuple[IResponse, bytes]:
        response = self.settle(self.client.request(method, "http://proxy.test" + url, **kw))
        body = self.settle(response.content())
        return response, body


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_ping_challenge_points_at_proxy(h: Harness) -> None:
    """/v2/ 401: realm rewritten to the proxy's /token, service kept, API version header passed."""
    r, body = h.request("GET", "/v2/")
    assert r.code == 401
    assert r.headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="http://proxy.test/token",service="fake"']
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"


def test_manifest_challenge_scope_uses_client_name(h: Harness) -> None:
    """A direct pull of 'x' gets a scope naming 'x', though upstream said library/x."""
    r, _ = h.request("GET", "/v2/x/manifests/latest", headers={b"Authorization": [b"Bearer stale"]})
    (value,) = r.headers.getRawHeaders(b"www-authenticate")
    assert b'scope="repository:x:pull"' in value
    assert h.registry.seen[-1].uri == b"/v2/library/x/manifests/latest"


def test_token_endpoint_forwards_all_scopes_and_credentials(h: Harness) -> None:
    """GET /token reaches the learnt realm with every scope (renamed) and the client's Basic credentials."""
    h.request("GET", "/v2/")
    r, body = h.request("GET", "/token?service=fake&scope=repository:x:pull&scope=repository:y/z:push,pull",
                        headers={b"Authorization": [b"Basic dTpw"]})
    assert r.code == 200 and json.loads(body)["token"] == "T"
    seen = h.registry.seen[-1]
    assert seen.host.startswith(b"auth.example")
    assert seen.headers[b"authorization"] == [b"Basic dTpw"]
    assert b"scope=repository%3Alibrary%2Fx%3Apull" in seen.uri and b"scope=repository%3Ay%2Fz%3Apush%2Cpull" in seen.uri


def test_token_endpoint_discovers_realm(h: Harness) -> None:
    """Without an earlier challenge the proxy asks the upstream's /v2/ for its realm."""
    r, _ = h.request("GET", "/token?service=fake", headers={b"Authorization": [b"Basic dTpw"]})
    assert r.code == 200
    assert [s.host[:12] for s in h.registry.seen] == [b"registry.exa", b"auth.example"]


def test_token_post_form(h: Harness) -> None:
    """containerd's OAuth2 POST form is forwarded with its scope renamed."""
    h.request("GET", "/v2/")
    r, _ = h.request("POST", "/token", data=b"grant_type=password&username=u&password=p&scope=repository%3Ax%3Apull",
                     headers={b"Content-Type": [b"application/x-www-form-urlencoded"]})
    assert r.code == 200
    assert h.registry.seen[-1].method == b"POST"
    assert b"scope=repository%3Alibrary%2Fx%3Apull" in h.registry.seen[-1].body


def test_manifest_every_accept_forwarded_and_headers_exact(h: Harness) -> None:
    """All Accept values reach upstream; digest, type and length come back exact."""
    accepts = [b"application/vnd.docker.distribution.manifest.v2+json", b"application/vnd.oci.image.index.v1+json"]
    r, body = h.request("GET", "/v2/library/x/manifests/latest", headers={**AUTH, b"Accept": accepts})
    assert r.code == 200 and body == MANIFEST
    assert h.registry.seen[-1].headers[b"accept"] == accepts
    assert r.headers.getRawHeaders(b"docker-content-digest") == [MANIFEST_DIGEST.encode()]
    assert r.length == len(MANIFEST)  # framed with Content-Length, not chunked


def test_head_manifest_keeps_content_length(h: Harness) -> None:
    """HEAD answers carry the manifest's real Content-Length, not 0."""
    r, body = h.request("HEAD", "/v2/library/x/manifests/latest", headers=AUTH)
    assert r.code == 200 and body == b""
    assert r.headers.getRawHeaders(b"content-length") == [b"%d" % len(MANIFEST)]
    assert r.headers.getRawHeaders(b"docker-content-digest") == [MANIFEST_DIGEST.encode()]


def test_blob_redirect_followed_without_credentials(h: Harness) -> None:
    """A 307 to the CDN is followed server-side; the CDN never sees Authorization."""
    r, body = h.request("GET", f"/v2/library/x/blobs/{BLOB_DIGEST}", headers=AUTH)
    assert r.code == 200 and body == BLOB
    cdn = h.registry.seen[-1]
    assert cdn.host.startswith(b"cdn.example") and b"authorization" not in cdn.headers


def test_blob_range_through_redirect(h: Harness) -> None:
    """Range survives the redirect: 206 with Content-Range and the exact slice."""
    r, body = h.request("GET", f"/v2/library/x/blobs/{BLOB_DIGEST}", headers={**AUTH, b"Range": [b"bytes=100-199"]})
    assert r.code == 206 and body == BLOB[100:200]
    assert r.headers.getRawHeaders(b"content-range") == [f"bytes 100-199/{len(BLOB)}".encode()]


def test_upload_location_rewritten(h: Harness) -> None:
    """An upstream-absolute upload Location points at the proxy, query byte-exact, client's name."""
    r, _ = h.request("POST", "/v2/x/blobs/uploads/", headers=AUTH)
    assert r.code == 202
    assert r.headers.getRawHeaders(b"location") == [b"http://proxy.test/v2/x/blobs/uploads/u1?_state=a%2Bb%3D%3D"]
    assert r.headers.getRawHeaders(b"docker-upload-uuid") == [b"u1"]


def test_upload_body_reaches_upstream(h: Harness) -> None:
    """A PATCH body arrives upstream intact and the relative Location stays relative."""
    r, _ = h.request("PATCH", "/v2/x/blobs/uploads/u1?_state=a%2Bb%3D%3D", data=b"hello", headers=AUTH)
    assert r.code == 202
    seen = h.registry.seen[-1]
    assert seen.body == b"hello" and seen.uri == b"/v2/library/x/blobs/uploads/u1?_state=a%2Bb%3D%3D"
    assert r.headers.getRawHeaders(b"location") == [b"/v2/x/blobs/uploads/u1?_state=next"]


def test_mount_query_kept_and_from_renamed(h: Harness) -> None:
    """A mount POST keeps its query; path name and a one-component from= both get library/."""
    h.request("POST", f"/v2/x/blobs/uploads/?mount={BLOB_DIGEST}&from=library/y", headers=AUTH)
    assert h.registry.seen[-1].uri == f"/v2/library/x/blobs/uploads/?mount={BLOB_DIGEST}&from=library/y".encode()
    h.request("POST", f"/v2/x/blobs/uploads/?from=y&mount={BLOB_DIGEST}", headers=AUTH)
    assert h.registry.seen[-1].uri == f"/v2/library/x/blobs/uploads/?from=library/y&mount={BLOB_DIGEST}".encode()


def test_mount_from_not_renamed_without_prefix() -> None:
    """Without the library/ rule, from= is forwarded as sent."""
    h = Harness(library_prefix=False)
    h.request("POST", f"/v2/x/blobs/uploads/?mount={BLOB_DIGEST}&from=y", headers=AUTH)
    assert h.registry.seen[-1].uri == f"/v2/x/blobs/uploads/?mount={BLOB_DIGEST}&from=y".encode()


def test_tags_link_rewritten(h: Harness) -> None:
    """The pagination Link names the proxy's path for the client's repository; the query is forwarded."""
    r, _ = h.request("GET", "/v2/x/tags/list?n=1", headers=AUTH)
    assert r.headers.getRawHeaders(b"link") == [b'</v2/x/tags/list?last=a&n=1>; rel="next"']
    assert h.registry.seen[-1].uri == b"/v2/library/x/tags/list?n=1"


def test_containerd_ns_accepted_for_docker_io(h: Harness) -> None:
    """?ns=docker.io is accepted and never used as a host."""
    r, _ = h.request("GET", "/v2/library/x/manifests/latest?ns=docker.io", headers=AUTH)
    assert r.code == 200
    assert all(not s.host.startswith(b"docker.io") for s in h.registry.seen)


def test_foreign_ns_refused(h: Harness) -> None:
    """A namespace the proxy doesn't front is a 404, not another registry's content and not a dial."""
    r, body = h.request("GET", "/v2/library/x/manifests/latest?ns=evil.example", headers=AUTH)
    assert r.code == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
    assert h.registry.seen == []


@pytest.mark.parametrize(
    "method, path, status, code",
    [
        ("PUT", "/v2/Bad/manifests/latest", 400, "NAME_INVALID"),
        ("DELETE", "/v2/x/blobs/sha256:nothex", 400, "DIGEST_INVALID"),
        ("PUT", "/v2/x/manifests/..bad", 400, "TAG_INVALID"),
        ("GET", "/v2/x/manifests/..bad", 404, "MANIFEST_UNKNOWN"),
        ("POST", "/v2/x/manifests/latest", 405, "UNSUPPORTED"),
        ("GET", "/nothing", 404, "UNSUPPORTED"),
        ("PUT", "/token", 405, "UNSUPPORTED"),
    ],
)
def test_bad_input_gets_oci_error(h: Harness, method: str, path: str, status: int, code: str) -> None:
    """Malformed requests get OCI error JSON with the right status and are never forwarded."""
    r, body = h.request(method, path)
    assert r.code == status
    assert json.loads(body)["errors"][0]["code"] == code
    assert r.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert h.registry.seen == []


def test_absolute_form_target_refused(h: Harness) -> None:
    """An absolute-form request target (forward-proxy use) is refused without dialling anything."""
    from twisted.internet.testing import StringTransport

    from regproxy.channel import RegistrySite
    from tests.unit.fakes import make_proxy as _mk

    _, agent, _, _ = _mk(h.registry)
    channel = agent._serverFactory.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET http://evil.example/v2/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400")
    assert b"UNSUPPORTED" in transport.value()
    assert h.registry.seen == []
    assert isinstance(agent._serverFactory, RegistrySite)


def test_cors_only_for_configured_origins() -> None:
    """A configured origin gets CORS answers and preflights; any other origin gets none."""
    h = Harness(settings=Settings(cors_origins=frozenset({"https://ui.example"})))
    ui = {b"Origin": [b"https://ui.example"]}
    r, _ = h.request("OPTIONS", "/v2/x/manifests/latest", headers=ui)
    assert r.code == 204
    assert r.headers.getRawHeaders(b"access-control-allow-origin") == [b"https://ui.example"]
    assert b"GET" in r.headers.getRawHeaders(b"access-control-allow-methods")[0]
    r, _ = h.request("GET", "/v2/", headers=ui)
    assert r.headers.getRawHeaders(b"access-control-allow-origin") == [b"https://ui.example"]
    assert r.headers.getRawHeaders(b"vary") == [b"Origin"]
    r, _ = h.request("GET", "/v2/", headers={b"Origin": [b"https://evil.example"]})
    assert not r.headers.hasHeader(b"access-control-allow-origin")


def test_landing_page_and_health(h: Harness) -> None:
    """/ explains the proxy with a daemon.json snippet naming its own URL; /healthz says ok."""
    r, body = h.request("GET", "/")
    assert r.code == 200 and b"registry-mirrors" in body and b"http://proxy.test" in body
    r, body = h.request("GET", "/healthz")
    assert r.code == 200 and body == b"ok\n"


def test_upstream_unreachable_is_502() -> None:
    """A refused upstream connection is a 502 OCI error, not a traceback."""
    from twisted.internet.defer import fail
    from twisted.internet.error import ConnectionRefusedError
    from twisted.internet.task import Clock

    from regproxy.resource import RegistryProxy
    from regproxy.upstream import Upstream

    class Refusing:
        def request(self, *a: object, **k: object) -> Deferred[IResponse]:
            return fail(ConnectionRefusedError())

    clock = Clock()
    proxy = RegistryProxy(Upstream.configured("https://registry.example", True, Refusing(), clock), clock)  # type: ignore[arg-type]
    from treq.testing import StubTreq

    client = StubTreq(proxy)
    d = client.get("http://proxy.test/v2/")
    client.flush()
    results: list[Any] = []
    d.addCallback(lambda r: r.content().addCallback(lambda b: (r.code, b))).addBoth(results.append)
    client.flush()
    code, body = results[0]
    assert code == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
