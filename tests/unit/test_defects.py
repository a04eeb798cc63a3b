"""The defects a hostile-upstream / hostile-client review found, pinned in memory.

Each test failed before its fix; the integration suite (tests/faults) covers the
same ground on real sockets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger
from twisted.python.failure import Failure
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from regproxy.resource import RegistryProxy
from tests.unit.test_resource import Harness
from tests.unit.test_streaming import FakeAgent, FakeResponse, channel_for

DIGEST = "sha256:" + "c" * 64


@pytest.fixture
def access_log(monkeypatch: pytest.MonkeyPatch) -> list[LogEvent]:
    events: list[LogEvent] = []
    monkeypatch.setattr(RegistryProxy, "log", Logger(observer=events.append))
    return events


def _access_lines(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if "duration" in e]


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/healthz"),
        ("GET", "/"),
        ("OPTIONS", "/v2/"),
        ("GET", "/v2/Bad/manifests/latest"),
        ("POST", "/v2/x/manifests/latest"),
        ("GET", "/nothing"),
    ],
)
def test_answers_without_upstream_are_access_logged(h_: Harness, access_log: list[LogEvent], method: str, path: str) -> None:
    """Requests the proxy answers itself (health, landing, preflight, errors) get exactly one access-log line."""
    r, _ = h_.request(method, path)
    lines = _access_lines(access_log)
    assert len(lines) == 1, access_log
    assert lines[0]["status"] == r.code and lines[0]["uri"] == path


@pytest.fixture
def h_() -> Harness:
    return Harness()


@pytest.mark.parametrize(
    "method, path, code",
    [
        ("GET", "/v2/x/manifests/.INVALID_MANIFEST_NAME", "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/x/manifests/.INVALID_MANIFEST_NAME", None),
        ("GET", "/v2/x/manifests/sha256:short", "MANIFEST_UNKNOWN"),
        ("GET", "/v2/x/blobs/sha256:nothex", "BLOB_UNKNOWN"),
        ("HEAD", "/v2/x/blobs/sha256:nothex", None),
        ("GET", "/v2/Bad/manifests/latest", "NAME_UNKNOWN"),
    ],
)
def test_reads_of_impossible_references_are_404(h_: Harness, method: str, path: str, code: str | None) -> None:
    """Reading a reference that can't exist is 404 (what registries answer), not 400; nothing is forwarded."""
    r, body = h_.request(method, path)
    assert r.code == 404
    if code is not None:
        assert json.loads(body)["errors"][0]["code"] == code
    assert h_.registry.seen == []


@pytest.mark.parametrize(
    "method, path, status, code",
    [
        ("PUT", "/v2/x/manifests/..bad", 400, "TAG_INVALID"),
        ("PUT", "/v2/Bad/manifests/latest", 400, "NAME_INVALID"),
        ("DELETE", "/v2/x/blobs/sha256:nothex", 400, "DIGEST_INVALID"),
    ],
)
def test_writes_of_invalid_references_stay_400(h_: Harness, method: str, path: str, status: int, code: str) -> None:
    """Writing with an invalid name, tag or digest is still a 400 with the precise OCI code."""
    r, body = h_.request(method, path, data=b"{}")
    assert r.code == status and json.loads(body)["errors"][0]["code"] == code


def test_upstream_domain_headers_not_passed(h_: Harness) -> None:
    """Set-Cookie, HSTS and Alt-Svc belong to the upstream's domain and never reach the proxy's clients."""
    from tests.unit import fakes

    original = fakes.FakeRegistry.render

    def render(self: fakes.FakeRegistry, request: Any) -> bytes:
        request.setHeader(b"set-cookie", b"session=upstream; Domain=registry.example")
        request.setHeader(b"strict-transport-security", b"max-age=31536000; includeSubDomains")
        request.setHeader(b"alt-svc", b'h3=":443"')
        return original(self, request)

    h_.registry.render = render.__get__(h_.registry)  # type: ignore[method-assign]
    r, _ = h_.request("GET", "/v2/library/x/manifests/latest", headers={b"Authorization": [b"Bearer T"]})
    assert r.code == 200
    for name in (b"set-cookie", b"strict-transport-security", b"alt-svc"):
        assert not r.headers.hasHeader(name), name


