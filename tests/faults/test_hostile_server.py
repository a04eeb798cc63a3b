"""Self-tests of the hostile upstream: each fault does on the wire what its name says.

A fault-injection test that passes because the fault was never injected proves
nothing, so every behaviour is pinned here against a plain client
(:mod:`http.client`, or a raw socket where http.client would refuse the answer).
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.hostile import (
    LINK_LOCAL,
    STICKY_HEADERS,
    Abort,
    Framing,
    HostileServer,
    InTurn,
    Respond,
    Sink,
    bearer,
    blob,
    break_off,
    challenge,
    client_tls_context,
    fd_count,
    hang_up,
    huge_header,
    many_headers,
    ok,
    rate_limited,
    redirect,
    redirect_loop,
    rss_kib,
    server_error,
    server_tls_context,
    sha256_digest,
    stall,
    stall_body,
    token_endpoint,
    wait_until,
    wrong_bytes,
)
from tests.upstream.pki import PKIFiles, make_pki

BODY = bytes(range(256)) * 400  # 102400 bytes, every byte value, position-dependent
CUT = 50_000


@pytest.fixture
def server() -> Iterator[HostileServer]:
    with HostileServer() as started:
        yield started
    assert started.errors() == []


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKIFiles:
    return make_pki(tmp_path_factory.mktemp("hostile-pki"))


def connect(server: HostileServer, timeout: float = 5) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)


def fetch(
    server: HostileServer, path: str = "/x", method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = connect(server)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def raw_fetch(server: HostileServer, path: str = "/x") -> bytes:
    """Everything the server sends for one request, for answers http.client would refuse."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def readable(sock: socket.socket | None, wait: float = 0.2) -> bool:
    assert sock is not None
    return bool(select.select([sock], [], [], wait)[0])


@pytest.mark.parametrize("abort", [Abort.FIN, Abort.RST], ids=["fin", "rst"])
@pytest.mark.parametrize("framing", [Framing.LENGTH, Framing.CHUNKED], ids=["length", "chunked"])
def test_framed_break_off_is_incomplete(server: HostileServer, framing: Framing, abort: Abort) -> None:
    """A Content-Length or chunked body cut after N bytes (FIN or RST) is a failed read, never a short success."""
    server.route("GET", "/blob", break_off(BODY, CUT, framing, abort))
    conn = connect(server)
    conn.request("GET", "/blob")
    response = conn.getresponse()
    assert response.status == 200
    if abort is Abort.FIN:
        with pytest.raises(http.client.IncompleteRead) as info:
            response.read()
        # http.client drops the partial chunk it was inside, so chunked can show less.
        assert len(info.value.partial) == CUT if framing is Framing.LENGTH else len(info.value.partial) <= CUT
        assert BODY.startswith(info.value.partial)
    else:
        got = b""
        with pytest.raises(ConnectionResetError):
            while chunk := response.read1(65536):
                got += chunk
        assert got == BODY[:CUT]  # the RST comes after the N bytes, not instead of them
    conn.close()
    wait_until(lambda: server.open_connections() == 0)


def test_close_delimited_break_off_with_fin_looks_complete(server: HostileServer) -> None:
    """Close-delimited + FIN after N bytes reads as a complete N-byte body: the hazard that framing carries."""
    server.route("GET", "/blob", break_off(BODY, CUT, Framing.CLOSE, Abort.FIN))
    response, body = fetch(server, "/blob")
    assert response.getheader("Content-Length") is None and response.getheader("Transfer-Encoding") is None
    assert body == BODY[:CUT]


def test_close_delimited_break_off_with_rst_is_a_reset(server: HostileServer) -> None:
    """Close-delimited + RST after N bytes surfaces as ConnectionResetError, after those bytes arrived."""
    server.route("GET", "/blob", break_off(BODY, CUT, Framing.CLOSE, Abort.RST))
    conn = connect(server)
    conn.request("GET", "/blob")
    response = conn.getresponse()
    got = b""
    with pytest.raises(ConnectionResetError):
        while chunk := response.read1(65536):
            got += chunk
    assert got == BODY[:CUT]
    conn.close()


