"""An upstream that breaks off mid-body: the client must see a failed transfer, never a complete one.

The upstream here is a tiny raw-socket server, so the break happens on a real
connection between two real processes (the in-memory variant is in tests/unit).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxyproc import ProxyProcess

SHA = "sha256:" + "d" * 64
HALF = 300_000


class BreakingUpstream(threading.Thread):
    """Answers every request with a head promising more than it sends, then closes."""

    def __init__(self, chunked: bool) -> None:
        super().__init__(daemon=True)
        self.chunked = chunked
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                if self.chunked:
                    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
                    conn.sendall(head + b"%x\r\n" % HALF + b"x" * HALF + b"\r\n")
                else:
                    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n" % (2 * HALF)
                    conn.sendall(head + b"x" * HALF)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=[False, True], ids=["content-length", "chunked"])
def breaking(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProxyProcess]:
    upstream = BreakingUpstream(request.param)
    upstream.start()
    with ProxyProcess(tmp_path, f"http://127.0.0.1:{upstream.port}", ["--no-library-prefix"], tls=False) as proxy:
        yield proxy
    upstream.close()


def test_truncated_upstream_body_is_not_presented_complete(breaking: ProxyProcess) -> None:
    """The client gets a broken transfer (IncompleteRead / reset), never a clean end after half the bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", breaking.port, timeout=30)
    conn.request("GET", f"/v2/x/blobs/{SHA}")
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        response.read()
    conn.close()
    deadline = time.monotonic() + 10  # the access-log line lands just after the drop
    while "(truncated)" not in breaking.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = breaking.log_text()
    assert "(truncated)" in log and "Traceback" not in log
