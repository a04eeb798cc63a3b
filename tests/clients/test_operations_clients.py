"""Real clients and operations: a proxy restarted mid-pull, metrics and the access log after docker and ctr pulls."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_operations import scrape, total
from tests.proxyproc import ProxyProcess, free_port
from tests.upstream.hub import Hub

from .conftest import record_timing
from .daemons import Containerd, Dockerd, write_hosts_toml

pytestmark = [pytest.mark.clients]


def _wipe(d: Dockerd) -> None:
    ids = d.docker("images", "-aq", check=False, timeout=60).stdout.split()
    if ids:
        d.docker("rmi", "--force", *sorted(set(ids)), check=False, timeout=300)


@pytest.mark.slow
def test_proxy_restarted_mid_pull_docker_retries_and_succeeds(
    hub: Hub, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """kill -9 of the proxy during a 1 GiB docker pull, restarted on the same port: docker retries, the pull succeeds."""
    big = hub.seed_big()
    args = ["--upstream-ca", str(hub.ca_pem), "--library-prefix", "--cache-dir", str(tmp_path / "cache")]
    proxy = ProxyProcess(tmp_path / "proxy", hub.registry_url, args, tls=False).start()
    dockerd = Dockerd(tmp_path_factory.mktemp("restart-dockerd"))
    dockerd.start(mirrors=[proxy.url])
    try:
        _wipe(dockerd)
        partial = tmp_path / "cache" / "partial"
        result: list[object] = []
        puller = threading.Thread(target=lambda: result.append(dockerd.pull("big:latest", check=False, timeout=600)))
        t0 = time.monotonic()
        puller.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            sizes = [p.stat().st_size for p in partial.glob("sha256-*") if not p.suffix]
            if sizes and max(sizes) > 100 << 20:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the layer fill never got going")
        proxy.kill()  # mid-pull
        time.sleep(1)
        proxy.start(keep_ports=True)
        puller.join(600)
        record_timing("docker pull 1 GiB with a proxy restart", time.monotonic() - t0)
        (outcome,) = result
        assert getattr(outcome, "returncode", 1) == 0, getattr(outcome, "stderr", outcome)
        assert dockerd.repo_digests("big:latest") == [f"big@{big.digest}"]
        assert "Traceback" not in proxy.log_text()
    finally:
        _wipe(dockerd)
        dockerd.stop()
        proxy.stop()


def test_metrics_after_docker_and_ctr_pulls(
    hub: Hub, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, containerd: Containerd
) -> None:
    """After a docker pull (cold, cache) and a ctr pull (warm), the counters moved by the image's blob count, exactly; one JSON access-log line per request."""
    image = hub.images["library/alpine:3.19"]
    blobs = len(image.blobs())
    port = free_port()
    args = [
        "--upstream-ca", str(hub.ca_pem), "--library-prefix", "--cache-dir", str(tmp_path / "cache"),
        "--metrics-listen", f"tcp:{port}:interface=127.0.0.1", "--access-log", str(tmp_path / "access.jsonl"),
    ]
    with ProxyProcess(tmp_path / "proxy", hub.registry_url, args, tls=False) as proxy:
        dockerd = Dockerd(tmp_path_factory.mktemp("metrics-dockerd"))
        dockerd.start(mirrors=[proxy.url])
        try:
            before = scrape(port)
            dockerd.pull("alpine:3.19")
            after_docker = scrape(port)
            hosts = tmp_path / "hosts.d"
            write_hosts_toml(hosts, "docker.io", proxy.url)
            containerd.pull("docker.io/library/alpine:3.19", hosts)
            containerd.rmi("docker.io/library/alpine:3.19", check=False)
            time.sleep(0.5)
            after_ctr = scrape(port)
        finally:
            _wipe(dockerd)
            dockerd.stop()

    def moved(a: dict[str, float], b: dict[str, float], name: str, **labels: str) -> float:
        return total(b, name, **labels) - total(a, name, **labels)

    # docker: every blob filled once (by docker's request, or ahead of it by the manifest's prefetch),
    # its bytes fetched once; docker's own requests found the fill (stored, collapsed) or its result (hit).
    def fills(a: dict[str, float], b: dict[str, float]) -> float:
        return sum(moved(a, b, "regproxy_cache_requests_total", content="blob", result=r) for r in ("stored", "prefetched"))

    def served(a: dict[str, float], b: dict[str, float]) -> float:
        return sum(moved(a, b, "regproxy_cache_requests_total", content="blob", result=r) for r in ("stored", "collapsed", "hit"))

    assert fills(before, after_docker) == blobs
    assert served(before, after_docker) == blobs
    assert moved(before, after_docker, "regproxy_upstream_bytes_total", kind="blob") == sum(b.size for b in image.blobs())
    assert moved(before, after_docker, "regproxy_cache_requests_total", content="manifest", result="stored") >= 1
    # ctr: every blob a hit, nothing fetched upstream.
    assert moved(after_docker, after_ctr, "regproxy_cache_requests_total", content="blob", result="hit") == blobs
    assert moved(after_docker, after_ctr, "regproxy_upstream_bytes_total", kind="blob") == 0
    assert moved(after_docker, after_ctr, "regproxy_requests_total", kind="blob", status="2xx") == blobs
    assert total(after_ctr, "regproxy_requests_in_flight") == 0
    # The access log: parseable JSON, the documented fields, one line per request (as many as the
    # request counter counted), and each blob GET exactly once per client (docker's, then ctr's).
    lines = [json.loads(line) for line in (tmp_path / "access.jsonl").read_text().splitlines() if line.strip()]
    for field in ("time", "request_id", "client", "method", "path", "status", "bytes", "duration", "upstream", "cache", "user_agent"):
        assert all(field in line for line in lines), field
    assert len(lines) == moved(before, after_ctr, "regproxy_requests_total")
    assert len({line["request_id"] for line in lines}) == len(lines)
    for blob in image.blobs():
        gets = [line for line in lines if line["method"] == "GET" and line["path"].split("?")[0].endswith(blob.digest)]
        assert len(gets) == 2 and all(line["status"] == 200 and line["bytes"] == blob.size for line in gets), gets
