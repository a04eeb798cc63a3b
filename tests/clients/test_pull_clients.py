"""Real clients (dockerd, skopeo, containerd/ctr, podman) pulling through ``twist regproxy``.

The upstream is the Docker-Hub-like stand-in (token auth, CDN redirects that
reject Authorization); every pull must end with exactly the upstream's manifest
digest, served by the proxy (its access log shows it), with no fallback to
Docker Hub (the harness blackholes the Hub's names and detects the fallback).
Timings are printed (``-s``) and written to ``<basetemp>/pull-client-timings.json``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub

from .conftest import ProxyLog, record_timing
from .daemons import (
    Containerd,
    Dockerd,
    Podman,
    skopeo_accessed,
    skopeo_copy,
    write_hosts_toml,
    write_registries_conf,
)

pytestmark = [pytest.mark.clients, pytest.mark.usefixtures("stopwatch")]

MIB = 1 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def served(log: ProxyLog, method: str, uri_part: str, status: str = "200") -> list[dict[str, str]]:
    """Access-log entries of the proxy for ``method`` on a URI containing ``uri_part`` with ``status``."""
    return [e for e in log.access() if e["method"] == method and uri_part in e["uri"] and e["status"] == status]


def assert_served_manifest(log: ProxyLog, path: str) -> None:
    """The proxy itself answered a manifest GET or HEAD for ``/v2/<path>/manifests/`` with 200."""
    hits = served(log, "GET", f"/v2/{path}/manifests/") + served(log, "HEAD", f"/v2/{path}/manifests/")
    assert hits, f"proxy never served /v2/{path}/manifests/ with 200; its log:\n{log.text()[-4000:]}"


def assert_no_proxy_errors(log: ProxyLog) -> None:
    """No 5xx answers, truncated bodies or tracebacks in the proxy log during the test."""
    bad = [e for e in log.access() if e["status"].startswith("5") or e["note"] == "truncated"]
    assert not bad, f"proxy errors: {bad}\n{log.text()[-4000:]}"
    assert "Traceback" not in log.text(), log.text()[-4000:]


# -- 1. dockerd via registry-mirrors ----------------------------------------------------


def test_docker_pull_official_image_via_mirror(docker_client: Dockerd, hub: Hub, proxy_log: ProxyLog) -> None:
    """`docker pull alpine` with registry-mirrors fetches library/alpine from the proxy: upstream digest, no Hub fallback."""
    d = docker_client
    mark = d.log_mark()
    t0 = time.monotonic()
    d.pull("alpine")
    record_timing("docker pull alpine (mirror)", time.monotonic() - t0)
    assert d.repo_digests("alpine:latest") == [f"alpine@{hub.images['library/alpine:latest'].digest}"]
    assert d.image_id("alpine:latest") == hub.images["library/alpine:latest"].config_digest
    assert not d.fell_back_to_hub(since=mark)
    assert not d.attempted_next_endpoint(since=mark), d.log_text(mark)[-3000:]
    assert_served_manifest(proxy_log, "library/alpine")
    assert_no_proxy_errors(proxy_log)


def test_docker_pull_org_image_via_mirror(docker_client: Dockerd, hub: Hub, proxy_log: ProxyLog) -> None:
    """`docker pull myorg/tool:1.0` through the mirror (no library/ prefix added) gets the upstream digest."""
    d = docker_client
    mark = d.log_mark()
    d.pull("myorg/tool:1.0")
    assert d.repo_digests("myorg/tool:1.0") == [f"myorg/tool@{hub.images['myorg/tool:1.0'].digest}"]
    assert not d.fell_back_to_hub(since=mark)
    assert not d.attempted_next_endpoint(since=mark), d.log_text(mark)[-3000:]
    assert_served_manifest(proxy_log, "myorg/tool")
    assert_no_proxy_errors(proxy_log)


def test_docker_pull_manifest_list_via_mirror(docker_client: Dockerd, hub: Hub, proxy_log: ProxyLog) -> None:
    """`docker pull library/multi:latest` (manifest list) picks the amd64 child; RepoDigests shows the list digest."""
    d = docker_client
    multi = hub.images["library/multi:latest"]
    amd64 = multi.platforms["linux/amd64"]
    mark = d.log_mark()
    d.pull("library/multi:latest")
    assert d.repo_digests("multi:latest") == [f"multi@{multi.digest}"]
    info = d.inspect("multi:latest")
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    assert info["Id"] == amd64.config_digest
    assert not d.fell_back_to_hub(since=mark)
    assert not d.attempted_next_endpoint(since=mark), d.log_text(mark)[-3000:]
    assert served(proxy_log, "GET", f"/v2/library/multi/manifests/{amd64.digest}")
    assert_no_proxy_errors(proxy_log)


# -- 2. dockerd, host-prefixed -----------------------------------------------------------


def test_docker_pull_host_prefixed_one_component(
    docker_client: Dockerd, proxy: ProxyProcess, hub: Hub, proxy_log: ProxyLog
) -> None:
    """`docker pull 127.0.0.1:PORT/alpine:3.20` asks the proxy for /v2/alpine/ (no library/), the proxy maps it upstream."""
    d = docker_client
    ref = f"{proxy.host}/alpine:3.20"
    mark = d.log_mark()
    t0 = time.monotonic()
    d.pull(ref)
    record_timing("docker pull host/alpine:3.20 (direct)", time.monotonic() - t0)
    assert d.repo_digests(ref) == [f"{proxy.host}/alpine@{hub.images['library/alpine:3.20'].digest}"]
    assert not d.fell_back_to_hub(since=mark)
    assert_served_manifest(proxy_log, "alpine")
    assert not served(proxy_log, "GET", "/v2/library/alpine/")
    assert_no_proxy_errors(proxy_log)


def test_docker_pull_host_prefixed_oci_index(
    docker_client: Dockerd, proxy: ProxyProcess, hub: Hub, proxy_log: ProxyLog
) -> None:
    """`docker pull 127.0.0.1:PORT/library/ociidx:latest` (OCI index) records the index digest and runs amd64."""
    d = docker_client
    idx = hub.images["library/ociidx:latest"]
    ref = f"{proxy.host}/library/ociidx:latest"
    mark = d.log_mark()
    d.pull(ref)
    assert d.repo_digests(ref) == [f"{proxy.host}/library/ociidx@{idx.digest}"]
    assert d.image_id(ref) == idx.platforms["linux/amd64"].config_digest
    assert not d.fell_back_to_hub(since=mark)
    assert_served_manifest(proxy_log, "library/ociidx")
    assert_no_proxy_errors(proxy_log)


# -- 3. dockerd, private repository --------------------------------------------------------


def test_docker_private_pull_refused_then_login_and_pull(
    docker_client: Dockerd, proxy: ProxyProcess, hub: Hub, proxy_log: ProxyLog
) -> None:
    """Without login a private pull fails cleanly (401, no 5xx); `docker login` via the proxy's token endpoint lets it through."""
    d = docker_client
    secret = hub.images["private/secret:latest"]
    ref = f"{proxy.host}/private/secret:latest"

    t0 = time.monotonic()
    res = d.pull(ref, check=False, timeout=60)
    dt = time.monotonic() - t0
    record_timing("docker pull private before login (fails)", dt)
    assert res.returncode != 0
    err = (res.stdout + res.stderr).lower()
    assert "denied" in err or "unauthorized" in err, res.stderr
    assert not d.has_image(ref)
    assert_no_proxy_errors(proxy_log)
    assert not served(proxy_log, "GET", "/v2/private/secret/manifests/")
    refused = [e for e in proxy_log.access() if "/v2/private/secret/manifests/" in e["uri"]]
    assert refused and all(e["status"] == "401" for e in refused), refused

    assert d.login(proxy.host, "alice", "wrong", check=False).returncode != 0
    d.login(proxy.host, "alice", hub.users["alice"])
    mark = d.log_mark()
    d.pull(ref)
    assert d.repo_digests(ref) == [f"{proxy.host}/private/secret@{secret.digest}"]
    assert not d.fell_back_to_hub(since=mark)
    assert_served_manifest(proxy_log, "private/secret")
    assert_no_proxy_errors(proxy_log)


