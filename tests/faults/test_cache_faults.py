"""The blob cache when things go wrong: cut and wrong upstream bodies, kill -9, eviction, a full disk.

The upstream is a HostileServer serving blobs from memory (with Range), so each
fault is exact; the proxy is a real ``twist regproxy`` with ``--cache-dir``.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.hostile import Abort, Blob, HostileServer, InTurn, Respond, sha256_digest, v2_base, wait_until
from tests.integration.http import request, sha256_of
from tests.proxyproc import ProxyProcess

MIB = 1 << 20


def data(seed: int, size: int) -> bytes:
    """Deterministic incompressible-enough bytes."""
    import random

    return random.Random(seed).randbytes(size)


@pytest.fixture
def upstream() -> Iterator[HostileServer]:
    with HostileServer() as server:
        server.route("GET", r"/v2/", v2_base())
        yield server


def start(workdir: Path, upstream: HostileServer, *extra: str) -> ProxyProcess:
    args = ["--no-library-prefix", "--cache-dir", str(workdir / "cache"), "--idle-timeout", "2", *extra]
    return ProxyProcess(workdir, upstream.url, args, tls=False).start()


def blob_url(proxy: ProxyProcess, digest: str, repo: str = "team/app") -> str:
    return f"{proxy.url}/v2/{repo}/blobs/{digest}"


def gets(upstream: HostileServer, digest: str) -> list[str | None]:
    """The Range header of every GET of this blob the upstream saw (None for a whole-blob GET)."""
    return [r.header("Range") for r in upstream.requests("GET") if r.path.endswith(digest)]


def test_fill_resumes_after_the_upstream_breaks_off(upstream: HostileServer, tmp_path: Path) -> None:
    """An upstream that cuts the body at byte N: the fill resumes with Range from N; the client gets every byte."""
    body = data(1, 3 * MIB)
    digest = sha256_digest(body)
    first = Blob(body, faults=Respond(break_after=MIB + 17, abort=Abort.RST))
    upstream.route("GET", rf"/v2/team/app/blobs/{digest}", InTurn(first, Blob(body)))
    proxy = start(tmp_path, upstream)
    try:
        reply, got, size = sha256_of("GET", blob_url(proxy, digest), {})
        assert reply.status == 200 and got == digest and size == len(body)
        assert gets(upstream, digest) == [None, f"bytes={MIB + 17}-"]
        again = request("GET", blob_url(proxy, digest))
        assert again.header("Cache-Status") == "regproxy; hit" and len(gets(upstream, digest)) == 2
        assert "Traceback" not in proxy.log_text()
    finally:
        proxy.stop()


def test_wrong_bytes_are_never_served_complete_nor_cached(upstream: HostileServer, tmp_path: Path) -> None:
    """Bytes that don't match the digest: the client's transfer fails (the last byte is held back), nothing is stored."""
    body = data(2, 2 * MIB)
    digest = sha256_digest(body)
    upstream.route("GET", rf"/v2/team/app/blobs/{digest}", InTurn(Blob(body, corrupt=True), Blob(body)))
    proxy = start(tmp_path, upstream)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request("GET", f"/v2/team/app/blobs/{digest}")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            response.read()
        conn.close()
        assert not list((tmp_path / "cache" / "blobs").rglob(digest.split(":")[1]))
        reply, got, _ = sha256_of("GET", blob_url(proxy, digest), {})
        assert reply.status == 200 and got == digest
        assert reply.header("Cache-Status") == "regproxy; fwd=miss; stored"
        assert "Traceback" not in proxy.log_text()
    finally:
        proxy.stop()


def test_kill_9_mid_fill_leaves_nothing_half_written(upstream: HostileServer, tmp_path: Path) -> None:
    """kill -9 during a fill: after a restart no partial is served; the blob is fetched again, whole and right."""
    body = data(3, 4 * MIB)
    digest = sha256_digest(body)
    release = threading.Event()
    stalled = Blob(body, faults=Respond(stall_after=MIB, stall=release))
    upstream.route("GET", rf"/v2/team/app/blobs/{digest}", InTurn(stalled, Blob(body)))
    proxy = start(tmp_path, upstream, "--idle-timeout", "30")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    conn.request("GET", f"/v2/team/app/blobs/{digest}")
    response = conn.getresponse()
    response.read(MIB // 2)
    partial = tmp_path / "cache" / "partial" / ("sha256-" + digest.split(":")[1])
    wait_until(lambda: partial.exists() and partial.stat().st_size >= MIB, 10)
    assert proxy.process is not None
    os.kill(proxy.process.pid, signal.SIGKILL)
    proxy.process.wait(10)
    release.set()
    conn.close()
    proxy = start(tmp_path, upstream)
    try:
        assert not partial.exists()
        reply, got, size = sha256_of("GET", blob_url(proxy, digest), {})
        assert reply.status == 200 and got == digest and size == len(body)
        assert reply.header("Cache-Status") == "regproxy; fwd=miss; stored"
    finally:
        proxy.stop()


def test_client_leaving_a_cold_fill_is_logged_as_gone_not_as_an_upstream_failure(
    upstream: HostileServer, tmp_path: Path
) -> None:
    """A client that hangs up mid cold fill: its access-log line says client gone, and no upstream failure is warned of."""
    body = data(4, 4 * MIB)
    digest = sha256_digest(body)
    release = threading.Event()
    upstream.route("GET", rf"/v2/team/app/blobs/{digest}", Blob(body, faults=Respond(stall_after=MIB, stall=release)))
    proxy = start(tmp_path, upstream, "--idle-timeout", "30")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request("GET", f"/v2/team/app/blobs/{digest}")
        response = conn.getresponse()
        response.read(MIB // 2)
        conn.close()
        wait_until(lambda: "client gone" in proxy.log_text(), 10)
        release.set()
        log = proxy.log_text()
        assert "upstream failed mid-response" not in log and "Traceback" not in log
    finally:
        release.set()
        proxy.stop()


def test_eviction_keeps_lru_order_and_spares_a_blob_being_read(upstream: HostileServer, tmp_path: Path) -> None:
    """Under a small --cache-max-size, least recently used blobs go first, but never one a client is reading."""
    blobs = [data(10 + i, MIB) for i in range(5)]
    digests = [sha256_digest(b) for b in blobs]
    for body, digest in zip(blobs, digests, strict=True):
        upstream.route("GET", rf"/v2/team/app/blobs/{digest}", Blob(body))
        upstream.route("HEAD", rf"/v2/team/app/blobs/{digest}", Blob(body))
    proxy = start(tmp_path, upstream, "--cache-max-size", str(3 * MIB + MIB // 2))
    store = tmp_path / "cache" / "blobs"

    def cached(digest: str) -> bool:
        return bool(list(store.rglob(digest.split(":")[1])))

    try:
        for digest in digests[:3]:
            assert request("GET", blob_url(proxy, digest)).status == 200
        # Hold blob 0 open: a slow client reads one byte and waits.
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request("GET", f"/v2/team/app/blobs/{digests[0]}", headers={"Range": "bytes=0-"})
        slow = conn.getresponse()
        assert slow.status == 206 and slow.getheader("Cache-Status") == "regproxy; hit"
        slow.read(1)
        time.sleep(1.1)  # a later last access for blob 2 than for blob 1
        assert request("GET", blob_url(proxy, digests[2])).header("Cache-Status") == "regproxy; hit"
        assert request("GET", blob_url(proxy, digests[3])).status == 200  # over the limit: one must go
        wait_until(lambda: not cached(digests[1]), 10)
        assert cached(digests[0]) and cached(digests[2]) and cached(digests[3])
        rest = slow.read()
        assert sha256_digest(blobs[0][:1] + rest) == digests[0]
        conn.close()
        total = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        assert total <= 3 * MIB + MIB // 2
    finally:
        proxy.stop()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs for the cache directory (the test runs as root)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the suite runs as root): {done.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_still_serves_and_stores_nothing_corrupt(upstream: HostileServer, tmp_path: Path, tiny_disk: Path) -> None:
    """A blob that doesn't fit the disk is passed through whole (a range as a range), uncached; what fits is cached; nothing corrupt stays."""
    big = data(20, 16 * MIB)
    small = data(21, MIB)
    for body in (big, small):
        upstream.route("GET", rf"/v2/team/app/blobs/{sha256_digest(body)}", Blob(body))
    args = ["--no-library-prefix", "--cache-dir", str(tiny_disk / "cache")]
    proxy = ProxyProcess(tmp_path / "p", upstream.url, args, tls=False).start()
    try:
        reply, got, size = sha256_of("GET", blob_url(proxy, sha256_digest(big)), {})
        assert reply.status == 200 and got == sha256_digest(big) and size == len(big)
        assert "stored" not in (reply.header("Cache-Status") or "")
        # A range of a blob that can't be cached is still a range (the client's own request goes upstream).
        part = request("GET", blob_url(proxy, sha256_digest(big)), {"Range": "bytes=1000-1999"})
        assert part.status == 206 and part.body == big[1000:2000]
        reply, got, _ = sha256_of("GET", blob_url(proxy, sha256_digest(small)), {})
        assert got == sha256_digest(small)
        for path in (tiny_disk / "cache" / "blobs").rglob("*"):
            if path.is_file():
                import hashlib

                assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == "sha256:" + path.name
        assert list((tiny_disk / "cache" / "partial").iterdir()) == []
    finally:
        proxy.stop()
