"""The fault suite: regproxy, as a real subprocess, in front of upstreams that misbehave.

Every test injects one fault on a real loopback connection (see :mod:`tests.faults.hostile`)
and checks what the client sees; then :meth:`Rig.after_fault` checks that the proxy
survived it: a normal request still succeeds, no file descriptor leaked, RSS is back
near its warm-up baseline, and the proxy logged no traceback.

The proxies run with one-second timeouts (``--response-timeout 1 --idle-timeout 1``),
so every fault resolves quickly; the elapsed times asserted below are loose bounds
that tell "answered once the timeout ran out" from "answered at once" or "hung until
the client gave up", not performance measurements.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest

from tests.faults.conftest import LOGIN, NORMAL_PATH, Rig, TLSMaterial, Trap, private_local_address, teach_realm
from tests.faults.hostile import (
    LINK_LOCAL,
    Abort,
    Behaviour,
    Exchange,
    Framing,
    Sink,
    bearer,
    break_off,
    challenge,
    ok,
    rate_limited,
    redirect,
    redirect_loop,
    server_error,
    sha256_digest,
    stall,
    stall_body,
    token_endpoint,
    wait_until,
)
from tests.proxyproc import free_port

BODY = bytes(range(256)) * 4096  # 1 MiB, position-dependent bytes
DIGEST = sha256_digest(BODY)
CUT = 300_000
BLOB_PATH = f"/v2/fault/blobs/{DIGEST}"
BLOB_HEADERS = [("Content-Type", "application/octet-stream"), ("Docker-Content-Digest", DIGEST)]
#: Large enough that neither socket buffers nor the proxy's read buffers can hold it.
BIG = 64 << 20
MIB = 1 << 20


def open_download(
    rig: Rig, path: str = BLOB_PATH, timeout: float = 10.0
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Start a GET through the proxy and return the connection and the response, body unread."""
    conn = http.client.HTTPConnection("127.0.0.1", rig.proxy.port, timeout=timeout)
    conn.request("GET", path)
    return conn, conn.getresponse()


def read_to_failure(response: http.client.HTTPResponse) -> bytes:
    """Read a body that must break off; returns what arrived before the failure (empty after a reset).

    A whole-body read: http.client's partial reads (C{read(n)}, C{read1}) report a
    Content-Length body that ends short as a plain end of data.
    """
    with pytest.raises((http.client.IncompleteRead, ConnectionError)) as info:
        response.read()
    return info.value.partial if isinstance(info.value, http.client.IncompleteRead) else b""


def access_line(rig: Rig, method: str, path: str) -> str:
    """The proxy's access-log line for a request of this test (it lands just after the answer)."""
    needle = f'"{method} {path}"'

    def found() -> str:
        return next((line for line in rig.new_log().splitlines() if needle in line), "")

    return wait_until(found, timeout=5, what=f"the access-log line for {method} {path}")


# -- upstream dies mid-body ----------------------------------------------------------


@pytest.mark.parametrize("abort", [Abort.FIN, Abort.RST], ids=["fin", "rst"])
@pytest.mark.parametrize("framing", [Framing.LENGTH, Framing.CHUNKED, Framing.CLOSE], ids=lambda f: f.value)
def test_upstream_dies_mid_body(hostile: Rig, framing: Framing, abort: Abort) -> None:
    """An HTTP/1.1 body cut after 300 kB (any framing, FIN or RST) reaches the client as a failed transfer, never a complete one."""
    [up] = hostile.upstreams
    up.route("GET", BLOB_PATH, break_off(BODY, CUT, framing, abort, headers=BLOB_HEADERS))
    conn, response = open_download(hostile)
    assert response.status == 200
    if framing is Framing.LENGTH:
        assert response.getheader("Content-Length") == str(len(BODY))
    else:  # an HTTP/1.1 body without length is relayed chunked: its end must be marked
        assert response.getheader("Transfer-Encoding") == "chunked"
    got = read_to_failure(response)
    conn.close()
    assert len(got) <= CUT and BODY.startswith(got)
    assert "(truncated)" in access_line(hostile, "GET", BLOB_PATH)
    hostile.after_fault(f"mid-body {framing.value} {abort.value}")


