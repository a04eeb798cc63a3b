"""Real clients pushing through ``twist regproxy`` to the Docker-Hub-like upstream.

docker (login, push, cross-repository mount, a 1 GiB layer) against the proxy's
plain-HTTP listener, skopeo (multi-arch copy with --preserve-digests) through its
verified TLS listener. Every push goes to a new ``pushtest/...`` repository and is
verified directly upstream, by digest. Timings are printed (``-s``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_push import ProcSampler
from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub
from tests.upstream.images import ALL_MANIFEST_TYPES, CREATED, random_stream

from .daemons import Dockerd, skopeo_copy

pytestmark = [pytest.mark.clients]

MIB = 1 << 20
GIB = 1 << 30
ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+)" (?P<status>\d{3}) ')


def unique(stem: str) -> str:
    return f"pushtest/{stem}-{uuid.uuid4().hex[:8]}"


def access_log(text: str) -> list[tuple[str, str, str]]:
    """(method, uri, status) of every proxy access-log line in ``text``."""
    return [(m["method"], m["uri"], m["status"]) for m in map(ACCESS.search, text.splitlines()) if m]


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pushd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A private dockerd without mirrors: pushes go straight to the named host (the proxy)."""
    d = Dockerd(tmp_path_factory.mktemp("pushd"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def logged_in(pushd: Dockerd, proxy: ProxyProcess) -> Dockerd:
    """``pushd`` with ``docker login PROXY -u alice`` done."""
    res = pushd.login(proxy.host, "alice", "wonderland")
    assert "Login Succeeded" in res.stdout, res
    return pushd


@pytest.fixture(scope="module")
def cert_dir(proxy: ProxyProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A containers-certs.d style directory holding the proxy's CA."""
    d = tmp_path_factory.mktemp("proxy-certs")
    (d / "ca.crt").write_bytes(proxy.ca_pem.read_bytes())
    return d


def upstream_manifest(hub: Hub, repo: str, reference: str) -> tuple[str, dict]:
    r = hub.get(f"/v2/{repo}/manifests/{reference}", {"Accept": ALL_MANIFEST_TYPES})
    assert r.status == 200, (repo, reference, r.status, r.body[:300])
    return r.headers["Docker-Content-Digest"], json.loads(r.body)


def assert_blobs_upstream(hub: Hub, repo: str, manifest: dict) -> None:
    """Every blob the manifest names is in ``repo`` upstream with exactly its digest."""
    for desc in [manifest["config"], *manifest["layers"]]:
        assert hub.blob_digest(repo, desc["digest"]) == desc["digest"]


# -- docker login ---------------------------------------------------------------------


def test_docker_login_wrong_password_fails_clearly(pushd: Dockerd, proxy: ProxyProcess, hub: Hub) -> None:
    """``docker login PROXY`` with a wrong password fails with a clear 401/unauthorized message."""
    res = pushd.login(proxy.host, "alice", "not-the-password", check=False)
    assert res.returncode != 0
    message = (res.stdout + res.stderr).lower()
    print(f"docker login (wrong password): {res.stderr.strip()}")
    assert "unauthorized" in message or "401" in message or "incorrect" in message, res.stderr
    assert "timeout" not in message and "eof" not in message, res.stderr


def test_docker_login(pushd: Dockerd, proxy: ProxyProcess, hub: Hub) -> None:
    """``docker login PROXY -u alice``: the token request reached the token server with alice's credentials."""
    before = len(hub.token_log())
    res = pushd.login(proxy.host, "alice", "wonderland")
    assert "Login Succeeded" in res.stdout
    entries = hub.token_log()[before:]
    assert any(e.get("username") == "alice" and e.get("status", 200) == 200 for e in entries), entries
    config = json.loads((pushd.docker_config / "config.json").read_text())
    assert proxy.host in config["auths"]


# -- docker push ------------------------------------------------------------------------


def test_docker_push_then_cross_repo_mount(logged_in: Dockerd, proxy: ProxyProcess, hub: Hub) -> None:
    """Pull PROXY/alpine, push it as PROXY/pushtest/alpine-X:1 and as another repo; the second push mounts (201)."""
    d = logged_in
    d.pull(f"{proxy.host}/alpine:latest")
    first = unique("alpine")
    mark = len(proxy.log_text())
    d.tag(f"{proxy.host}/alpine:latest", f"{proxy.host}/{first}:1")
    t0 = time.monotonic()
    res = d.push(f"{proxy.host}/{first}:1")
    print(f"docker push {first}:1 via proxy: {time.monotonic() - t0:.2f}s\n{res.stdout}")
    digest, manifest = upstream_manifest(hub, first, "1")
    assert f"digest: {digest}" in res.stdout
    assert f"{proxy.host}/{first}@{digest}" in d.repo_digests(f"{proxy.host}/{first}:1")
    assert_blobs_upstream(hub, first, manifest)
    # The image came from the same registry: the manifest is alpine's, byte for byte.
    assert digest == hub.images["library/alpine:latest"].digest
    log = access_log(proxy.log_text()[mark:])
    assert not [e for e in log if e[2].startswith("5")], log
    # dockerd knows the layers came from PROXY/alpine, so it mounts them with from=alpine:
    # with the library/ prefix on, that must reach library/alpine upstream (201, not an upload).
    layer_digests = [layer["digest"] for layer in manifest["layers"]]
    short_mounts = [e for e in log if e[0] == "POST" and e[1].startswith(f"/v2/{first}/blobs/uploads/?")
                    and "from=alpine" in e[1]]
    assert short_mounts, f"dockerd did not mount from=alpine; proxy log:\n{proxy.log_text()[mark:]}"
    assert all(e[2] == "201" for e in short_mounts), short_mounts
    assert "Mounted from alpine" in res.stdout

    other = unique("other")
    mark = len(proxy.log_text())
    d.tag(f"{proxy.host}/alpine:latest", f"{proxy.host}/{other}:1")
    res = d.push(f"{proxy.host}/{other}:1")
    print(f"docker push {other}:1:\n{res.stdout}")
    log = access_log(proxy.log_text()[mark:])
    mounts = [e for e in log if e[0] == "POST" and e[1].startswith(f"/v2/{other}/blobs/uploads/?")
              and "mount=" in e[1] and "from=" in e[1]]
    assert mounts, f"dockerd did not try a cross-repo mount; proxy log:\n{proxy.log_text()[mark:]}"
    assert all(e[2] == "201" for e in mounts), mounts
    assert "Mounted from" in res.stdout
    # Mounted layers were not uploaded again (the config blob is always uploaded by dockerd).
    uploaded = [e for e in log if e[0] == "PUT" and f"/v2/{other}/blobs/uploads/" in e[1]]
    assert not [e for e in uploaded if any(dg.replace(":", "%3A") in e[1] or dg in e[1] for dg in layer_digests)], uploaded
    digest2, manifest2 = upstream_manifest(hub, other, "1")
    assert digest2 == digest
    assert_blobs_upstream(hub, other, manifest2)


def test_docker_push_without_login_is_refused(pushd: Dockerd, proxy: ProxyProcess, hub: Hub, tmp_path: Path) -> None:
    """A push with no credentials is refused by the upstream (via the proxy's challenge): a clear auth error."""
    d = pushd
    d.pull(f"{proxy.host}/alpine:latest")
    repo = unique("anon")
    d.tag(f"{proxy.host}/alpine:latest", f"{proxy.host}/{repo}:1")
    env = d.env()
    env["DOCKER_CONFIG"] = str(tmp_path)  # no login state
    res = subprocess.run([d.docker_bin, "push", f"{proxy.host}/{repo}:1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    print(f"anonymous docker push: {res.stderr.strip()}")
    assert "denied" in res.stderr.lower() or "unauthorized" in res.stderr.lower() or "authentication required" in res.stderr.lower()
    assert hub.get(f"/v2/{repo}/manifests/1", {"Accept": ALL_MANIFEST_TYPES}).status == 404


# -- skopeo ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["library/multi:latest", "library/ociidx:latest"])
def test_skopeo_copy_multiarch_through_tls_both_ways(
    proxy: ProxyProcess, hub: Hub, cert_dir: Path, key: str
) -> None:
    """skopeo copy --all --preserve-digests PROXYTLS/library/X → PROXYTLS/pushtest/X: same index and child digests upstream."""
    image = hub.images[key]
    dest = unique(image.repository.split("/")[-1])
    mark = len(proxy.log_text())
    t0 = time.monotonic()
    res = skopeo_copy(
        f"docker://{proxy.tls_host}/{key}",
        f"docker://{proxy.tls_host}/{dest}:latest",
        cert_dir=cert_dir,
        dest_creds="alice:wonderland",
    )
    print(f"skopeo copy {key} → {dest}: {time.monotonic() - t0:.2f}s")
    digest, index = upstream_manifest(hub, dest, "latest")
    assert digest == image.digest
    assert [m["digest"] for m in index["manifests"]] == list(image.children)
    for child in image.children:
        child_digest, manifest = upstream_manifest(hub, dest, child)
        assert child_digest == child
        assert_blobs_upstream(hub, dest, manifest)
    log = access_log(proxy.log_text()[mark:])
    assert any(e[0] == "PUT" and e[1] == f"/v2/{dest}/manifests/latest" and e[2] == "201" for e in log), log
    assert not [e for e in log if e[2].startswith("5")], log
    assert "Traceback" not in proxy.log_text()[mark:]
    assert res.returncode == 0


# -- 1 GiB layer --------------------------------------------------------------------------


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 1704067200
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % 512)


def docker_archive(tag: str, seed: str, size: int) -> Iterator[bytes]:
    """A ``docker save`` style tarball, streamed: one layer holding one ``size``-byte random file.

    The layer tar is generated on the fly and nested into the archive (its size is
    known in advance); config and manifest.json follow it, since they need its diff_id.
    """
    inner_size = 512 + size + len(_pad(size)) + 1024
    yield _tar_header("layer.tar", inner_size)
    sha = hashlib.sha256()
    header = _tar_header("big.bin", size)
    sha.update(header)
    yield header
    for chunk in random_stream(seed, size, chunk=4 * MIB):
        sha.update(chunk)
        yield chunk
    tail = _pad(size) + b"\0" * 1024
    sha.update(tail)
    yield tail + _pad(inner_size)
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": CREATED,
        "config": {"Cmd": ["/big.bin"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha.hexdigest()]},
        "history": [{"created": CREATED, "created_by": "regproxy push test"}],
    }).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [tag], "Layers": ["layer.tar"]}]).encode()
    for name, data in (("config.json", config), ("manifest.json", manifest)):
        yield _tar_header(name, len(data)) + data + _pad(len(data))
    yield b"\0" * 1024