def test_close_delimited_clean_end_reads_fully(server: HostileServer) -> None:
    """A close-delimited answer carries no length, closes the connection, and reads in full."""
    server.route("GET", "/blob", ok(BODY, framing=Framing.CLOSE))
    response, body = fetch(server, "/blob")
    assert body == BODY
    assert response.getheader("Connection") == "close"
    assert response.getheader("Content-Length") is None and response.getheader("Transfer-Encoding") is None
    wait_until(lambda: server.open_connections() == 0)


def test_length_and_chunked_answers_share_one_keep_alive_connection(server: HostileServer) -> None:
    """Content-Length and chunked answers read fully and leave the connection reusable."""
    server.route("GET", "/length", ok(BODY))
    server.route("GET", "/chunked", Respond(body=BODY, framing=Framing.CHUNKED, chunk_size=1000))
    conn = connect(server)
    for path in ("/length", "/chunked", "/length"):
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.read() == BODY
    assert response.getheader("Content-Length") == str(len(BODY))
    conn.close()
    assert server.connections_accepted() == 1
    assert {r.connection for r in server.requests()} == {0}


def test_blob_serves_ranges(server: HostileServer) -> None:
    """Blob answers 200 with its digest, 206 + Content-Range for a-b, a- and -n, 416 past the end."""
    server.route(("GET", "HEAD"), "/blob", blob(BODY))
    response, body = fetch(server, "/blob")
    assert (response.status, body) == (200, BODY)
    assert response.getheader("Docker-Content-Digest") == sha256_digest(BODY)
    for value, first, last in [
        ("bytes=10-19", 10, 19),
        ("bytes=100000-", 100000, len(BODY) - 1),
        ("bytes=-5", len(BODY) - 5, len(BODY) - 1),
    ]:
        response, body = fetch(server, "/blob", headers={"Range": value})
        assert response.status == 206
        assert response.getheader("Content-Range") == f"bytes {first}-{last}/{len(BODY)}"
        assert body == BODY[first : last + 1]
    response, body = fetch(server, "/blob", headers={"Range": f"bytes={len(BODY)}-"})
    assert response.status == 416 and response.getheader("Content-Range") == f"bytes */{len(BODY)}"
    response, body = fetch(server, "/blob", method="HEAD")
    assert (response.status, body, response.getheader("Content-Length")) == (200, b"", str(len(BODY)))


def test_ranged_blob_can_break_off(server: HostileServer) -> None:
    """Blob faults apply to the range served: a resumed 206 can itself break off."""
    server.route("GET", "/blob", blob(BODY, faults=Respond(break_after=10)))
    conn = connect(server)
    conn.request("GET", "/blob", headers={"Range": "bytes=1000-"})
    response = conn.getresponse()
    assert response.status == 206
    with pytest.raises(http.client.IncompleteRead) as info:
        response.read()
    assert info.value.partial == BODY[1000:1010]
    conn.close()


def test_stall_before_head_is_released_by_event(server: HostileServer) -> None:
    """A stall before the head sends nothing (the request is already logged) until the event is set."""
    release = threading.Event()
    server.route("GET", "/slow", stall(release, ok(b"finally")))
    conn = connect(server)
    conn.request("GET", "/slow")
    wait_until(lambda: server.requests(path="/slow"))
    assert not readable(conn.sock)
    release.set()
    response = conn.getresponse()
    assert response.read() == b"finally"
    conn.close()


def test_stall_mid_body_is_released_by_event(server: HostileServer) -> None:
    """A mid-body stall sends exactly the first N bytes, then nothing, then the rest once released."""
    release = threading.Event()
    server.route("GET", "/slow", stall_body(BODY, 1000, release))
    conn = connect(server)
    conn.request("GET", "/slow")
    response = conn.getresponse()
    assert response.read(1000) == BODY[:1000]
    assert not readable(conn.sock)
    release.set()
    assert response.read() == BODY[1000:]
    conn.close()


def test_stall_for_seconds_then_answers(server: HostileServer) -> None:
    """A timed stall (seconds) and a timed head stall on Respond both answer afterwards."""
    server.route("GET", "/a", stall(0.1, ok(b"a")))
    server.route("GET", "/b", ok(b"b").but(stall_head=0.1))
    assert fetch(server, "/a")[1] == b"a"
    assert fetch(server, "/b")[1] == b"b"