def http10(body: bytes, abort: Abort) -> Behaviour:
    """An HTTP/1.0 answer without Content-Length: its body ends when the connection does."""

    def behaviour(x: Exchange) -> None:
        x.send(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + body)
        x.end(abort)

    return behaviour


def test_http10_close_delimited_cut_with_fin_is_relayed_close_delimited(hostile: Rig) -> None:
    """An HTTP/1.0 close-delimited body ended by FIN is relayed close-delimited (no length, no chunking), byte for byte."""
    [up] = hostile.upstreams
    up.route("GET", BLOB_PATH, http10(BODY[:CUT], Abort.FIN))
    conn, response = open_download(hostile)
    assert response.status == 200
    assert response.getheader("Content-Length") is None and response.getheader("Transfer-Encoding") is None
    assert response.getheader("Connection") == "close"
    # The client can tell no more than the proxy could: the bytes that came, then the close.
    assert response.read() == BODY[:CUT]
    conn.close()
    assert "(truncated)" not in access_line(hostile, "GET", BLOB_PATH)
    hostile.after_fault("http/1.0 close-delimited fin")


def test_http10_close_delimited_cut_with_rst_fails_the_transfer(hostile: Rig) -> None:
    """An HTTP/1.0 close-delimited body cut by an RST reaches the client as a failed transfer (reset), not a clean end."""
    [up] = hostile.upstreams
    up.route("GET", BLOB_PATH, http10(BODY[:CUT], Abort.RST))
    conn, response = open_download(hostile)
    status = response.status
    try:
        outcome = f"clean end after {len(response.read())} bytes"
    except (http.client.IncompleteRead, ConnectionError) as e:
        outcome = f"failed: {e!r}"
    conn.close()
    print(f"\nhttp/1.0 close-delimited rst: {status}, {outcome}")
    hostile.after_fault("http/1.0 close-delimited rst")
    assert status == 200
    assert outcome.startswith("failed"), outcome


# -- stalls ---------------------------------------------------------------------------




def test_stall_before_head_gives_504(hostile: Rig) -> None:
    """An upstream that never sends its head: 504 with OCI error JSON after --response-timeout (1 s)."""
    [up] = hostile.upstreams
    release = threading.Event()
    up.route("GET", BLOB_PATH, stall(release, ok(BODY)))
    reply = hostile.call("GET", BLOB_PATH)
    release.set()
    print(f"\nstall before head: {reply.status} {reply.body[:200]!r} after {reply.elapsed:.2f}s")
    hostile.after_fault("stall before head")
    assert reply.error()["code"] == "UNAVAILABLE"
    assert 0.9 <= reply.elapsed < 5
    assert reply.status == 504


@pytest.mark.parametrize("framing", [Framing.LENGTH, Framing.CHUNKED], ids=lambda f: f.value)
def test_stall_mid_body_drops_the_transfer(hostile: Rig, framing: Framing) -> None:
    """An upstream silent mid-body: after --idle-timeout (1 s) the client's transfer is dropped, never finished short."""
    [up] = hostile.upstreams
    release = threading.Event()
    up.route("GET", BLOB_PATH, stall_body(BODY, CUT, release, framing, headers=BLOB_HEADERS))
    started = time.monotonic()
    conn, response = open_download(hostile)
    assert response.status == 200
    got = read_to_failure(response)
    elapsed = time.monotonic() - started
    conn.close()
    release.set()  # the upstream thread wakes, finds the proxy gone, and ends
    print(f"\nstall mid-body ({framing.value}): dropped after {len(got)} bytes, {elapsed:.2f}s")
    assert len(got) <= CUT and BODY.startswith(got)
    assert 0.9 <= elapsed < 5
    assert "(truncated)" in access_line(hostile, "GET", BLOB_PATH)
    hostile.after_fault(f"stall mid-body {framing.value}")


