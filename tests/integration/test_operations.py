"""Operating the proxy: metrics, the JSON access log, readiness, draining on SIGTERM.

Each test starts its own ``twist regproxy`` with the options under test, in
front of the Hub stand-in.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.http import connect, request, sha256_of
from tests.proxyproc import ProxyProcess, free_port
from tests.upstream.hub import Hub

MIB = 1 << 20


def scrape(port: int) -> dict[str, float]:
    """The metrics endpoint's samples, as {'name{labels}': value}."""
    reply = request("GET", f"http://127.0.0.1:{port}/metrics")
    assert reply.status == 200
    samples: dict[str, float] = {}
    for line in reply.body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include the given ones."""
    out = 0.0
    for key, value in samples.items():
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(found.get(k) == v for k, v in labels.items()):
            out += value
    return out


@pytest.fixture
def ops_proxy(hub: Hub, tmp_path: Path) -> Iterator[tuple[ProxyProcess, int, Path]]:
    """A caching proxy with a metrics listener and a JSON access log."""
    metrics_port = free_port()
    log = tmp_path / "access.jsonl"
    args = [
        "--upstream-ca", str(hub.ca_pem), "--library-prefix", "--cache-dir", str(tmp_path / "cache"),
        "--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1", "--access-log", str(log),
    ]
    with ProxyProcess(tmp_path, hub.registry_url, args, tls=False) as proxy:
        yield proxy, metrics_port, log


def anonymous(proxy: ProxyProcess) -> dict[str, str]:
    reply = request("GET", proxy.url + "/token?scope=repository:library/alpine:pull")
    return {"Authorization": "Bearer " + json.loads(reply.body)["token"]}


def test_metrics_count_requests_cache_results_and_bytes(ops_proxy: tuple[ProxyProcess, int, Path], hub: Hub) -> None:
    """After a miss and a hit of one blob, the counters moved by exactly that: one stored, one hit, its bytes twice."""
    proxy, port, _ = ops_proxy
    layer = hub.images["library/alpine:3.19"].layers[0]
    before = scrape(port)
    auth = anonymous(proxy)
    url = f"{proxy.url}/v2/library/alpine/blobs/{layer.digest}"
    assert sha256_of("GET", url, auth)[1] == layer.digest
    assert sha256_of("GET", url, auth)[1] == layer.digest
    # The proxy finishes its bookkeeping just after the client has its last byte (a sendfile hit
    # completes in a thread): wait for the figures to settle.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(port)
        settled = total(after, "regproxy_requests_in_flight") == 0 and total(
            after, "regproxy_requests_total", kind="blob"
        ) - total(before, "regproxy_requests_total", kind="blob") >= 2
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("regproxy_requests_total", kind="blob", method="GET", status="2xx") == 2
    assert moved("regproxy_requests_total", kind="token", status="2xx") == 1
    assert moved("regproxy_cache_requests_total", content="blob", result="stored") == 1
    assert moved("regproxy_cache_requests_total", content="blob", result="hit") == 1
    assert moved("regproxy_client_bytes_total", kind="blob") == 2 * layer.size
    assert moved("regproxy_upstream_bytes_total", kind="blob") == layer.size
    assert moved("regproxy_request_duration_seconds_count", kind="blob") == 2
    assert total(after, "regproxy_cache_size_bytes") >= layer.size
    assert total(after, "regproxy_requests_in_flight") == 0
    assert moved("regproxy_token_fetches_total", result="ok") >= 0
    names = {key.partition("{")[0] for key in after}
    assert {"regproxy_upstream_requests_total", "regproxy_time_to_first_byte_seconds_bucket"} <= names


def test_access_log_has_one_json_line_per_request(ops_proxy: tuple[ProxyProcess, int, Path], hub: Hub) -> None:
    """Every request, including ones the proxy or its channel answers itself, has exactly one parseable JSON line."""
    proxy, _, log = ops_proxy
    auth = anonymous(proxy)
    layer = hub.images["library/alpine:3.19"].layers[0]
    sent = [
        ("GET", "/v2/"),
        ("GET", f"/v2/library/alpine/blobs/{layer.digest}"),
        ("GET", "/healthz"),
        ("GET", "/v2/Bad/manifests/x"),
        ("PUT", "/token"),
        ("GET", "/nothing"),
    ]
    for method, path in sent:
        request(method, proxy.url + path, auth)
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        raw.sendall(b"NOT A REQUEST\r\n\r\n")
        raw.recv(4096)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if len(lines) >= len(sent) + 2:
            break
        time.sleep(0.05)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    for field in ("time", "request_id", "client", "method", "path", "status", "bytes", "duration", "upstream", "cache", "user_agent"):
        assert all(field in line for line in lines), field
    paths = [(line["method"], line["path"], line["status"]) for line in lines]
    assert paths[0][1].startswith("/token")
    for method, path in sent:
        assert sum(1 for m, p, _ in paths if (m, p) == (method, path)) == 1, (method, path, paths)
    assert [s for m, p, s in paths if m is None] == [400]
    blob = next(line for line in lines if line["path"].endswith(layer.digest))
    assert blob["cache"] == "regproxy; fwd=miss; stored" and blob["bytes"] == layer.size and blob["upstream"] == proxy.upstream.split("//")[1]
    assert len({line["request_id"] for line in lines}) == len(lines)


def test_readyz_and_drain_on_sigterm(hub: Hub, tmp_path: Path) -> None:
    """SIGTERM during a 1 GiB pull: /readyz says draining, new connections are refused, the pull completes, exit 0."""
    big = hub.seed_big().layers[0]
    args = ["--upstream-ca", str(hub.ca_pem), "--library-prefix", "--drain-timeout", "120"]
    proxy = ProxyProcess(tmp_path, hub.registry_url, args, tls=False).start()
    assert request("GET", proxy.url + "/readyz").status == 200
    auth = anonymous(proxy)
    conn = connect(proxy.url, timeout=120)
    conn.request("GET", f"/v2/library/big/blobs/{big.digest}", headers=auth)
    response = conn.getresponse()
    assert response.status == 200
    import hashlib

    digest = hashlib.sha256(response.read(MIB))
    received = MIB
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = False
    try:
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    except OSError:
        refused = True
    assert refused, "the proxy still accepts connections while draining"
    done = threading.Event()

    def finish() -> None:
        nonlocal received
        while chunk := response.read(4 * MIB):
            digest.update(chunk)
            received += len(chunk)
        done.set()

    reader = threading.Thread(target=finish, daemon=True)
    reader.start()
    reader.join(120)
    assert done.is_set() and received == big.size and "sha256:" + digest.hexdigest() == big.digest
    assert proxy.process.wait(60) == 0
    assert "draining" in proxy.log_text()


def test_one_scrape_covers_every_worker(hub: Hub, tmp_path: Path) -> None:
    """With --workers 2 the metrics endpoint adds up both processes: 40 requests on 40 connections count 40."""
    metrics_port = free_port()
    args = [
        "--upstream-ca", str(hub.ca_pem), "--library-prefix", "--workers", "2",
        "--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1",
    ]
    with ProxyProcess(tmp_path, hub.registry_url, args, tls=False) as proxy:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proxy.log_text().count("RegistrySite starting on") < 2:
            time.sleep(0.1)
        before = total(scrape(metrics_port), "regproxy_requests_total", kind="health")
        for _ in range(40):
            assert request("GET", proxy.url + "/healthz").status == 200  # a new connection each time
        after = total(scrape(metrics_port), "regproxy_requests_total", kind="health")
        assert after - before == 40


def test_warm_then_list_the_cache(hub: Hub, tmp_path: Path) -> None:
    """`python -m regproxy warm` fills the cache through the proxy (every platform of an index); `cache` lists it."""
    import subprocess
    import sys

    cache_dir = tmp_path / "cache"
    args = ["--upstream-ca", str(hub.ca_pem), "--library-prefix", "--cache-dir", str(cache_dir)]
    multi = hub.images["library/multi:latest"]
    with ProxyProcess(tmp_path, hub.registry_url, args, tls=False) as proxy:
        warmed = subprocess.run(
            [sys.executable, "-m", "regproxy", "warm", "--proxy", proxy.url, "library/multi:latest", "alpine:3.19"],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
        )
        assert warmed.returncode == 0, warmed.stdout + warmed.stderr
        assert "0 failure(s)" in warmed.stdout and "library/multi:latest: 3 manifest(s)" in warmed.stdout
        mark = len(hub.cdn_log())
        child = next(iter(multi.platforms.values()))
        reply = request("GET", f"{proxy.url}/v2/library/multi/blobs/{child.layers[0].digest}", anonymous(proxy))
        assert reply.header("Cache-Status") == "regproxy; hit"
        assert hub.cdn_log()[mark:] == []
    listed = subprocess.run(
        [sys.executable, "-m", "regproxy", "cache", "--cache-dir", str(cache_dir), "--json"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )
    assert listed.returncode == 0, listed.stderr
    content = json.loads(listed.stdout)
    digests = {b["digest"] for b in content["blobs"]}
    assert multi.digest in digests and all(b.digest in digests for c in multi.platforms.values() for b in c.blobs())
    assert content["total_size"] == sum(b["size"] for b in content["blobs"])
    assert any(t["repository"] == "library/multi" and t["tag"] == "latest" for t in content["tags"])


def test_hits_use_sendfile_on_plain_tcp_and_the_producer_on_tls(hub: Hub, tmp_path: Path) -> None:
    """A cache hit on the plain-TCP listener is sent with sendfile(2); over TLS by the file producer; bytes identical."""
    metrics_port = free_port()
    args = [
        "--upstream-ca", str(hub.ca_pem), "--library-prefix", "--cache-dir", str(tmp_path / "cache"),
        "--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1",
    ]
    layer = hub.images["library/alpine:3.20"].layers[0]
    with ProxyProcess(tmp_path, hub.registry_url, args) as proxy:
        auth = anonymous(proxy)
        path = f"/v2/library/alpine/blobs/{layer.digest}"
        assert sha256_of("GET", proxy.url + path, auth)[1] == layer.digest  # the miss: a fill
        assert total(scrape(metrics_port), "regproxy_cache_sendfile_answers_total") == 0
        reply, digest, _ = sha256_of("GET", proxy.url + path, auth)
        assert reply.header("Cache-Status") == "regproxy; hit" and digest == layer.digest
        assert total(scrape(metrics_port), "regproxy_cache_sendfile_answers_total") == 1
        part = request("GET", proxy.url + path, {**auth, "Range": "bytes=100-"})
        assert part.status == 206 and len(part.body) == layer.size - 100
        assert total(scrape(metrics_port), "regproxy_cache_sendfile_answers_total") == 2
        reply, digest, _ = sha256_of("GET", proxy.tls_url + path, auth, ca=proxy.ca_pem)
        assert reply.header("Cache-Status") == "regproxy; hit" and digest == layer.digest
        assert total(scrape(metrics_port), "regproxy_cache_sendfile_answers_total") == 2
        assert "Traceback" not in proxy.log_text()