def test_close_wakes_stalled_behaviours() -> None:
    """close() does not wait for a stall: the stalled client sees the connection end."""
    server = HostileServer()
    server.route("GET", "/never", stall(threading.Event(), ok(b"never")))
    conn = connect(server)
    conn.request("GET", "/never")
    wait_until(lambda: server.requests())
    server.close()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.getresponse()
    assert server.open_connections() == 0


def test_stalled_connection_does_not_block_others(server: HostileServer) -> None:
    """One thread per connection: a stalled exchange leaves other connections answered."""
    release = threading.Event()
    server.route("GET", "/slow", stall(release, ok(b"slow")))
    slow = connect(server)
    slow.request("GET", "/slow")
    assert fetch(server, "/fast")[0].status == 404
    release.set()
    assert slow.getresponse().read() == b"slow"
    slow.close()


def test_request_log_records_headers(server: HostileServer) -> None:
    """The log has method, target with query, every header in order (duplicates kept), body length, client port."""
    conn = connect(server)
    conn.putrequest("POST", "/v2/x/blobs/uploads/?digest=sha256:ab&mount=1", skip_host=True, skip_accept_encoding=True)
    for name, value in [
        ("Host", "upstream.example"),
        ("Authorization", "Bearer t"),
        ("Accept", "a/b"),
        ("Accept", "c/d"),
    ]:
        conn.putheader(name, value)
    conn.putheader("Content-Length", "5")
    conn.endheaders(b"hello")
    conn.getresponse().read()
    port = conn.sock.getsockname()[1]
    conn.close()
    [request] = server.requests()
    assert (request.method, request.path, request.query) == ("POST", "/v2/x/blobs/uploads/", "digest=sha256:ab&mount=1")
    assert request.headers == [
        ("Host", "upstream.example"),
        ("Authorization", "Bearer t"),
        ("Accept", "a/b"),
        ("Accept", "c/d"),
        ("Content-Length", "5"),
    ]
    assert request.header("authorization") == "Bearer t" and request.header_values("ACCEPT") == ["a/b", "c/d"]
    assert (request.body, request.body_length, request.client_port, request.tls) == (b"hello", 5, port, False)
    wait_until(lambda: server.open_connections() == 0)
    server.clear()
    assert server.requests() == [] and server.connections_accepted() == 0


