"""Real clients through the manifest cache: second pulls cost a HEAD per tag, and cached tags pull with the upstream down.

docker (through ``registry-mirrors``), ctr (``hosts.toml``) and skopeo pull a
Docker manifest, a Docker manifest list and an OCI index with attestation
manifests, by tag and by digest. The witness is the Hub stand-in's access log
(read with a sentinel request, see :func:`tests.integration.test_manifest_cache.manifest_requests`)
and its CDN log for blobs. The "upstream down" tests run a company registry of
their own, fill two proxies in front of it, and stop it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.hostile import wait_until
from tests.integration.http import request
from tests.integration.test_cache import MANIFEST_TYPES
from tests.integration.test_manifest_cache import hub_upstream, manifest_requests, toml_proxy, write_toml
from tests.proxyproc import ProxyProcess
from tests.upstream import images as img
from tests.upstream.attestations import make_attested_index, seed_attested
from tests.upstream.hub import Hub
from tests.upstream.images import SeededImage
from tests.upstream.registries import CompanyRegistry

from .daemons import ClientError, Containerd, Dockerd, skopeo_copy, write_hosts_toml

pytestmark = [pytest.mark.clients]

CLIENTS = ["docker", "ctr", "skopeo"]
@pytest.fixture(scope="module")
def mc_proxy(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """regproxy with a cache directory in front of the Hub stand-in (plain HTTP); ``mcc-fresh/**`` tags fresh for 60 s."""
    work = tmp_path_factory.mktemp("mc-proxy")
    toml = write_toml(work / "regproxy.toml", [hub_upstream(hub, [{"repositories": ["mcc-fresh/**"], "fresh": 60}])])
    with toml_proxy(work, toml, ["--cache-dir", str(work / "cache")]) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def mc_dockerd(mc_proxy: ProxyProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A dockerd whose registry-mirrors is the module's caching proxy."""
    d = Dockerd(tmp_path_factory.mktemp("mc-dockerd"))
    d.start(mirrors=[mc_proxy.url])
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def mc_hosts(mc_proxy: ProxyProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A containerd hosts dir sending docker.io to the caching proxy."""
    hosts = tmp_path_factory.mktemp("mc-hosts")
    write_hosts_toml(hosts, "docker.io", mc_proxy.url)
    return hosts


def _wipe_docker(d: Dockerd) -> None:
    ids = d.docker("images", "-aq", check=False, timeout=60).stdout.split()
    if ids:
        d.docker("rmi", "--force", *sorted(set(ids)), check=False, timeout=300)


def _wipe_ctr(c: Containerd) -> None:
    refs = list(c.images())
    if refs:
        c.rmi(*refs, check=False)


def _dir_digest(out: Path) -> str:
    return "sha256:" + hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()


@dataclass
class Pullers:
    """Pull one reference with one client, through the caching proxy, and check what arrived."""

    dockerd: Dockerd
    containerd: Containerd
    hosts: Path
    proxy: ProxyProcess
    scratch: Path

    def wipe(self) -> None:
        _wipe_docker(self.dockerd)
        _wipe_ctr(self.containerd)

    def pull(self, client: str, image: SeededImage, by: str) -> None:
        sep, ref = (":", image.tag) if by == "tag" else ("@", image.digest)
        if client == "docker":
            name = image.repository.removeprefix("library/")
            self.dockerd.pull(f"{name}{sep}{ref}")
            assert f"{name}@{image.digest}" in self.dockerd.repo_digests(f"{name}{sep}{ref}")
        elif client == "ctr":
            full = f"docker.io/{image.repository}{sep}{ref}"
            self.containerd.pull(full, self.hosts)
            assert self.containerd.image_digest(full) == image.digest
        else:
            out = self.scratch / uuid.uuid4().hex
            skopeo_copy(f"docker://{self.proxy.host}/{image.repository}{sep}{ref}", f"dir:{out}", tls_verify=False)
            assert _dir_digest(out) == image.digest


@pytest.fixture
def pullers(
    mc_dockerd: Dockerd, containerd: Containerd, mc_hosts: Path, mc_proxy: ProxyProcess, tmp_path: Path
) -> Iterator[Pullers]:
    p = Pullers(mc_dockerd, containerd, mc_hosts, mc_proxy, tmp_path)
    p.wipe()
    try:
        yield p
    finally:
        p.wipe()


@pytest.fixture(params=["docker-manifest", "docker-list", "oci-index-attested"])
def image(request: pytest.FixtureRequest, hub: Hub) -> SeededImage:
    """A Docker manifest, a Docker manifest list, or an OCI index with attestations (two platforms)."""
    if request.param == "docker-manifest":
        return hub.images["myorg/tool:1.0"]
    if request.param == "docker-list":
        return hub.images["library/multi:latest"]
    return seed_attested(hub)


def _blob_gets(hub: Hub, image: SeededImage, since: int) -> list[str]:
    wanted = {b.digest.split(":")[1] for b in image.blobs()}
    return [
        str(e["uri"]) for e in hub.cdn_log()[since:] if e["method"] == "GET" and any(w in str(e["uri"]) for w in wanted)
    ]


@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize("client", CLIENTS)
def test_second_pull_costs_a_head_per_tag_and_nothing_by_digest(
    pullers: Pullers, hub: Hub, image: SeededImage, client: str, by: str
) -> None:
    """Pull, remove, pull again: the second pull's upstream manifest requests are one HEAD of the tag (none by digest), no blob GET."""
    mark = len(hub.registry_requests())
    pullers.pull(client, image, by)
    first = manifest_requests(hub, mark)
    pullers.wipe()
    mark, cdn = len(hub.registry_requests()), len(hub.cdn_log())
    pullers.pull(client, image, by)
    second = manifest_requests(hub, mark)
    print(f"\n[figures] {client} by {by} {image.reference}: first pull {first}; second pull {second}")
    expected = [("HEAD", f"/v2/{image.repository}/manifests/{image.tag}")] if by == "tag" else []
    assert second == expected
    assert _blob_gets(hub, image, cdn) == []
    assert "Traceback" not in pullers.proxy.log_text()


@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize("client", CLIENTS)
def test_cold_pull_fetches_each_manifest_once(
    pullers: Pullers, hub: Hub, client: str, by: str, request: pytest.FixtureRequest
) -> None:
    """A cold pull of an attested OCI index (content no one pulled) asks the upstream each manifest at most once, and the tag at most one HEAD."""
    repository = f"mcc/cold-{client}-{by}-{uuid.uuid4().hex[:6]}"
    image = hub.push(make_attested_index(repository, "latest", seed=repository))
    mark = len(hub.registry_requests())
    pullers.pull(client, image, by)
    seen = manifest_requests(hub, mark)
    print(f"\n[figures] cold {client} by {by} (attested index): {seen}")
    assert len(seen) == len(set(seen)), seen
    assert all(method == "GET" or path.endswith("/manifests/latest") for method, path in seen), seen
    fetched = {path.rsplit("/", 1)[1] for method, path in seen if method == "GET"}
    assert fetched & {"latest", image.digest}, seen  # the index itself came from the upstream once


def _fresh_image(hub: Hub, repository: str, seed: str) -> SeededImage:
    return hub.push(img.make_image(repository, "latest", seed=seed, platform=hub.platform, layer_sizes=(8192,)))


@pytest.mark.parametrize("client", CLIENTS)
def test_moved_tag_pulls_the_new_digest(pullers: Pullers, hub: Hub, client: str) -> None:
    """A tag pushed anew upstream after a pull: the next pull (after revalidation) gets the new digest."""
    repository = f"mcc/moved-{client}-{uuid.uuid4().hex[:6]}"
    old = _fresh_image(hub, repository, f"{repository}/1")
    pullers.pull(client, old, "tag")
    pullers.wipe()
    new = _fresh_image(hub, repository, f"{repository}/2")
    assert new.digest != old.digest
    mark = len(hub.registry_requests())
    pullers.pull(client, new, "tag")
    print(f"\n[figures] {client} pull of a moved tag: {manifest_requests(hub, mark)}")


@pytest.mark.parametrize("client", CLIENTS)
def test_fresh_window_second_pull_asks_the_upstream_nothing(pullers: Pullers, hub: Hub, client: str) -> None:
    """For a repository whose tags are fresh for 60 s, a second pull within that window makes no upstream manifest request at all."""
    image = _fresh_image(hub, f"mcc-fresh/app-{client}-{uuid.uuid4().hex[:6]}", f"mcc-fresh/{client}")
    pullers.pull(client, image, "tag")
    pullers.wipe()
    mark = len(hub.registry_requests())
    pullers.pull(client, image, "tag")
    assert manifest_requests(hub, mark) == []


# -- the upstream stopped ----------------------------------------------------------------


@dataclass
class Stopped:
    """A company registry that was filled through two proxies and then stopped."""

    registry: CompanyRegistry
    #: Default rules (a day of max-stale).
    proxy: ProxyProcess
    #: ``max_stale = 2`` for every repository.
    short: ProxyProcess
    cached: SeededImage
    uncached: SeededImage


def _pull_direct(client: str, proxy: ProxyProcess, ref: str, d: Dockerd, c: Containerd, scratch: Path) -> str:
    """Pull ``proxy.host/ref`` straight from the proxy (no mirror config); the digest that arrived."""
    full = f"{proxy.host}/{ref}"
    if client == "docker":
        d.pull(full)
        digests = d.repo_digests(full)
        assert len(digests) == 1, digests
        return digests[0].split("@", 1)[1]
    if client == "ctr":
        c.pull(full, None, plain_http=True)
        found = c.image_digest(full)
        assert found is not None
        return found
    out = scratch / uuid.uuid4().hex
    skopeo_copy(f"docker://{full}", f"dir:{out}", tls_verify=False)
    return _dir_digest(out)


@pytest.fixture(scope="module")
def stopped(mc_dockerd: Dockerd, containerd: Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stopped]:
    """team/app:1.0 pulled by docker, ctr and skopeo (each caches its own Accept set) through both proxies; then the registry stops."""
    work = tmp_path_factory.mktemp("mc-stopped")
    registry = CompanyRegistry(work / "company").start()
    proxy = short = None
    try:
        args = ["--upstream-ca", str(registry.ca_pem), "--cache-dir", str(work / "cache-a")]
        proxy = ProxyProcess(work / "a", registry.registry_url, args, tls=False).start()
        upstream = {
            "name": "registry.corp.test",
            "url": registry.registry_url,
            "default": True,
            "ca": [str(registry.ca_pem)],
            "tags": [{"repositories": ["**"], "max_stale": 2}],
        }
        toml = write_toml(work / "b" / "regproxy.toml", [upstream])
        short = toml_proxy(work / "b", toml, ["--cache-dir", str(work / "cache-b")]).start()
        cached = registry.images["team/app:1.0"]
        for each in (proxy, short):
            for client in CLIENTS:
                assert _pull_direct(client, each, "team/app:1.0", mc_dockerd, containerd, work) == cached.digest
            _wipe_docker(mc_dockerd)
            _wipe_ctr(containerd)
        reply = request("GET", f"{short.url}/v2/team/app/manifests/1.0", {"Accept": MANIFEST_TYPES})
        assert reply.status == 200
        registry.stop()
        yield Stopped(registry, proxy, short, cached, registry.images["team/base:2"])
    finally:
        registry.stop()
        for started in (proxy, short):
            if started is not None:
                started.stop()


@pytest.fixture
def clean(mc_dockerd: Dockerd, containerd: Containerd) -> Iterator[None]:
    _wipe_docker(mc_dockerd)
    _wipe_ctr(containerd)
    yield
    _wipe_docker(mc_dockerd)
    _wipe_ctr(containerd)


@pytest.mark.parametrize("client", ["docker", "ctr", "skopeo"])
@pytest.mark.usefixtures("clean")
def test_cached_tag_pulls_with_the_upstream_stopped(
    stopped: Stopped, mc_dockerd: Dockerd, containerd: Containerd, tmp_path: Path, client: str
) -> None:
    """With the upstream stopped, a tag this client pulled before pulls again (served stale), and so does its digest."""
    mark = len(stopped.proxy.log_text())
    got = _pull_direct(client, stopped.proxy, "team/app:1.0", mc_dockerd, containerd, tmp_path)
    assert got == stopped.cached.digest
    _wipe_docker(mc_dockerd)
    _wipe_ctr(containerd)
    got = _pull_direct(client, stopped.proxy, f"team/app@{stopped.cached.digest}", mc_dockerd, containerd, tmp_path)
    assert got == stopped.cached.digest
    log = stopped.proxy.log_text()[mark:]
    assert "/team/app stale" in log and 'cache="regproxy; hit; fwd=stale"' in log, log[-3000:]
    assert "Traceback" not in log


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.usefixtures("clean")
def test_uncached_tag_fails_clearly_with_the_upstream_stopped(
    stopped: Stopped, mc_dockerd: Dockerd, containerd: Containerd, tmp_path: Path, client: str
) -> None:
    """With the upstream stopped, a tag never cached fails: the client reports the proxy's 502, whose OCI error says the upstream is unreachable."""
    with pytest.raises(ClientError) as failed:
        _pull_direct(client, stopped.proxy, "team/base:2", mc_dockerd, containerd, tmp_path)
    output = f"{failed.value.output}\n{failed.value.stderr}"
    print(f"\n[figures] {client} uncached with upstream down: {output.strip().splitlines()[-1][:300]}")
    assert "502" in output, output[-2000:]
    reply = request("GET", f"{stopped.proxy.url}/v2/team/base/manifests/2", {"Accept": MANIFEST_TYPES})
    assert reply.status == 502
    error = json.loads(reply.body)["errors"][0]
    assert error["code"] == "UNAVAILABLE" and "upstream registry unreachable" in error["message"], error


@pytest.mark.parametrize("client", ["docker", "ctr"])
@pytest.mark.usefixtures("clean")
def test_after_max_stale_the_tag_is_no_longer_served(
    stopped: Stopped, mc_dockerd: Dockerd, containerd: Containerd, tmp_path: Path, client: str
) -> None:
    """Past max_stale (2 s) with the upstream stopped, pulling the tag fails with the proxy's 503; the digest still pulls."""

    def expired() -> bool:
        reply = request("GET", f"{stopped.short.url}/v2/team/app/manifests/1.0", {"Accept": MANIFEST_TYPES})
        return reply.status == 503

    wait_until(expired, 15, interval=0.2, what="max_stale to pass")
    with pytest.raises(ClientError) as failed:
        _pull_direct(client, stopped.short, "team/app:1.0", mc_dockerd, containerd, tmp_path)
    output = f"{failed.value.output}\n{failed.value.stderr}"
    assert "503" in output, output[-2000:]
    got = _pull_direct(client, stopped.short, f"team/app@{stopped.cached.digest}", mc_dockerd, containerd, tmp_path)
    assert got == stopped.cached.digest