# -- 4. skopeo ------------------------------------------------------------------------------


def _dir_manifests(out: Path) -> dict[str, str]:
    """file name -> sha256 of every manifest skopeo wrote into a dir: destination."""
    return {p.name: sha256(p.read_bytes()) for p in out.iterdir() if p.name.endswith("manifest.json")}


@pytest.mark.parametrize("key", ["library/multi:latest", "library/ociidx:latest"])
def test_skopeo_copy_all_over_verified_tls(
    proxy: ProxyProcess, hub: Hub, proxy_cert_dir: Path, tmp_path: Path, proxy_log: ProxyLog, key: str
) -> None:
    """skopeo copy --all --preserve-digests from the proxy's TLS listener (CA verified) writes the upstream's index and children."""
    image = hub.images[key]
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = skopeo_copy(f"docker://{proxy.tls_host}/{key}", f"dir:{out}", cert_dir=proxy_cert_dir)
    record_timing(f"skopeo copy --all {key} (tls)", time.monotonic() - t0)
    assert skopeo_accessed(res) == [f"{proxy.tls_host}/{key}"]
    digests = _dir_manifests(out)
    assert digests["manifest.json"] == image.digest
    children = {v for k, v in digests.items() if k != "manifest.json"}
    assert children == set(image.children)
    for child in image.platforms.values():
        for blob in child.layers:
            assert sha256((out / blob.digest.split(":", 1)[1]).read_bytes()) == blob.digest
    assert_served_manifest(proxy_log, key.split(":")[0])
    assert_no_proxy_errors(proxy_log)