def test_chunked_upload_with_expect_continue_is_decoded(server: HostileServer) -> None:
    """A chunked request body gets a 100 Continue when asked for, and is logged decoded."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"PATCH /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 404 ")
    [request] = server.requests()
    assert (request.method, request.body) == ("PATCH", b"abcde")


def tls_read_all(server: HostileServer, pki: PKIFiles, path: str) -> bytes:
    """Read one answer over TLS with ragged EOFs reported (SSLEOFError) instead of hidden."""
    context = client_tls_context(pki)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
        with context.wrap_socket(plain, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as s:
            s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data


def test_tls_with_test_pki(pki: PKIFiles) -> None:
    """With an SSLContext from make_pki the server speaks HTTPS; clean closes send close_notify, FIN breaks do not."""
    with HostileServer(server_tls_context(pki)) as server:
        server.route("GET", "/close", ok(BODY, framing=Framing.CLOSE))
        server.route("GET", "/cut", break_off(BODY, CUT))
        server.route("GET", "/notify", break_off(BODY, CUT, abort=Abort.CLOSE_NOTIFY))
        assert server.url == f"https://127.0.0.1:{server.port}"
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=client_tls_context(pki), timeout=5)
        conn.request("GET", "/cut")
        with pytest.raises(http.client.IncompleteRead):
            conn.getresponse().read()
        conn.close()
        assert tls_read_all(server, pki, "/close").endswith(BODY)
        assert tls_read_all(server, pki, "/notify").endswith(BODY[:CUT])
        with pytest.raises(ssl.SSLEOFError):
            tls_read_all(server, pki, "/cut")
        assert [r.tls for r in server.requests()] == [True] * 4
        assert server.errors() == []


def test_tls_handshake_failure_is_recorded(pki: PKIFiles) -> None:
    """A plain-HTTP client on the TLS port is a recorded handshake failure, not a request."""
    with HostileServer(server_tls_context(pki)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(100)
        wait_until(lambda: server.open_connections() == 0)
        assert server.requests() == []
        assert server.connections()[0].tls_error is not None


def test_default_is_404_with_oci_error(server: HostileServer) -> None:
    """With no route, the answer is a registry-style 404 JSON error."""
    response, body = fetch(server, "/v2/nothing/manifests/latest")
    assert response.status == 404 and response.getheader("Content-Type") == "application/json"
    assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"


def test_routes_newest_first_times_and_handler(server: HostileServer) -> None:
    """Newer routes win, a times=1 route answers once, the handler runs when no route matches."""
    server.route("GET", "/r", ok(b"old"))
    server.route("GET", "/r", ok(b"once"), times=1)
    server.route("POST", "/r", ok(b"post"))
    server.handler = lambda request: ok(b"handled") if request.query == "h=1" else None
    assert [fetch(server, "/r")[1] for _ in range(3)] == [b"once", b"old", b"old"]
    assert fetch(server, "/r", method="POST")[1] == b"post"
    assert fetch(server, "/other?h=1")[1] == b"handled"
    assert fetch(server, "/other")[0].status == 404


def test_in_turn_gives_each_attempt_its_behaviour(server: HostileServer) -> None:
    """InTurn: the first request breaks, later ones get the last behaviour."""
    server.route("GET", "/b", InTurn(break_off(BODY, 10), ok(BODY)))
    with pytest.raises(http.client.IncompleteRead):
        fetch(server, "/b")
    assert fetch(server, "/b")[1] == BODY
    assert fetch(server, "/b")[1] == BODY


def test_open_connections_follow_the_client_and_close(server: HostileServer) -> None:
    """open_connections counts live connections: down when the client closes, and close() ends the rest."""
    first = socket.create_connection(("127.0.0.1", server.port))
    second = socket.create_connection(("127.0.0.1", server.port))
    wait_until(lambda: server.open_connections() == 2)
    first.close()
    wait_until(lambda: server.open_connections() == 1)
    server.close()
    assert server.open_connections() == 0
    second.settimeout(5)
    assert second.recv(10) == b""
    second.close()
    assert [c.closed is not None for c in server.connections()] == [True, True]


def test_idle_timeout_drops_keep_alive_silently() -> None:
    """idle_timeout closes an idle keep-alive connection without any answer."""
    with HostileServer(idle_timeout=0.1) as server:
        conn = connect(server)
        conn.request("GET", "/x")
        response = conn.getresponse()
        response.read()
        assert response.getheader("Connection") is None
        wait_until(lambda: server.open_connections() == 0)
        assert conn.sock is not None and conn.sock.recv(10) == b""
        conn.close()


def test_no_keep_alive_announces_and_closes() -> None:
    """keep_alive=False: every answer says Connection: close and the server closes."""
    with HostileServer(keep_alive=False) as server:
        response, _ = fetch(server)
        assert response.getheader("Connection") == "close"
        wait_until(lambda: server.open_connections() == 0)


def test_hang_up_without_answer(server: HostileServer) -> None:
    """hang_up reads the request and closes (FIN: RemoteDisconnected, RST: reset)."""
    server.route("GET", "/fin", hang_up())
    server.route("GET", "/rst", hang_up(Abort.RST))
    with pytest.raises(http.client.RemoteDisconnected):
        fetch(server, "/fin")
    with pytest.raises(ConnectionResetError):
        fetch(server, "/rst")


def test_sink_records_contact() -> None:
    """A Sink is untouched until something connects, then it says who came."""
    with Sink() as sink:
        sink.assert_untouched()
        with socket.create_connection(("127.0.0.1", sink.port)):
            pass
        wait_until(lambda: sink.contacted)
        with pytest.raises(AssertionError):
            sink.assert_untouched()
        response, body = fetch(sink, "/anything")
        assert (response.status, response.getheader("X-Sink")) == (200, "1")


def test_error_answers_carry_their_headers(server: HostileServer) -> None:
    """5xx with Retry-After, and Docker Hub's 429 with ratelimit headers and TOOMANYREQUESTS."""
    server.route("GET", "/5xx", server_error(502, retry_after="7"))
    server.route("GET", "/429", rate_limited())
    response, body = fetch(server, "/5xx")
    assert (response.status, response.getheader("Retry-After")) == (502, "7")
    response, body = fetch(server, "/429")
    assert response.status == 429
    assert response.getheader("Retry-After") == "60"
    assert response.getheader("ratelimit-limit") == "100;w=21600"
    assert response.getheader("ratelimit-remaining") == "0;w=21600"
    assert response.getheader("docker-ratelimit-source") == "1.2.3.4"
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"