# -- error answers from the upstream --------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_upstream_5xx_is_relayed(hostile: Rig, status: int) -> None:
    """An upstream 5xx is passed on as it is (status, body, Retry-After), not replaced by the proxy's own error."""
    [up] = hostile.upstreams
    answer = server_error(status, retry_after="7")
    up.route("GET", r"/v2/fault/manifests/latest", answer)
    reply = hostile.call("GET", "/v2/fault/manifests/latest")
    assert reply.status == status
    assert reply.body == answer.body  # the upstream's own document, byte for byte
    assert reply.header("Retry-After") == "7"
    assert f"upstream={status}" in access_line(hostile, "GET", "/v2/fault/manifests/latest")
    hostile.after_fault(f"upstream {status}")


def test_upstream_429_is_relayed_with_retry_after(hostile: Rig) -> None:
    """Docker Hub's 429 TOOMANYREQUESTS reaches the client with Retry-After (and the body) intact."""
    [up] = hostile.upstreams
    answer = rate_limited(retry_after="60")
    up.route("GET", r"/v2/fault/manifests/latest", answer)
    reply = hostile.call("GET", "/v2/fault/manifests/latest")
    assert reply.status == 429
    assert reply.header("Retry-After") == "60"
    assert reply.body == answer.body and reply.error()["code"] == "TOOMANYREQUESTS"
    print(f"\n429: ratelimit-remaining relayed as {reply.header('ratelimit-remaining')!r}")
    hostile.after_fault("upstream 429")


# -- the token server -------------------------------------------------------------------


def test_token_server_down_gives_502(token: Rig) -> None:
    """A token realm that refuses connections: the client's GET /token gets a 502 OCI error."""
    realm = f"http://127.0.0.1:{free_port()}/token"  # nothing listens there: connection refused
    teach_realm(token, realm)
    reply = token.call("GET", "/token?service=hostile&scope=repository:fault:pull", {"Authorization": LOGIN})
    print(f"\ntoken server down: {reply.status} {reply.body[:200]!r} after {reply.elapsed:.2f}s")
    assert reply.status == 502
    assert reply.error()["code"] == "UNAVAILABLE"
    assert reply.elapsed < 3
    token.after_fault("token server down")


def test_token_server_down_anonymous_pull_gives_502(token: Rig) -> None:
    """An anonymous pull while the token realm refuses connections ends in a 502 OCI error, at whichever step asks the realm."""
    [up] = token.upstreams
    dead = challenge(bearer(f"http://127.0.0.1:{free_port()}/token", "hostile", "repository:fault:pull"))
    up.route("GET", r"/v2/(fault/manifests/latest)?", dead)
    # docker's sequence: /v2/, the token endpoint the challenge names, the manifest with that token.
    # The proxy may forward the token request or answer it itself (and ask the realm for its own
    # token later): either way the realm is down, and some step must say so.
    steps = [token.call("GET", "/v2/")]
    if steps[-1].status == 401:
        steps.append(token.call("GET", "/token?service=hostile&scope=repository:fault:pull"))
        if steps[-1].status == 200:
            bearer_token = steps[-1].json()["token"]
            steps.append(token.call("GET", "/v2/fault/manifests/latest", {"Authorization": f"Bearer {bearer_token}"}))
    print(f"\nanonymous pull, token server down: {[(r.status, round(r.elapsed, 2)) for r in steps]}")
    final = steps[-1]
    assert final.status == 502, [(r.status, r.body[:200]) for r in steps]
    assert final.error()["code"] == "UNAVAILABLE"
    token.after_fault("token server down, anonymous pull")


def test_token_server_slow_gives_504(token: Rig) -> None:
    """A token realm slower than --response-timeout (1 s): the client's GET /token gets a 504 OCI error."""
    [up] = token.upstreams
    release = threading.Event()
    up.route("GET", r"/slow-token", token_endpoint(delay=release))
    teach_realm(token, f"{up.url}/slow-token")
    reply = token.call("GET", "/token?service=hostile&scope=repository:fault:pull", {"Authorization": LOGIN})
    release.set()
    print(f"\ntoken server slow: {reply.status} {reply.body[:200]!r} after {reply.elapsed:.2f}s")
    assert up.requests(path=r"/slow-token"), "the slow realm was asked"
    token.after_fault("token server slow")
    assert reply.error()["code"] == "UNAVAILABLE"
    assert 0.9 <= reply.elapsed < 5
    assert reply.status == 504