def test_skopeo_rejects_proxy_cert_without_ca(proxy: ProxyProcess, tmp_path: Path, proxy_log: ProxyLog) -> None:
    """With tls-verify and without the proxy's CA, skopeo refuses the TLS listener: the certificate really is checked."""
    res = skopeo_copy(
        f"docker://{proxy.tls_host}/library/alpine:latest", f"dir:{tmp_path / 'out'}", check=False, timeout=60
    )
    assert res.returncode != 0
    assert "x509" in res.stderr or "certificate" in res.stderr, res.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not served(proxy_log, "GET", "/v2/library/alpine/manifests/")


def test_skopeo_registries_conf_mirror(proxy: ProxyProcess, hub: Hub, tmp_path: Path, proxy_log: ProxyLog) -> None:
    """A registries.conf [[registry.mirror]] for docker.io pointing at the proxy serves docker.io/library/alpine:latest."""
    conf = write_registries_conf(tmp_path / "registries.conf", "docker.io", proxy.host, insecure=True)
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = skopeo_copy("docker://docker.io/library/alpine:latest", f"dir:{out}", registries_conf=conf)
    record_timing("skopeo copy via registries.conf mirror (http)", time.monotonic() - t0)
    assert skopeo_accessed(res) == [f"{proxy.host}/library/alpine:latest"], res.stderr[-3000:]
    assert sha256((out / "manifest.json").read_bytes()) == hub.images["library/alpine:latest"].digest
    assert_served_manifest(proxy_log, "library/alpine")
    assert_no_proxy_errors(proxy_log)