def test_redirects(server: HostileServer) -> None:
    """307s to a raw non-ASCII Location, to link-local, and to the very same URL (a loop)."""
    raw_location = b"http://127.0.0.1:1/caf\xc3\xa9/\xff"
    server.route("GET", "/raw", redirect(raw_location))
    server.route("GET", "/meta", redirect(LINK_LOCAL))
    server.route("GET", "/loop", redirect_loop())
    response, _ = fetch(server, "/raw")
    assert response.status == 307
    assert response.getheader("Location", "").encode("latin-1") == raw_location
    assert fetch(server, "/meta")[0].getheader("Location") == LINK_LOCAL
    assert fetch(server, "/loop?x=1")[0].getheader("Location") == f"{server.url}/loop?x=1"


def test_challenge_and_token_endpoint(server: HostileServer) -> None:
    """401 carries the given WWW-Authenticate bytes; the token endpoint answers JSON after its delay."""
    value = bearer("https://auth.évil.example/token", "svc", "repository:x:pull")
    server.route("GET", "/v2/", challenge(value))
    release = threading.Event()
    server.route(("GET", "POST"), "/token", token_endpoint("tok", 60, delay=release))
    response, _ = fetch(server, "/v2/")
    assert response.status == 401
    assert response.getheader("WWW-Authenticate", "").encode("latin-1") == value
    release.set()
    response, body = fetch(server, "/token")
    assert json.loads(body)["token"] == "tok" and json.loads(body)["expires_in"] == 60


def test_wrong_bytes_keep_length_and_digest(server: HostileServer) -> None:
    """wrong_bytes and a corrupted Blob send the right length (and digest header) with other content."""
    server.route("GET", "/wrong", wrong_bytes(BODY))
    server.route("GET", "/blob", blob(BODY, corrupted=True))
    _, body = fetch(server, "/wrong")
    assert len(body) == len(BODY) and body != BODY
    response, body = fetch(server, "/blob")
    assert response.getheader("Docker-Content-Digest") == sha256_digest(BODY) != sha256_digest(body)
    assert len(body) == len(BODY)


def test_header_tricks(server: HostileServer) -> None:
    """Sticky headers arrive as given; a 64 KiB header and 1000 headers go out (read raw: http.client refuses them)."""
    server.route("GET", "/sticky", ok(b"", headers=STICKY_HEADERS))
    server.route("GET", "/huge", ok(b"", headers=huge_header()))
    server.route("GET", "/many", ok(b"", headers=many_headers()))
    response, _ = fetch(server, "/sticky")
    assert len(response.headers.get_all("Set-Cookie") or []) == 2
    assert response.getheader("Strict-Transport-Security") and response.getheader("Alt-Svc")
    assert b"X-Huge: " + b"h" * 65536 + b"\r\n" in raw_fetch(server, "/huge")
    assert raw_fetch(server, "/many").count(b"\r\nX-Many-") == 1000


def test_process_helpers(tmp_path: Path) -> None:
    """fd_count sees a new descriptor, rss_kib reads VmRSS, wait_until fails loudly on timeout."""
    before = fd_count(os.getpid())
    with (tmp_path / "f").open("w"):
        assert fd_count(os.getpid()) == before + 1
    assert rss_kib(os.getpid()) > 0
    assert wait_until(lambda: 42) == 42
    with pytest.raises(AssertionError):
        wait_until(lambda: False, timeout=0.05)
