"""Backpressure both ways, seen on the transports: download pipe and streamed upload."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer

from regproxy.channel import RegistrySite
from regproxy.resource import RegistryProxy
from regproxy.upstream import Upstream

DIGEST = "sha256:" + "c" * 64


class FakeResponse:
    """An IResponse whose body transport is a StringTransport we can inspect."""

    def __init__(self, code: int = 200, length: Any = UNKNOWN_LENGTH, headers: Headers | None = None) -> None:
        self.code = code
        self.phrase = b"OK"
        self.length = length
        self.headers = headers or Headers()
        self.version = (b"HTTP", 1, 1)
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class FakeAgent:
    def __init__(self) -> None:
        self.responses: list[FakeResponse] = []
        self.bodies: list[IBodyProducer | None] = []
        self.pending: list[Deferred[FakeResponse]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None, body: IBodyProducer | None = None) -> Deferred[FakeResponse]:
        self.bodies.append(body)
        d: Deferred[FakeResponse] = Deferred()
        self.pending.append(d)
        return d


def channel_for(agent: FakeAgent, clock: Clock, max_upload: int = 0) -> tuple[Any, StringTransport]:
    upstream = Upstream.configured("http://registry.example", False, agent, clock)  # type: ignore[arg-type]
    site = RegistrySite(RegistryProxy(upstream, clock), reactor=clock)
    site.max_upload_size = max_upload
    channel = site.buildProtocol(None)
    down = StringTransport()
    channel.makeConnection(down)
    return channel, down


def start_download(length: Any = UNKNOWN_LENGTH) -> tuple[Any, StringTransport, FakeResponse, Clock]:
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(f"GET /v2/x/blobs/{DIGEST} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
    response = FakeResponse(length=length)
    agent.pending[0].callback(response)
    return channel, down, response, clock


def test_slow_client_pauses_upstream() -> None:
    """When the client's socket is full, the upstream socket is paused; resumed when it drains."""
    channel, down, response, _ = start_download()
    response.protocol.dataReceived(b"x" * 1000)
    assert down.producer is not None
    down.producer.pauseProducing()
    assert response.transport.producerState == "paused"
    down.producer.resumeProducing()
    assert response.transport.producerState == "producing"


def test_client_disconnect_stops_upstream() -> None:
    """A client that leaves mid-body stops the upstream read."""
    channel, down, response, _ = start_download()
    response.protocol.dataReceived(b"x" * 10)
    down.producer.stopProducing()
    channel.connectionLost(Failure(ConnectionLost()))
    assert response.transport.producerState == "stopped"


def test_upstream_failure_midbody_drops_client_not_finish() -> None:
    """An upstream that dies mid-body makes the proxy drop the client, never write the final chunk."""
    channel, down, response, _ = start_download()
    response.protocol.dataReceived(b"partial")
    response.protocol.connectionLost(Failure(ConnectionLost("upstream died")))
    assert down.disconnecting
    assert not down.value().endswith(b"0\r\n\r\n")


def test_complete_body_finishes() -> None:
    """A complete upstream body is finished normally (chunked terminator written)."""
    channel, down, response, _ = start_download()
    response.protocol.dataReceived(b"all")
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert down.value().endswith(b"0\r\n\r\n")
    assert not down.disconnecting


def test_content_length_passed_when_known() -> None:
    """A known upstream length is passed on as Content-Length (no chunking)."""
    channel, down, response, _ = start_download(length=3)
    response.protocol.dataReceived(b"abc")
    response.protocol.connectionLost(Failure(ResponseDone()))
    head = down.value().split(b"\r\n\r\n")[0].lower()
    assert b"content-length: 3" in head and b"transfer-encoding" not in head


def test_idle_upstream_times_out_and_drops_client() -> None:
    """An upstream body silent past the idle timeout is abandoned and the client dropped."""
    channel, down, response, clock = start_download()
    response.protocol.dataReceived(b"x")
    clock.advance(121)
    assert response.transport.producerState == "stopped"
    response.protocol.connectionLost(Failure(ConnectionLost()))
    assert down.disconnecting


def test_paused_client_does_not_trigger_idle_timeout() -> None:
    """A slow client (pipe paused) is not the upstream's idleness."""
    channel, down, response, clock = start_download()
    response.protocol.dataReceived(b"x")
    down.producer.pauseProducing()
    clock.advance(119)
    assert response.transport.producerState == "paused"


def test_client_that_never_reads_is_dropped() -> None:
    """A client that leaves its download unread past --client-timeout is dropped and the upstream closed."""
    channel, down, response, clock = start_download()
    response.protocol.dataReceived(b"x")
    down.producer.pauseProducing()
    clock.advance(121)
    assert response.transport.producerState == "stopped"
    assert down.disconnecting


class RecordingConsumer:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


def test_upload_dispatched_before_body_and_streamed() -> None:
    """A chunked PATCH reaches the upstream as soon as its headers are in; chunks flow as they arrive."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(b"PATCH /v2/x/blobs/uploads/u1?_state=s HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
    clock.advance(0)
    assert len(agent.bodies) == 1, "dispatched once the headers are in"
    body = agent.bodies[0]
    assert body is not None and body.length is UNKNOWN_LENGTH
    consumer = RecordingConsumer()
    done = body.startProducing(consumer)  # type: ignore[arg-type]
    channel.dataReceived(b"5\r\nhello\r\n")
    assert consumer.data == [b"hello"]
    channel.dataReceived(b"3\r\nabc\r\n0\r\n\r\n")
    assert b"".join(consumer.data) == b"helloabc"
    assert done.called


def test_upload_backpressure_pauses_client_socket() -> None:
    """A slow upstream (body producer paused) stops reading the client's socket, and resumes it."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(b"PATCH /v2/x/blobs/uploads/u1 HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\n")
    clock.advance(0)
    body = agent.bodies[0]
    assert body is not None and body.length == 10
    body.startProducing(RecordingConsumer())  # type: ignore[arg-type]
    body.pauseProducing()
    assert down.producerState == "paused"
    body.resumeProducing()
    assert down.producerState == "producing"


