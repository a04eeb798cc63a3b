"""The individual measurements.  Each returns a flat dict of numbers.

Clients are curl and wrk processes, not Python: a Python client on a 2-core
box would compete with the proxy for CPU and cap what it can show.  The
clients' own CPU time is recorded next to each throughput figure so a
saturated client is visible in the results.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import queue
import re
import resource
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from peers import Peer, http_get
from seed import MANIFEST_TYPE, Blob, Image, Manifest

TICK = os.sysconf("SC_CLK_TCK")
MB = 1e6
GIB = 1 << 30


def _cpu_clock(pid: int) -> float | None:
    """The process's CPU-time clock (clock_gettime on its CPUCLOCK_SCHED id): every
    thread, exited ones included, in ns instead of /proc's 10 ms ticks (a sendfile
    server uses only a few ticks per GiB)."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return None


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the processes."""
    total = 0.0
    for pid in pids:
        t = _cpu_clock(pid)
        if t is None:  # fall back to utime+stime from /proc/<pid>/stat fields 14 and 15
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            t = (int(fields[11]) + int(fields[12])) / TICK
        total += t
    return total


def minor_faults(pids: list[int]) -> int:
    """Minor page faults so far (/proc/<pid>/stat field 10, the whole process)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
        except (OSError, IndexError, ValueError):
            continue
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def children_cpu() -> float:
    """CPU of reaped children (our curl clients); deltas give the client's cost."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def curl_argv(url: str, *extra: str) -> list[str]:
    return ["curl", "-sS", "-k", "--max-time", "600", "-o", "/dev/null",
            "-w", "%{http_code} %{size_download} %{time_total}\n", *extra, url]


def _parse_curl(out: str) -> tuple[int, int, float]:
    code, size, t = out.split()
    return int(code), int(size), float(t)


def single_stream(peer: Peer, blob: Blob) -> dict[str, float]:
    """One GET of the big blob: MB/s, the server's CPU seconds per GiB, and its minor
    page faults per GiB (memory the allocator hands back and takes again per
    chunk shows up there, and in the CPU)."""
    pids = peer.pids()
    cpu0, flt0 = cpu_seconds(pids), minor_faults(pids)
    out = subprocess.run(curl_argv(blob.url(peer.url)), capture_output=True, text=True).stdout
    cpu1, flt1 = cpu_seconds(pids), minor_faults(pids)
    code, size, t = _parse_curl(out)
    if code != 200 or size != blob.size:
        raise RuntimeError(f"single stream: HTTP {code}, {size} of {blob.size} bytes")
    return {"mbps": size / t / MB, "cpu_s_per_gib": (cpu1 - cpu0) / (size / GIB),
            "minflt_per_gib": (flt1 - flt0) / (size / GIB)}


def parallel(peer: Peer, blob: Blob, n: int) -> dict[str, float]:
    """n concurrent curl processes fetching the same blob: aggregate MB/s, and the
    server's peak RSS growth meanwhile (sampled every 50 ms).  For the cold peers
    (empty cache before) this is n clients of one cold blob."""
    pids = peer.pids()
    base = peak = rss_bytes(pids)
    cpu0, ccpu0 = cpu_seconds(pids), children_cpu()
    t0 = time.monotonic()
    procs = [subprocess.Popen(curl_argv(blob.url(peer.url)), stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    while any(p.poll() is None for p in procs):
        peak = max(peak, rss_bytes(pids))
        time.sleep(0.05)
    outs = [p.communicate()[0] for p in procs]
    wall = time.monotonic() - t0
    cpu1, ccpu1 = cpu_seconds(pids), children_cpu()
    results = [_parse_curl(o) for o in outs]
    bad = [r for r in results if r[0] != 200 or r[1] != blob.size]
    if bad:
        raise RuntimeError(f"parallel {n}: {len(bad)} failed, e.g. HTTP {bad[0][0]}, "
                           f"{bad[0][1]} of {blob.size} bytes")
    total = sum(r[1] for r in results)
    cores = os.cpu_count() or 1
    return {"mbps": total / wall / MB,
            "server_cpu_pct": 100 * (cpu1 - cpu0) / (wall * cores),
            "client_cpu_pct": 100 * (ccpu1 - ccpu0) / (wall * cores),
            "cpu_s_per_gib": (cpu1 - cpu0) / (total / GIB),
            "peak_rss_growth_mib": (peak - base) / (1 << 20)}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def manifest_wrk(peer: Peer, seconds: float, conns: int, url: str | None = None) -> dict[str, float]:
    """wrk against a manifest (default: by tag): req/s and latency percentiles."""
    url = url or Manifest.url(peer.url)
    pids = peer.pids()
    cpu0 = cpu_seconds(pids)
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds:g}s", "--latency",
                          "-H", f"Accept: {MANIFEST_TYPE}", url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    cpu1 = cpu_seconds(pids)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": rps, "p50_ms": _ms(pct["50"]), "p99_ms": _ms(pct["99"]),
            "non2xx": float(errors.group(1)) if errors else 0.0,
            "socket_errors": float(sum(int(x) for x in socket_errors.groups())) if socket_errors else 0.0,
            "requests": float(total),
            "server_cpu_ms_per_req": 1e3 * (cpu1 - cpu0) / max(1, total)}


def tag_pulls(peer: Peer, n: int) -> dict[str, float]:
    """n GETs of the tagged manifest, one after the other on one keep-alive
    connection (n pulls of an unchanged image); the caller counts what reached
    the upstream meanwhile."""
    u = urllib.parse.urlsplit(Manifest.url(peer.url))
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    bad = 0
    statuses: dict[str, int] = {}
    t0 = time.monotonic()
    try:
        for _ in range(n):
            conn.request("GET", u.path, headers={"Accept": MANIFEST_TYPE})
            r = conn.getresponse()
            r.read()
            bad += r.status != 200
            cs = (r.getheader("Cache-Status") or "none").replace("regproxy; ", "")
            statuses[cs] = statuses.get(cs, 0) + 1
    finally:
        conn.close()
    t = time.monotonic() - t0
    return {"pulls": float(n), "non200": float(bad), "seconds": t,
            "cache_status": ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))}


DOCKER_ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
    MANIFEST_TYPE,
    "application/vnd.oci.image.manifest.v1+json",
])


def pull_like(peer: Peer, image: Image, parallel: int = 3) -> dict[str, Any]:
    """What `docker pull` does on a cold start: GET /v2/, the manifest by tag,
    then the config and every layer, `parallel` at a time (docker's default
    max-concurrent-downloads is 3), each worker on its own keep-alive
    connection; every body checked against its digest."""
    u = urllib.parse.urlsplit(peer.url)
    t0 = time.monotonic()
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    c.request("GET", "/v2/")
    c.getresponse().read()
    c.request("GET", f"/v2/{image.repo}/manifests/{image.tag}", headers={"Accept": DOCKER_ACCEPT})
    r = c.getresponse()
    body = r.read()
    c.close()
    t_manifest = time.monotonic() - t0
    if r.status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != image.digest:
        raise RuntimeError(f"pull: manifest HTTP {r.status} or digest mismatch")
    todo: queue.Queue[tuple[str, int]] = queue.Queue()
    for digest, size in [(image.config_digest, len(image.config))] + \
            [(b.digest, b.size) for b in image.layers]:
        todo.put((digest, size))
    problems: list[str] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        try:
            while True:
                try:
                    digest, size = todo.get_nowait()
                except queue.Empty:
                    return
                conn.request("GET", f"/v2/{image.repo}/blobs/{digest}")
                resp = conn.getresponse()
                h = hashlib.sha256()
                got = 0
                while chunk := resp.read(1 << 20):
                    h.update(chunk)
                    got += len(chunk)
                cs = (resp.getheader("Cache-Status") or "none").replace("regproxy; ", "")
                with lock:
                    statuses[cs] = statuses.get(cs, 0) + 1
                    if resp.status != 200 or got != size or "sha256:" + h.hexdigest() != digest:
                        problems.append(f"{digest[:19]}: HTTP {resp.status}, {got}/{size} bytes")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    if problems:
        raise RuntimeError("pull: " + "; ".join(problems[:3]))
    return {"seconds": wall, "manifest_ms": 1e3 * t_manifest,
            "mbps": image.blob_bytes / wall / MB,
            "cache_status": ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))}


def pull_cold_then_warm(peer: Peer, image: Image, parallel: int = 3) -> dict[str, Any]:
    """pull_like twice: the cold pull (the peer was restarted empty), then the
    same pull again (what the second node of a fleet sees)."""
    cold = pull_like(peer, image, parallel)
    warm = pull_like(peer, image, parallel)
    return cold | {"warm_seconds": warm["seconds"], "warm_manifest_ms": warm["manifest_ms"],
                   "warm_cache_status": warm["cache_status"]}


def rss_growth(peer: Peer, blob: Blob, rate: str, max_seconds: float) -> dict[str, float]:
    """Peak VmRSS growth of the server while a slow client downloads the big blob.

    A proxy that reads upstream faster than the client drains will buffer the
    difference; this shows it.  Sampled every 100 ms; the download is cut
    after max_seconds (0 = let it finish).
    """
    pids = peer.pids()
    base = rss_bytes(pids)
    peak = base
    argv = curl_argv(blob.url(peer.url), "--limit-rate", rate)
    if max_seconds:
        argv[argv.index("--max-time") + 1] = str(max_seconds)
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while p.poll() is None:
        peak = max(peak, rss_bytes(pids))
        time.sleep(0.1)
    out = p.communicate()[0]
    _, size, _ = _parse_curl(out)
    return {"peak_growth_mib": (peak - base) / (1 << 20), "base_rss_mib": base / (1 << 20),
            "seconds": time.monotonic() - t0,
            "bytes_read_mib": size / (1 << 20)}


def _range_check(url: str, blob: Blob, header: str, first: int, last: int) -> str | None:
    status, headers, body = http_get(url, {"Range": header})
    want = f"bytes {first}-{last}/{blob.size}"
    if status != 206:
        return f"{header}: HTTP {status} (len {len(body)})"
    if headers.get("content-range") != want:
        return f"{header}: Content-Range {headers.get('content-range')!r} != {want!r}"
    with open(blob.path, "rb") as f:
        f.seek(first)
        if body != f.read(last - first + 1):
            return f"{header}: body differs from the slice"
    return None


def _sha256_of(url: str) -> str:
    """Stream the GET through sha256sum so no Python sits in the data path."""
    curl = subprocess.Popen(["curl", "-sS", "-k", "--max-time", "600", url],
                            stdout=subprocess.PIPE)
    out = subprocess.run(["sha256sum"], stdin=curl.stdout, capture_output=True, text=True)
    assert curl.stdout is not None
    curl.stdout.close()
    curl.wait()
    return "sha256:" + out.stdout.split()[0]


def correctness(peer: Peer, big: Blob, medium: Blob, manifest: Manifest) -> dict[str, object]:
    """Ranges (incl. suffix and open-ended) and whole-body digests."""
    peer.prepare(big.digest)
    problems: list[str] = []
    sha_big = _sha256_of(big.url(peer.url))
    if sha_big != big.digest:
        problems.append(f"big blob sha256 {sha_big} != digest")
    n = medium.size
    cases = [("bytes=0-0", 0, 0), ("bytes=100-1099", 100, 1099),
             ("bytes=65530-200000", 65530, 200000), (f"bytes=-{500}", n - 500, n - 1),
             (f"bytes={n - 1000}-", n - 1000, n - 1), (f"bytes=0-{n + 10}", 0, n - 1)]
    ok = 0
    url = medium.url(peer.url)
    for header, first, last in cases:
        err = _range_check(url, medium, header, first, last)
        ok += err is None
        if err:
            problems.append(err)
    if _sha256_of(url) != medium.digest:
        problems.append("medium blob sha256 != digest")
    status, headers, body = http_get(Manifest.url(peer.url), {"Accept": MANIFEST_TYPE})
    if status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != manifest.digest:
        problems.append(f"manifest: HTTP {status}, body digest mismatch or wrong")
    elif headers.get("docker-content-digest") not in (None, manifest.digest):
        problems.append("manifest: Docker-Content-Digest header wrong")
    return {"ranges_ok": ok, "ranges_total": len(cases),
            "digests_ok": not any("sha256" in p or "manifest" in p for p in problems),
            "problems": problems}



def docker_pull(dockerd: Any, peer: Peer, image: Image) -> dict[str, Any]:
    """The real thing: `docker pull PEER/bench/pull:latest` with a private dockerd
    (tests/clients/daemons.py: vfs, its own data root, Hub names blackholed),
    every local image removed before each pull; cold (the peer was restarted
    empty), then again (the layers now in the peer's cache). dockerd pulls 3
    layers at a time and extracts as they arrive, so the time includes
    extraction (the same work for every peer)."""
    host = urllib.parse.urlsplit(peer.url).netloc
    ref = f"{host}/{image.repo}:{image.tag}"
    out: dict[str, Any] = {}
    for key in ("seconds", "warm_seconds"):
        ids = dockerd.docker("images", "-q").stdout.split()
        if ids:
            dockerd.docker("rmi", "-f", *sorted(set(ids)))
        t0 = time.monotonic()
        dockerd.pull(ref, strict=False)
        out[key] = time.monotonic() - t0
    return out