def test_skopeo_registries_conf_tls_mirror(
    proxy: ProxyProcess, hub: Hub, proxy_cert_dir: Path, tmp_path: Path, proxy_log: ProxyLog
) -> None:
    """A verified-TLS registries.conf mirror (proxy CA via --src-cert-dir) serves docker.io/myorg/tool:1.0."""
    conf = write_registries_conf(tmp_path / "registries.conf", "docker.io", proxy.tls_host, insecure=False)
    out = tmp_path / "out"
    res = skopeo_copy("docker://docker.io/myorg/tool:1.0", f"dir:{out}", registries_conf=conf, cert_dir=proxy_cert_dir)
    assert skopeo_accessed(res) == [f"{proxy.tls_host}/myorg/tool:1.0"], res.stderr[-3000:]
    assert sha256((out / "manifest.json").read_bytes()) == hub.images["myorg/tool:1.0"].digest
    assert_no_proxy_errors(proxy_log)


# -- 5. containerd ------------------------------------------------------------------------


def assert_ctr_served_by_proxy(log: ProxyLog, path: str) -> None:
    """containerd's mirror requests (``?ns=docker.io``) for ``path`` were answered 200 by the proxy."""
    ns = [e for e in log.access() if "ns=docker.io" in e["uri"]]
    assert ns, f"no ?ns=docker.io requests reached the proxy:\n{log.text()[-4000:]}"
    ok = [e for e in ns if e["uri"].startswith(f"/v2/{path}/manifests/") and e["status"] == "200"]
    assert ok, f"proxy did not serve /v2/{path}/manifests/?ns=docker.io:\n{log.text()[-4000:]}"
    blobs = [e for e in ns if "/blobs/" in e["uri"]]
    assert blobs and all(e["status"] == "200" for e in blobs), blobs


def test_ctr_pull_via_hosts_toml_plain_http(
    ctr_client: Containerd, proxy: ProxyProcess, hub: Hub, tmp_path: Path, proxy_log: ProxyLog
) -> None:
    """ctr pulls docker.io/library/alpine:latest through a plain-HTTP hosts.toml mirror at the proxy, ?ns=docker.io served."""
    hosts = tmp_path / "hosts.d"
    write_hosts_toml(hosts, "docker.io", proxy.url)
    t0 = time.monotonic()
    ctr_client.pull("docker.io/library/alpine:latest", hosts)
    record_timing("ctr pull alpine (hosts.toml http)", time.monotonic() - t0)
    assert ctr_client.image_digest("docker.io/library/alpine:latest") == hub.images["library/alpine:latest"].digest
    assert ctr_client.snapshots(), "pull did not unpack"
    assert_ctr_served_by_proxy(proxy_log, "library/alpine")
    assert_no_proxy_errors(proxy_log)


def test_ctr_pull_via_hosts_toml_tls_with_ca(
    ctr_client: Containerd, proxy: ProxyProcess, hub: Hub, tmp_path: Path, proxy_log: ProxyLog
) -> None:
    """ctr pulls through the proxy's TLS listener verifying it with `ca = proxy CA` in hosts.toml."""
    hosts = tmp_path / "hosts.d"
    write_hosts_toml(hosts, "docker.io", proxy.tls_url, ca_pem=proxy.ca_pem)
    t0 = time.monotonic()
    ctr_client.pull("docker.io/library/alpine:3.19", hosts)
    record_timing("ctr pull alpine:3.19 (hosts.toml https+ca)", time.monotonic() - t0)
    assert ctr_client.image_digest("docker.io/library/alpine:3.19") == hub.images["library/alpine:3.19"].digest
    assert_ctr_served_by_proxy(proxy_log, "library/alpine")
    assert_no_proxy_errors(proxy_log)


def test_ctr_pull_oci_index(
    ctr_client: Containerd, proxy: ProxyProcess, hub: Hub, tmp_path: Path, proxy_log: ProxyLog
) -> None:
    """ctr pulls the multi-arch OCI index through the proxy: the image records the index digest, amd64 child fetched."""
    idx = hub.images["library/ociidx:latest"]
    hosts = tmp_path / "hosts.d"
    write_hosts_toml(hosts, "docker.io", proxy.url)
    ctr_client.pull("docker.io/library/ociidx:latest", hosts)
    assert ctr_client.image_digest("docker.io/library/ociidx:latest") == idx.digest
    assert_ctr_served_by_proxy(proxy_log, "library/ociidx")
    assert served(proxy_log, "GET", f"/v2/library/ociidx/manifests/{idx.platforms['linux/amd64'].digest}")
    assert_no_proxy_errors(proxy_log)


