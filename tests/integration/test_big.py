"""A 1 GiB layer through the proxy: flat memory for a slow client, cancellation on disconnect."""

from __future__ import annotations

import hashlib
import threading
import time

from tests.integration.http import connect, token
from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub

MIB = 1 << 20


class RssSampler(threading.Thread):
    """Samples the proxy's RSS every 50 ms until stopped; keeps the peak."""

    def __init__(self, proxy: ProxyProcess) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.peak = proxy.rss_kib()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.05):
            self.peak = max(self.peak, self.proxy.rss_kib())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def test_1gib_pull_to_slow_client_keeps_memory_flat(proxy: ProxyProcess, hub: Hub) -> None:
    """A 1 GiB blob to a client that stalls and reads slowly: digest exact, proxy RSS growth < 100 MiB."""
    big = hub.seed_big()
    layer = big.layers[0]
    assert layer.size >= 1 << 30
    bearer = token(proxy.url, ["repository:big:pull"], hub.service)
    baseline = proxy.rss_kib()
    sampler = RssSampler(proxy)
    sampler.start()
    conn = connect(proxy.url, timeout=120)
    conn.request("GET", f"/v2/big/blobs/{layer.digest}", headers={"Authorization": f"Bearer {bearer}"})
    response = conn.getresponse()
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == layer.size
    digest = hashlib.sha256()
    first = response.read(MIB)
    digest.update(first)
    received = len(first)
    time.sleep(3)  # a client that stops reading: the proxy must not buffer the blob
    while chunk := response.read(4 * MIB):
        digest.update(chunk)
        received += len(chunk)
        if received % (128 * MIB) < 4 * MIB:
            time.sleep(0.3)  # and reads in bursts
    conn.close()
    peak = sampler.stop()
    assert received == layer.size
    assert "sha256:" + digest.hexdigest() == layer.digest
    growth_mib = (peak - baseline) / 1024
    print(f"proxy RSS baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, growth {growth_mib:.1f} MiB")
    assert growth_mib < 100


def minor_faults(proxy: ProxyProcess) -> int:
    """The proxy process's minor page faults so far (/proc/PID/stat, field 10)."""
    assert proxy.process is not None
    with open(f"/proc/{proxy.process.pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_1gib_relayed_without_refaulting_its_chunks(proxy: ProxyProcess, hub: Hub) -> None:
    """A 1 GiB blob at full speed costs the proxy few page faults: chunk memory is reused, not mapped anew (regproxy/malloc.py)."""
    big = hub.seed_big()
    layer = big.layers[0]
    bearer = token(proxy.url, ["repository:big:pull"], hub.service)
    before = minor_faults(proxy)
    conn = connect(proxy.url, timeout=120)
    conn.request("GET", f"/v2/big/blobs/{layer.digest}", headers={"Authorization": f"Bearer {bearer}"})
    response = conn.getresponse()
    received = 0
    while chunk := response.read(4 * MIB):
        received += len(chunk)
    conn.close()
    faults = minor_faults(proxy) - before
    print(f"minor page faults for {received / MIB:.0f} MiB relayed: {faults}")
    assert received == layer.size
    # Unpinned, glibc settles in a mode costing ~458,000 faults per GiB (benchmarks/README.md).
    assert faults < 30_000


def test_client_disconnect_cancels_upstream_transfer(proxy: ProxyProcess, hub: Hub) -> None:
    """A client leaving after 1 MiB of the 1 GiB blob stops the CDN transfer far short of the whole blob."""
    big = hub.seed_big()
    layer = big.layers[0]
    bearer = token(proxy.url, ["repository:big:pull"], hub.service)
    before = len(hub.cdn_log())
    conn = connect(proxy.url)
    conn.request("GET", f"/v2/big/blobs/{layer.digest}", headers={"Authorization": f"Bearer {bearer}"})
    response = conn.getresponse()
    response.read(MIB)
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 20
    entries: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        entries = [e for e in hub.cdn_log()[before:] if layer.digest.split(":")[1] in str(e["uri"])]
        if entries:
            break
        time.sleep(0.2)
    assert entries, "the CDN request ended (nginx logs at the end of a request)"
    sent = int(entries[-1]["bytes"])  # type: ignore[call-overload]
    assert sent < layer.size // 2, f"CDN sent {sent} bytes after the client left"
    assert request_ok(proxy)


def request_ok(proxy: ProxyProcess) -> bool:
    from tests.integration.http import request

    return request("GET", proxy.url + "/healthz").status == 200 and "Traceback" not in proxy.log_text()