def test_upload_early_bytes_buffered_then_bounded() -> None:
    """Body bytes arriving before the upstream connection is ready are kept, and past 1 MiB the client is paused."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    size = 3 << 20
    channel.dataReceived(b"PATCH /v2/x/blobs/uploads/u1 HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % size)
    channel.dataReceived(b"a" * (1 << 20))
    clock.advance(0)
    assert down.producerState == "paused"
    consumer = RecordingConsumer()
    agent.bodies[0].startProducing(consumer)  # type: ignore[union-attr]
    assert sum(map(len, consumer.data)) == 1 << 20
    assert down.producerState == "producing"


def test_upload_over_limit_is_413_without_upstream() -> None:
    """A Content-Length above --max-upload-size is refused with 413 before anything is sent upstream."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock, max_upload=100)
    channel.dataReceived(b"PATCH /v2/x/blobs/uploads/u1 HTTP/1.1\r\nHost: p\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n" + b"x" * 100)
    clock.advance(0)
    assert agent.bodies == []
    assert down.value().startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413")
    assert b"SIZE_INVALID" in down.value()
    assert b"connection: close" in down.value().lower()
    # The rest of the body is read and dropped before closing, so the client reads the 413.
    assert not down.disconnecting
    channel.dataReceived(b"x" * 900)
    assert down.disconnecting


def test_bad_upload_name_answered_cleanly_with_body_in_flight() -> None:
    """A malformed upload path with body bytes in the same packet gets its 400, no traceback."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(b"PATCH /v2/BAD/blobs/uploads/u1 HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    clock.advance(0)
    assert down.value().startswith(b"HTTP/1.1 400") and b"NAME_INVALID" in down.value()
    assert agent.bodies == []
    channel.dataReceived(b"5\r\nworld\r\n")
    assert not down.disconnecting
    clock.advance(2)  # linger: closed once the client has been silent a moment
    assert down.disconnecting


def test_small_bodies_are_not_streamed() -> None:
    """Manifest PUTs are ordinary buffered requests, dispatched once complete."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(b"PUT /v2/x/manifests/latest HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\n")
    assert agent.bodies == []
    channel.dataReceived(b"{}")
    assert len(agent.bodies) == 1 and agent.bodies[0] is not None and agent.bodies[0].length == 2


def test_tls_on_plain_port_answered_at_once() -> None:
    """A TLS ClientHello on the plain-HTTP listener gets an immediate 400 and a close (clients fall back to http)."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\n" + b"\x00" * 64)
    assert down.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert down.disconnecting and agent.bodies == []


def test_upload_stopped_by_upstream_discards_rest_and_never_fires() -> None:
    """When the upstream stops taking the body (early answer), later bytes are dropped and startProducing's Deferred stays unfired."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(b"PATCH /v2/x/blobs/uploads/u1 HTTP/1.1\r\nHost: p\r\nContent-Length: 6\r\n\r\nabc")
    clock.advance(0)
    body = agent.bodies[0]
    assert body is not None
    consumer = RecordingConsumer()
    done = body.startProducing(consumer)  # type: ignore[arg-type]
    body.stopProducing()
    channel.dataReceived(b"def")
    assert b"".join(consumer.data) == b"abc"
    assert not done.called


def test_upstream_response_timeout_is_504() -> None:
    """No response head from the upstream within --response-timeout: 504 OCI error, upstream request cancelled."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(b"GET /v2/x/manifests/latest HTTP/1.1\r\nHost: p\r\n\r\n")
    assert len(agent.pending) == 1
    clock.advance(61)
    assert down.value().startswith(b"HTTP/1.1 504")
    assert b'"UNAVAILABLE"' in down.value()
    assert agent.pending[0].called  # cancelled by the timeout


def test_streamed_upload_response_timeout_counts_from_end_of_body() -> None:
    """A streamed upload may take long; once its body is complete, a silent upstream still gets a 504."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock)
    channel.dataReceived(b"PATCH /v2/x/blobs/uploads/u1 HTTP/1.1\r\nHost: p\r\nContent-Length: 6\r\n\r\nabc")
    clock.advance(0)
    agent.bodies[0].startProducing(RecordingConsumer())  # type: ignore[union-attr]
    clock.advance(300)  # a slow client: no timeout while the body is still coming
    assert down.value() == b""
    channel.dataReceived(b"def")
    clock.advance(61)
    assert down.value().startswith(b"HTTP/1.1 504")


def test_upload_failing_after_upstream_answered_just_stops() -> None:
    """Past the size limit after the upstream already answered (early 404): the body just stops, no late error upstream."""
    agent, clock = FakeAgent(), Clock()
    channel, down = channel_for(agent, clock, max_upload=4)
    channel.dataReceived(b"PATCH /v2/x/blobs/uploads/u1 HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    clock.advance(0)
    done = agent.bodies[0].startProducing(RecordingConsumer())  # type: ignore[union-attr]
    response = FakeResponse(code=404, length=0)
    agent.pending[0].callback(response)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert down.value().startswith(b"HTTP/1.1 404")
    channel.dataReceived(b"3\r\ndef\r\n")  # now over the limit
    assert not done.called
