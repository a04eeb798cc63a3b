"""Real clients through the caching proxy: a layer comes from upstream once, whoever pulls it next.

The witness is the Hub stand-in's CDN log: the registry redirects every blob
GET there, so a blob fetched upstream shows up as a CDN GET.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub
from tests.upstream.images import SeededImage

from .conftest import ProxyLog, record_timing
from .daemons import Containerd, Dockerd, skopeo_copy, write_hosts_toml

pytestmark = [pytest.mark.clients]


@pytest.fixture(scope="module")
def cached_proxy(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """regproxy with a cache directory in front of the Hub stand-in (plain HTTP)."""
    work = tmp_path_factory.mktemp("cached-proxy")
    args = ["--upstream-ca", str(hub.ca_pem), "--library-prefix", "--cache-dir", str(work / "cache")]
    with ProxyProcess(work, hub.registry_url, args, tls=False) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def cached_dockerd(cached_proxy: ProxyProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A dockerd whose registry-mirrors is the caching proxy."""
    d = Dockerd(tmp_path_factory.mktemp("cached-dockerd"))
    d.start(mirrors=[cached_proxy.url])
    try:
        yield d
    finally:
        d.stop()


def upstream_blob_gets(hub: Hub, image: SeededImage, since: int) -> list[str]:
    """CDN GETs (upstream blob fetches) of any of the image's blobs since a mark."""
    wanted = {b.digest.split(":")[1] for b in image.blobs()}
    return [str(e["uri"]) for e in hub.cdn_log()[since:] if e["method"] == "GET" and any(w in str(e["uri"]) for w in wanted)]


def _wipe(d: Dockerd) -> None:
    ids = d.docker("images", "-aq", check=False, timeout=60).stdout.split()
    if ids:
        d.docker("rmi", "--force", *sorted(set(ids)), check=False, timeout=300)


def test_docker_pull_twice_second_from_cache(cached_dockerd: Dockerd, cached_proxy: ProxyProcess, hub: Hub) -> None:
    """docker pull, rmi, pull again: the second pull fetches no blob upstream and ends with the same digest."""
    image = hub.images["library/alpine:3.20"]
    log = ProxyLog(cached_proxy)
    mark = len(hub.cdn_log())
    _wipe(cached_dockerd)
    t0 = time.monotonic()
    cached_dockerd.pull("alpine:3.20")
    record_timing("docker pull alpine:3.20 cold (cache)", time.monotonic() - t0)
    first = upstream_blob_gets(hub, image, mark)
    assert len(first) == len(image.blobs()), first
    _wipe(cached_dockerd)
    mark = len(hub.cdn_log())
    t0 = time.monotonic()
    cached_dockerd.pull("alpine:3.20")
    record_timing("docker pull alpine:3.20 warm (cache)", time.monotonic() - t0)
    assert upstream_blob_gets(hub, image, mark) == []
    assert cached_dockerd.repo_digests("alpine:3.20") == [f"alpine@{image.digest}"]
    hits = log.lines('cache="regproxy; hit"')
    assert hits, log.text()[-3000:]
    assert "Traceback" not in log.text()
    _wipe(cached_dockerd)


def test_ctr_and_skopeo_reuse_what_docker_cached(
    cached_dockerd: Dockerd, cached_proxy: ProxyProcess, containerd: Containerd, hub: Hub, tmp_path: Path
) -> None:
    """An image cached by a docker pull is pulled by ctr and skopeo with no blob request upstream, digests identical."""
    image = hub.images["myorg/tool:1.0"]
    _wipe(cached_dockerd)
    cached_dockerd.pull("myorg/tool:1.0")
    mark = len(hub.cdn_log())
    hosts = tmp_path / "hosts.d"
    write_hosts_toml(hosts, "docker.io", cached_proxy.url)
    ref = "docker.io/myorg/tool:1.0"
    containerd.pull(ref, hosts)
    try:
        assert containerd.image_digest(ref) == image.digest
    finally:
        containerd.rmi(ref, check=False)
    out = tmp_path / "out"
    skopeo_copy(f"docker://{cached_proxy.host}/myorg/tool:1.0", f"dir:{out}", tls_verify=False)
    assert "sha256:" + hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == image.digest
    for blob in image.layers:
        assert "sha256:" + hashlib.sha256((out / blob.digest.split(":")[1]).read_bytes()).hexdigest() == blob.digest
    assert upstream_blob_gets(hub, image, mark) == []
    _wipe(cached_dockerd)