def test_ctr_private_pull_with_user(
    ctr_client: Containerd, proxy: ProxyProcess, hub: Hub, tmp_path: Path, proxy_log: ProxyLog
) -> None:
    """ctr --user alice:wonderland pulls private/secret (POST /token at the proxy); without --user it is refused."""
    ref = "docker.io/private/secret:latest"
    hosts = tmp_path / "hosts.d"
    write_hosts_toml(hosts, "docker.io", proxy.url)
    res = ctr_client.pull(ref, hosts, check=False, allow_fallback=True, timeout=60)
    assert res.returncode != 0
    assert ctr_client.image_digest(ref) is None
    proxy_log.reset()
    ctr_client.pull(ref, hosts, user=f"alice:{hub.users['alice']}")
    assert ctr_client.image_digest(ref) == hub.images["private/secret:latest"].digest
    assert served(proxy_log, "POST", "/token"), proxy_log.text()[-3000:]
    assert_ctr_served_by_proxy(proxy_log, "private/secret")
    assert_no_proxy_errors(proxy_log)


# -- 6. podman --------------------------------------------------------------------------------


def test_podman_pull_via_registries_conf_mirror(
    podman: Podman, proxy: ProxyProcess, hub: Hub, tmp_path: Path, proxy_log: ProxyLog
) -> None:
    """podman pull docker.io/library/alpine:latest goes to the registries.conf mirror (the proxy) and gets the upstream digest."""
    conf = write_registries_conf(tmp_path / "registries.conf", "docker.io", proxy.host, insecure=True)
    t0 = time.monotonic()
    res = podman.pull("docker.io/library/alpine:latest", registries_conf=conf)
    record_timing("podman pull alpine (registries.conf mirror)", time.monotonic() - t0)
    assert f"{proxy.host}/library/alpine" in res.stderr
    assert podman.image_digest("docker.io/library/alpine:latest") == hub.images["library/alpine:latest"].digest
    assert_served_manifest(proxy_log, "library/alpine")
    assert_no_proxy_errors(proxy_log)


def test_podman_pull_multiarch_via_tls_mirror(
    podman: Podman, proxy: ProxyProcess, hub: Hub, proxy_cert_dir: Path, tmp_path: Path, proxy_log: ProxyLog
) -> None:
    """podman pulls the manifest list via a verified-TLS registries.conf mirror; its Digest is the list digest."""
    conf = write_registries_conf(tmp_path / "registries.conf", "docker.io", proxy.tls_host)
    multi = hub.images["library/multi:latest"]
    podman.pull("docker.io/library/multi:latest", registries_conf=conf, cert_dir=proxy_cert_dir)
    assert podman.image_digest("docker.io/library/multi:latest") == multi.digest
    assert podman.inspect("docker.io/library/multi:latest")["Architecture"] == "amd64"
    assert_served_manifest(proxy_log, "library/multi")
    assert_no_proxy_errors(proxy_log)


# -- plain listener vs https-first clients ----------------------------------------------------
#
# dockerd (insecure/loopback registries), skopeo and podman (``insecure = true``
# mirrors) try https:// first and fall back to http:// when the TLS handshake
# fails.  A registry on plain HTTP makes that fail at once (distribution answers
# the ClientHello with "HTTP/1.1 400 Bad Request", so Go reports "server gave
# HTTP response to HTTPS client"); a listener that stays silent costs every
# such client its 10 s TLS handshake timeout per connection attempt.

TLS_TIMEOUT = "TLS handshake timeout"