def docker_load(d: Dockerd, chunks: Iterator[bytes]) -> str:
    proc = subprocess.Popen([d.docker_bin, "load"], env=d.env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        for chunk in chunks:
            proc.stdin.write(chunk)
    except BrokenPipeError:
        pass
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out, err)
    return out.decode()


def test_docker_push_1gib_layer_memory_flat(logged_in: Dockerd, proxy: ProxyProcess, hub: Hub) -> None:
    """docker push of an image with a 1 GiB layer through the proxy: proxy RSS growth < 100 MiB, digests exact upstream."""
    d = logged_in
    repo = unique("big")
    local = f"{proxy.host}/{repo}:1"
    t0 = time.monotonic()
    print(docker_load(d, docker_archive(local, "push-big-layer", GIB)).strip())
    print(f"docker load (1 GiB layer): {time.monotonic() - t0:.1f}s")

    # The same image pushed straight to the upstream first, for comparison (both pushes
    # compress the layer in dockerd; going first, the direct push gets no cache advantage).
    registry_host = hub.registry_url.split("://", 1)[1]
    d.login(registry_host, "alice", "wonderland")
    direct_repo = unique("bigdirect")
    d.tag(local, f"{registry_host}/{direct_repo}:1")
    t0 = time.monotonic()
    d.push(f"{registry_host}/{direct_repo}:1", timeout=900)
    direct = time.monotonic() - t0
    direct_digest, _ = upstream_manifest(hub, direct_repo, "1")

    mark = len(proxy.log_text())
    sampler = ProcSampler(proxy)
    sampler.start()
    t0 = time.monotonic()
    try:
        d.push(local, timeout=900)
    finally:
        peak = sampler.stop()
    via_proxy = time.monotonic() - t0
    growth_mib = (peak - sampler.baseline) / 1024

    digest, manifest = upstream_manifest(hub, repo, "1")
    assert f"{proxy.host}/{repo}@{digest}" in d.repo_digests(local)
    assert manifest["layers"][0]["size"] > GIB
    assert_blobs_upstream(hub, repo, manifest)
    log = access_log(proxy.log_text()[mark:])
    assert any(e[0] == "PATCH" and e[1].startswith(f"/v2/{repo}/blobs/uploads/") and e[2] == "202" for e in log), log

    print(
        f"\ndocker push, 1 GiB layer: via proxy {via_proxy:.1f}s, direct to upstream {direct:.1f}s "
        f"(same manifest: {direct_digest == digest}); proxy RSS baseline {sampler.baseline / 1024:.1f} MiB, "
        f"peak {peak / 1024:.1f} MiB, growth {growth_mib:.1f} MiB; proxy CPU {sampler.cpu_seconds:.1f}s "
        f"({os.cpu_count()} CPUs); largest file the proxy held open: "
        f"{sampler.biggest_file} bytes"
    )
    assert growth_mib < 100
    assert sampler.biggest_file < 8 * MIB, sampler.biggest_file_name
    d.rmi(local, f"{registry_host}/{direct_repo}:1", check=False)