# -- DNS ----------------------------------------------------------------------------------


def test_dns_failure_gives_502_quickly(dns: Rig) -> None:
    """An upstream host name that does not resolve: 502 OCI error, well before any timeout, and the proxy keeps serving."""
    for _ in range(3):
        reply = dns.call("GET", "/v2/fault/manifests/latest", timeout=5)
        print(f"\nDNS failure: {reply.status} {reply.body[:200]!r} after {reply.elapsed:.2f}s")
        assert reply.status == 502
        assert reply.error()["code"] == "UNAVAILABLE"
        assert reply.elapsed < 3  # no waiting for the 10 s connect timeout
    dns.after_fault("dns failure")


# -- TLS ----------------------------------------------------------------------------------


@pytest.mark.parametrize("certificate", ["untrusted-ca", "expired", "wrong-name"])
def test_bad_upstream_certificate_gives_502(tls: Rig, tls_material: TLSMaterial, certificate: str) -> None:
    """An upstream certificate from an untrusted CA, expired, or for another name: 502 OCI error, no traceback."""
    [up] = tls.upstreams
    up.tls = tls_material.bad[certificate]
    reply = tls.call("GET", NORMAL_PATH)
    print(f"\nTLS {certificate}: {reply.status} {reply.body[:300]!r} after {reply.elapsed:.2f}s")
    assert reply.status == 502
    assert reply.error()["code"] == "UNAVAILABLE"
    assert up.requests() == [], "no request may go over a connection that failed verification"
    wait_until(lambda: up.connections() and all(c.tls_error for c in up.connections()), what="handshake refused")
    tls.after_fault(f"tls {certificate}")


# -- redirects ------------------------------------------------------------------------------


def test_redirect_loop_gives_502(hostile: Rig) -> None:
    """A 307 to itself, for ever: 502 after --max-redirects (3) hops, i.e. four upstream requests."""
    [up] = hostile.upstreams
    up.route("GET", BLOB_PATH, redirect_loop())
    reply = hostile.call("GET", BLOB_PATH)
    assert reply.status == 502
    assert reply.error()["code"] == "UNAVAILABLE"
    assert len(up.requests(path=BLOB_PATH)) == 4
    hostile.after_fault("redirect loop")


def test_redirect_from_https_to_http_is_refused(tls: Rig) -> None:
    """An HTTPS upstream redirecting to plain http://: 502, and the target is never contacted."""
    [up] = tls.upstreams
    with Sink() as sink:
        up.route("GET", BLOB_PATH, redirect(f"{sink.url}/blob"))
        reply = tls.call("GET", BLOB_PATH)
        assert reply.status == 502
        assert "forbidden" in str(reply.error()["message"])
        assert "it leads from https to plain http" in tls.new_log()
        time.sleep(0.2)
        sink.assert_untouched()
    tls.after_fault("redirect https -> http")


#: Redirect targets refused for their address alone: the scheme is one the upstream
#: itself uses (so "https to http" is not what refuses them), the host a literal
#: address of a class the proxy never dials for a loopback upstream.
FORBIDDEN_TARGETS = {
    "link-local-http": ("hostile", LINK_LOCAL, "is a link-local address"),
    "link-local-https": ("tls", LINK_LOCAL.replace("http://", "https://"), "is a link-local address"),
    "private-10-http": ("hostile", "http://10.20.30.40/blobs/x", "is a private address"),
    "private-10-https": ("tls", "https://10.20.30.40/blobs/x", "is a private address"),
}