def test_docker_https_probe_of_plain_listener_fails_fast(docker_client: Dockerd, proxy: ProxyProcess, hub: Hub) -> None:
    """dockerd's https:// probe of the proxy's plain-HTTP port fails at once (no 10 s TLS handshake timeout) before http://."""
    d = docker_client
    ref = f"{proxy.host}/alpine:3.21"
    mark = d.log_mark()
    t0 = time.monotonic()
    d.pull(ref)
    elapsed = time.monotonic() - t0
    record_timing("docker pull host/alpine:3.21 (https probe + http)", elapsed)
    assert d.repo_digests(ref) == [f"{proxy.host}/alpine@{hub.images['library/alpine:3.21'].digest}"]
    probe = [line for line in d.log_text(mark).splitlines() if "Attempting next endpoint" in line]
    assert not any(TLS_TIMEOUT in line for line in probe), "\n".join(probe)


def test_skopeo_insecure_mirror_probe_fails_fast(proxy: ProxyProcess, hub: Hub, tmp_path: Path) -> None:
    """skopeo's https:// ping of an `insecure = true` mirror on the plain port fails at once, then http:// serves the pull."""
    conf = write_registries_conf(tmp_path / "registries.conf", "docker.io", proxy.host, insecure=True)
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = skopeo_copy("docker://docker.io/library/alpine:3.19", f"dir:{out}", registries_conf=conf)
    elapsed = time.monotonic() - t0
    record_timing("skopeo copy via insecure mirror (https probe + http)", elapsed)
    assert sha256((out / "manifest.json").read_bytes()) == hub.images["library/alpine:3.19"].digest
    slow = [line for line in res.stderr.splitlines() if TLS_TIMEOUT in line]
    assert not slow, "\n".join(slow)


# -- 7. 1 GiB through dockerd --------------------------------------------------------------


class RssSampler(threading.Thread):
    """Samples the proxy's RSS (KiB) every 100 ms until stopped; keeps the peak."""

    def __init__(self, proxy: ProxyProcess, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.interval = interval
        self.samples: list[int] = [proxy.rss_kib()]
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.samples.append(self.proxy.rss_kib())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.samples)


@pytest.mark.slow
def test_docker_pull_1gib_via_mirror_memory_flat(
    docker_client: Dockerd, proxy: ProxyProcess, hub: Hub, proxy_log: ProxyLog
) -> None:
    """`docker pull big:latest` (1 GiB layer) via the mirror: upstream digest, no fallback, proxy RSS growth < 100 MiB."""
    big = hub.seed_big()
    assert big.layers[0].size >= 1 << 30
    d = docker_client
    proxy_log.reset()
    baseline = proxy.rss_kib()
    sampler = RssSampler(proxy)
    sampler.start()
    mark = d.log_mark()
    t0 = time.monotonic()
    try:
        d.pull("big:latest", timeout=600)
    finally:
        elapsed = time.monotonic() - t0
        peak = sampler.stop()
    growth_mib = (peak - baseline) / 1024
    record_timing("docker pull big:latest 1 GiB (mirror)", elapsed)
    print(
        f"[1gib] pull {elapsed:.1f}s, proxy RSS baseline {baseline / 1024:.1f} MiB, "
        f"peak {peak / 1024:.1f} MiB, growth {growth_mib:.1f} MiB, {len(sampler.samples)} samples"
    )
    assert d.repo_digests("big:latest") == [f"big@{big.digest}"]
    assert not d.fell_back_to_hub(since=mark)
    assert not d.attempted_next_endpoint(since=mark), d.log_text(mark)[-3000:]
    layer_gets = served(proxy_log, "GET", f"/v2/library/big/blobs/{big.layers[0].digest}")
    assert layer_gets and int(layer_gets[-1]["bytes"]) == big.layers[0].size, proxy_log.text()[-3000:]
    assert_no_proxy_errors(proxy_log)
    assert growth_mib < 100, f"proxy RSS grew {growth_mib:.1f} MiB during a 1 GiB pull"
