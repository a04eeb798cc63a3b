"""One cold 1 GiB layer, many clients: one upstream fetch, each client at its own pace, flat memory.

The Hub stand-in's CDN log counts the upstream fetches; each test starts its
own proxy with an empty cache directory, so the layer is cold for it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.http import connect, request
from tests.integration.test_big import RssSampler
from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub

MIB = 1 << 20
pytestmark = pytest.mark.slow


def cached_proxy(hub: Hub, workdir: Path, *extra: str) -> ProxyProcess:
    args = ["--upstream-ca", str(hub.ca_pem), "--library-prefix", "--cache-dir", str(workdir / "cache"), *extra]
    return ProxyProcess(workdir, hub.registry_url, args, tls=False)


@pytest.fixture
def big(hub: Hub) -> Iterator[tuple[str, int]]:
    layer = hub.seed_big().layers[0]
    yield layer.digest, layer.size


def cdn_gets(hub: Hub, digest: str, since: int) -> list[dict[str, object]]:
    return [e for e in hub.cdn_log()[since:] if e["method"] == "GET" and digest.split(":")[1] in str(e["uri"])]


def anonymous(proxy: ProxyProcess) -> dict[str, str]:
    reply = request("GET", proxy.url + "/token?scope=repository:library/big:pull")
    return {"Authorization": "Bearer " + json.loads(reply.body)["token"]}


@dataclass
class Download:
    """One client reading the blob (optionally a range, optionally slowly)."""

    proxy: ProxyProcess
    digest: str
    headers: dict[str, str]
    pace: float = 0.0
    stop_after: int | None = None
    status: int = 0
    received: int = 0
    sha256: str = ""
    error: str = ""
    first_byte: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            conn = connect(self.proxy.url, timeout=300)
            conn.request("GET", f"/v2/library/big/blobs/{self.digest}", headers=self.headers)
            response = conn.getresponse()
            self.status = response.status
            h = hashlib.sha256()
            while not self.stopped.is_set():
                chunk = response.read(MIB if not self.pace else 256 << 10)
                if not chunk:
                    break
                if not self.first_byte.is_set():
                    self.first_byte.set()
                h.update(chunk)
                self.received += len(chunk)
                if self.pace:
                    self.stopped.wait(self.pace)
            self.sha256 = "sha256:" + h.hexdigest()
            conn.close()
        except Exception as e:  # reported by the test
            self.error = repr(e)
        finally:
            self.finished.set()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread


def test_fifty_cold_clients_one_upstream_fetch(hub: Hub, big: tuple[str, int], tmp_path: Path) -> None:
    """50 clients of one cold 1 GiB blob (five with Range): one upstream GET, every digest right, RSS flat, first byte early."""
    digest, size = big
    with cached_proxy(hub, tmp_path) as proxy:
        auth = anonymous(proxy)
        mark = len(hub.cdn_log())
        baseline = proxy.rss_kib()
        sampler = RssSampler(proxy)
        sampler.start()
        final = tmp_path / "cache" / "blobs" / "sha256" / digest.split(":")[1][:2] / digest.split(":")[1]
        first = Download(proxy, digest, auth)
        threads = [first.start()]
        assert first.first_byte.wait(60), first.error
        # The first byte came while the fill was still running: the blob is not in the store yet.
        assert not final.exists()
        downloads = [first]
        for i in range(49):
            headers = dict(auth)
            if i % 10 == 0:
                headers["Range"] = f"bytes={i * MIB}-"
            downloads.append(Download(proxy, digest, headers))
            threads.append(downloads[-1].start())
        for thread in threads:
            thread.join(600)
        peak = sampler.stop()
        errors = [d.error for d in downloads if d.error]
        assert not errors, errors[:3]
        whole = [d for d in downloads if "Range" not in d.headers]
        ranged = [d for d in downloads if "Range" in d.headers]
        assert all(d.status == 200 and d.sha256 == digest and d.received == size for d in whole)
        for d in ranged:
            start = int(d.headers["Range"].split("=")[1].rstrip("-"))
            assert d.status == 206 and d.received == size - start
        assert len(cdn_gets(hub, digest, mark)) == 1
        growth_mib = (peak - baseline) / 1024
        print(f"\n50 clients x 1 GiB: proxy RSS {baseline / 1024:.0f} MiB -> peak {peak / 1024:.0f} MiB")
        assert growth_mib < 100
        assert "Traceback" not in proxy.log_text()


def test_slow_client_does_not_slow_a_fast_one(hub: Hub, big: tuple[str, int], tmp_path: Path) -> None:
    """A slow and a fast client on the same fill: the fast one has the whole blob while the slow one is far behind."""
    digest, size = big
    with cached_proxy(hub, tmp_path) as proxy:
        auth = anonymous(proxy)
        slow = Download(proxy, digest, auth, pace=0.05)
        slow_thread = slow.start()
        assert slow.first_byte.wait(60)
        fast = Download(proxy, digest, auth)
        fast.start().join(300)
        assert fast.error == "" and fast.sha256 == digest
        behind = slow.received
        slow.stopped.set()
        slow_thread.join(60)
        print(f"\nfast client done with 1 GiB while the slow one had {behind / MIB:.0f} MiB")
        assert behind < size // 4
        assert "Traceback" not in proxy.log_text()


def test_workers_share_one_fill(hub: Hub, big: tuple[str, int], tmp_path: Path) -> None:
    """--workers 2: clients spread over both processes still cause exactly one upstream GET."""
    digest, size = big
    with cached_proxy(hub, tmp_path, "--workers", "2") as proxy:
        auth = anonymous(proxy)
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proxy.log_text().count("RegistrySite starting on") < 2:
            time.sleep(0.1)
        mark = len(hub.cdn_log())
        downloads = [Download(proxy, digest, auth) for _ in range(12)]
        threads = [d.start() for d in downloads]
        for thread in threads:
            thread.join(600)
        assert [d.error for d in downloads if d.error] == []
        assert all(d.status == 200 and d.sha256 == digest for d in downloads)
        assert len(cdn_gets(hub, digest, mark)) == 1
        # Some clients landed on the other worker, which followed the fill through the shared directory.
        assert "following the fill of" in proxy.log_text()
        assert "Traceback" not in proxy.log_text()