@pytest.mark.parametrize("kind", list(FORBIDDEN_TARGETS))
def test_redirect_to_internal_address_is_refused(request: pytest.FixtureRequest, kind: str) -> None:
    """A redirect to the cloud metadata address or a private 10.x address: 502 at once, no connection attempted."""
    fixture, target, why = FORBIDDEN_TARGETS[kind]
    rig: Rig = request.getfixturevalue(fixture)
    [up] = rig.upstreams
    up.route("GET", BLOB_PATH, redirect(target))
    reply = rig.call("GET", BLOB_PATH, timeout=5)
    assert reply.status == 502
    # Refused by policy, not "unreachable" after a connection attempt timed out or failed.
    assert "forbidden" in str(reply.error()["message"])
    assert reply.elapsed < 2  # no 3 s connect timeout was waited out
    assert f"not following a redirect to {target}: " in rig.new_log()
    assert why in rig.new_log()
    rig.after_fault(f"redirect to {kind}")


def test_redirect_to_own_private_address_is_not_dialled(tls: Rig) -> None:
    """A redirect to this machine's own private address, where a trap listens: 502, the trap never contacted."""
    address = private_local_address()
    assert address is not None, "this machine has no private non-loopback IPv4 address for the trap"
    [up] = tls.upstreams
    with Trap(address) as trap:
        up.route("GET", BLOB_PATH, redirect(f"https://{address}:{trap.port}/blob"))
        reply = tls.call("GET", BLOB_PATH)
        assert reply.status == 502
        assert "forbidden" in str(reply.error()["message"])
        assert f"{address} is a private address" in tls.new_log()
        time.sleep(0.2)
        assert not trap.contacted, f"the proxy connected to {address}:{trap.port}"
        with socket.create_connection((address, trap.port), timeout=5):  # control: the trap does catch a dial
            pass
        wait_until(lambda: trap.contacted, what="the control connection to reach the trap")
    tls.after_fault("redirect to own private address")


# -- the client goes away --------------------------------------------------------------------


def test_client_disconnects_mid_download(hostile: Rig) -> None:
    """A client leaving after 1 MiB of a 64 MiB blob: the proxy closes its upstream connection and keeps serving."""
    [up] = hostile.upstreams
    up.route("GET", BLOB_PATH, ok(bytes(BIG), headers=BLOB_HEADERS))
    conn, response = open_download(hostile)
    assert response.status == 200 and response.getheader("Content-Length") == str(BIG)
    assert len(response.read(MIB)) == MIB
    wait_until(lambda: up.open_connections() == 1, what="the upstream transfer to be under way")
    assert conn.sock is not None
    conn.sock.close()
    conn.close()
    started = time.monotonic()
    wait_until(lambda: up.open_connections() == 0, timeout=5, what="the proxy to close its upstream connection")
    print(f"\nclient left mid-download: upstream connection closed {time.monotonic() - started:.2f}s later")
    hostile.after_fault("client disconnects mid-download")


def test_client_disconnects_mid_upload(hostile: Rig) -> None:
    """A client leaving 1 MiB into a 64 MiB PATCH: the upstream sees its request body end short, the proxy keeps serving."""
    [up] = hostile.upstreams
    path = "/v2/fault/blobs/uploads/8c6a1f0e-upload"
    head = (
        f"PATCH {path} HTTP/1.1\r\nHost: {hostile.proxy.host}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {BIG}\r\n\r\n"
    ).encode()
    client = socket.create_connection(("127.0.0.1", hostile.proxy.port), timeout=10)
    client.sendall(head + bytes(MIB))
    # The proxy streams the upload: the upstream connection opens before the body is in.
    wait_until(lambda: up.open_connections() == 1, what="the proxy to open the upstream upload")
    time.sleep(0.2)
    client.close()
    started = time.monotonic()
    wait_until(lambda: up.open_connections() == 0, timeout=5, what="the upstream upload connection to end")
    print(f"\nclient left mid-upload: upstream request ended {time.monotonic() - started:.2f}s later")
    assert up.requests(method="PATCH") == [], "the upstream never got a complete PATCH"
    [upload] = up.connections()
    assert upload.closed is not None and upload.requests == 0
    hostile.after_fault("client disconnects mid-upload")