def test_no_wildcard_cors(h_: Harness) -> None:
    """No answer says Access-Control-Allow-Origin: *; a web page can't read the registry through a browser."""
    for method, path in (("GET", "/v2/"), ("OPTIONS", "/v2/x/manifests/latest"), ("GET", "/")):
        r, _ = h_.request(method, path, headers={b"Origin": [b"https://evil.example"]})
        assert not r.headers.hasHeader(b"access-control-allow-origin"), (method, path)


def _unframed_download(version: tuple[bytes, int, int]) -> tuple[Any, Any, FakeResponse]:
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(f"GET /v2/x/blobs/{DIGEST} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
    response = FakeResponse()
    response.version = version
    agent.pending[0].callback(response)
    response.protocol.dataReceived(b"part")
    response.protocol.connectionLost(Failure(PotentialDataLoss()))
    return channel, down, response


def test_close_delimited_body_relayed_close_delimited() -> None:
    """An HTTP/1.0 body without length is relayed the same way: unframed, ended by closing."""
    _, down, _ = _unframed_download((b"HTTP", 1, 0))
    head, _, body = down.value().partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"part"
    assert down.disconnecting


def test_unframed_http11_body_in_doubt_is_dropped() -> None:
    """An HTTP/1.1 body whose end can't be told from a cut is never given a chunked terminator."""
    _, down, _ = _unframed_download((b"HTTP", 1, 1))
    assert not down.value().endswith(b"0\r\n\r\n")
    assert down.disconnecting


def test_idle_before_first_byte_answers_clean_504() -> None:
    """An upstream that goes silent before any body byte gets a 504 without the upstream's entity headers."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(f"GET /v2/x/blobs/{DIGEST} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
    headers = Headers({b"content-range": [b"bytes 0-9/10"], b"docker-content-digest": [DIGEST.encode()]})
    response = FakeResponse(code=206, length=10, headers=headers)
    agent.pending[0].callback(response)
    clock.advance(10_000)
    head = down.value().split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 504")
    assert b"content-range" not in head and b"docker-content-digest" not in head
    assert b"content-length: 10\r" not in head
    assert channel._requestProducer is None


def test_idle_timeout_racing_client_close_logs_no_failure(access_log: list[LogEvent]) -> None:
    """The client leaving as the idle timer fires is a quiet 'client gone', not a logged failure."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(f"GET /v2/x/blobs/{DIGEST} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
    response = FakeResponse(length=10)
    agent.pending[0].callback(response)
    response.protocol.dataReceived(b"12345")
    clock.advance(10_000)
    channel.connectionLost(Failure(ConnectionLost()))
    response.protocol.connectionLost(Failure(ConnectionLost()))
    assert not [e for e in access_log if e.get("log_failure") is not None]


@pytest.mark.parametrize("location", [b"https://cdn.example/d\xc3\xa9j\xc3\xa0?x=1", b"/v2/\xff/blobs"])
def test_non_ascii_location_is_not_a_traceback(access_log: list[LogEvent], location: bytes) -> None:
    """A redirect with raw non-ASCII bytes in Location gets an OCI answer, never a 500 with a traceback."""
    from tests.unit import fakes

    registry = fakes.FakeRegistry()
    h = Harness(registry)
    original = fakes.FakeRegistry.render

    def render(self: fakes.FakeRegistry, request: Any) -> bytes:
        if request.path.endswith(DIGEST.encode()):
            request.setResponseCode(307)
            request.setHeader(b"location", location)
            return b""
        return original(self, request)

    registry.render = render.__get__(registry)  # type: ignore[method-assign]
    r, body = h.request("GET", f"/v2/library/x/blobs/{DIGEST}", headers={b"Authorization": [b"Bearer T"]})
    assert r.code != 500
    assert not [e for e in access_log if e.get("log_failure") is not None]


def test_non_ascii_realm_is_not_a_traceback(access_log: list[LogEvent]) -> None:
    """A challenge with a non-ASCII realm is not learnt and causes no traceback."""
    from tests.unit import fakes

    registry = fakes.FakeRegistry()
    h = Harness(registry)

    def render(self: fakes.FakeRegistry, request: Any) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="https://auth.example/t\xc3\xb6ken",service="fake"')
        return b"{}"

    registry.render = render.__get__(registry)  # type: ignore[method-assign]
    r, _ = h.request("GET", "/v2/")
    assert r.code == 401
    r, _ = h.request("GET", "/token?service=fake")
    assert r.code != 500
    assert not [e for e in access_log if e.get("log_failure") is not None]


def _raw(channel: Any, down: Any, clock: Clock, data: bytes) -> bytes:
    channel.dataReceived(data)
    clock.advance(0)
    return bytes(down.value())


@pytest.mark.parametrize(
    "head",
    [
        b"PUT /v2/x/manifests/latest HTTP/1.1\r\nHost: p\r\nContent-Length: 5000000\r\n\r\n",
        b"POST /token HTTP/1.1\r\nHost: p\r\nContent-Length: 100000\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: p\r\nContent-Length: 100000\r\n\r\n",
    ],
)
def test_oversized_small_body_refused_before_it_is_read(head: bytes) -> None:
    """A manifest, token form or stray body larger than its limit is a 413 before a byte of it is read or spooled."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    out = _raw(channel, down, clock, head)
    assert out.startswith(b"HTTP/1.1 413") and b"SIZE_INVALID" in out
    assert agent.bodies == []
    request = channel.requests[0] if channel.requests else None
    assert request is None or request.content.getvalue() == b""


def test_chunked_small_body_refused_when_it_passes_the_limit() -> None:
    """A chunked manifest body is refused as soon as it passes 4 MiB, and never buffered beyond."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(b"PUT /v2/x/manifests/latest HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * (1 << 20)
    for _ in range(5):
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    clock.advance(0)
    out = bytes(down.value())
    assert out.startswith(b"HTTP/1.1 413") and agent.bodies == []


def test_small_bodies_are_held_in_memory() -> None:
    """A manifest body is kept in memory (never a temporary file) and forwarded whole."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    body = b"{" + b" " * 200_000 + b"}"
    channel.dataReceived(b"PUT /v2/x/manifests/latest HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    clock.advance(0)
    from io import BytesIO

    assert isinstance(channel.requests[0].content, BytesIO)
    assert agent.bodies and agent.bodies[0].length == len(body)  # type: ignore[union-attr]


def test_slowloris_head_is_dropped() -> None:
    """A request head trickled in byte by byte is answered 408 and closed after --header-timeout."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    for byte in b"GET /v2/ HTTP/1.1\r\nHost: p\r\nX-A: ":
        channel.dataReceived(bytes([byte]))
        clock.advance(1)
    assert bytes(down.value()).startswith(b"HTTP/1.1 408") and down.disconnecting


def test_idle_keepalive_connection_is_not_a_slowloris() -> None:
    """A connection idle between requests is left to the ordinary idle timeout, not the head timer."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    clock.advance(45)
    assert not down.disconnecting


def test_connection_limits() -> None:
    """Connections past the total or per-client cap get a 503 with Retry-After and are closed."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from regproxy.channel import ChannelLimits, RegistrySite
    from regproxy.resource import RegistryProxy
    from regproxy.upstream import Upstream

    clock = Clock()
    upstream = Upstream.configured("http://registry.example", False, FakeAgent(), clock)  # type: ignore[arg-type]
    site = RegistrySite(RegistryProxy(upstream, clock), reactor=clock, limits=ChannelLimits(max_connections=3, max_connections_per_client=2))

    def connect(host: str) -> StringTransport:
        protocol = site.buildProtocol(IPv4Address("TCP", host, 1234))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return transport

    a1, a2, a3 = connect("10.0.0.1"), connect("10.0.0.1"), connect("10.0.0.1")
    assert not a1.disconnecting and not a2.disconnecting
    assert a3.value().startswith(b"HTTP/1.1 503") and b"Retry-After" in a3.value() and a3.disconnecting
    b1 = connect("10.0.0.2")
    b2 = connect("10.0.0.3")
    assert not b1.disconnecting and b2.disconnecting  # total cap
    assert site.connections.total == 3


def test_paused_upload_suspends_client_idle_timeout() -> None:
    """An upload paused because the upstream is slow doesn't get the client timed out by the channel."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.timeOut = 60
    channel.setTimeout(60)
    channel.dataReceived(b"PATCH /v2/x/blobs/uploads/u1 HTTP/1.1\r\nHost: p\r\nContent-Length: 10000000\r\n\r\n")
    clock.advance(0)
    body = agent.bodies[0]
    from tests.unit.test_streaming import RecordingConsumer

    body.startProducing(RecordingConsumer())  # type: ignore[union-attr]
    channel.dataReceived(b"x" * 1000)
    body.pauseProducing()  # type: ignore[union-attr]
    clock.advance(300)
    assert not down.disconnecting
    body.resumeProducing()  # type: ignore[union-attr]
    clock.advance(61)
    assert down.disconnecting  # the client really is silent now
