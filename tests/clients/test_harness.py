"""Self-tests of the client harness against a plain local distribution registry.

No regproxy involved: these pin that the real clients on this machine can be
driven by ``daemons.py`` (and fail loudly, never skip, when a binary is missing).
Timings go to stdout (run with ``-s``) and to ``<basetemp>/client-timings.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import pytest_twisted

from . import daemons
from ._localregistry import (
    LocalRegistry,
    free_port,
    make_image,
    make_tls,
    static_registry_resource,
)
from .daemons import (
    Containerd,
    DaemonStartError,
    Dockerd,
    Podman,
    SuspiciousPullError,
    skopeo,
    skopeo_accessed,
    skopeo_copy,
    write_hosts_toml,
    write_registries_conf,
)

pytestmark = pytest.mark.clients

TIMINGS: dict[str, float] = {}


def _timed(name: str, t0: float) -> float:
    dt = time.monotonic() - t0
    TIMINGS[name] = round(dt, 3)
    print(f"[timing] {name}: {dt:.2f}s")
    return dt


@pytest.fixture(scope="session", autouse=True)
def _timing_report(tmp_path_factory):
    yield
    out = tmp_path_factory.getbasetemp() / "client-timings.json"
    out.write_text(json.dumps(TIMINGS, indent=2))
    print("\n[timing] summary:", json.dumps(TIMINGS, indent=2))


# -- upstream fixtures ------------------------------------------------------------

class Images:
    """What the local registries hold (same content in both)."""

    tiny = make_image(seed=1)  # as "tiny:v1" and "library/tiny:v1"
    oci = make_image(seed=2, layer_sizes=(2048, 8192), oci=True)  # "library/ocitiny:v1"
    broken = make_image(seed=3, corrupt_diff_id=True)  # "library/broken:v1"


def _seed(reg: LocalRegistry) -> LocalRegistry:
    reg.push_image("tiny", "v1", Images.tiny)
    reg.push_image("library/tiny", "v1", Images.tiny)
    reg.push_image("library/ocitiny", "v1", Images.oci)
    reg.push_image("library/broken", "v1", Images.broken)
    return reg


@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def plain_registry(tmp_path_factory):
    t0 = time.monotonic()
    reg = LocalRegistry(tmp_path_factory.mktemp("plainreg")).start()
    _timed("docker-registry start (http)", t0)
    _seed(reg)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory, tls):
    t0 = time.monotonic()
    reg = LocalRegistry(tmp_path_factory.mktemp("tlsreg"), tls=tls).start()
    _timed("docker-registry start (https)", t0)
    _seed(reg)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory):
    """Plain HTTP with Basic auth (htpasswd): alice/secret."""
    reg = LocalRegistry(tmp_path_factory.mktemp("authreg"), htpasswd={"alice": "secret"}).start()
    _seed(reg)
    yield reg
    reg.stop()


def test_local_registry_serves_seeded_image(plain_registry, tls_registry):
    """The throwaway registries (http and https with our CA) serve the seeded manifests by digest."""
    for reg in (plain_registry, tls_registry):
        assert reg.manifest_digest("library/tiny", "v1") == Images.tiny.digest
        assert reg.manifest_digest("library/ocitiny", "v1") == Images.oci.digest


# -- dockerd -----------------------------------------------------------------------

@pytest.fixture
def dockerd(tmp_path):
    d = Dockerd(tmp_path / "dockerd")
    yield d
    d.stop()


def test_dockerd_starts_and_stops_cleanly(dockerd):
    """dockerd starts in a private mount namespace, answers `docker version`, and stop() leaves no process, mount or socket dir."""
    t0 = time.monotonic()
    dockerd.start()
    _timed("dockerd start", t0)
    assert "Server" in dockerd.docker("version").stdout
    pid, short = dockerd.proc.pid, dockerd.short
    # the daemon sees the Hub-blackholing /etc/hosts (bind mount in its namespace), we do not
    ns_mounts = Path(f"/proc/{pid}/mountinfo").read_text()
    assert " /etc/hosts " in ns_mounts
    assert "registry-1.docker.io" not in Path("/etc/hosts").read_text()
    t0 = time.monotonic()
    dockerd.stop()
    _timed("dockerd stop", t0)
    assert not daemons._group_members(pid)
    assert not short.exists()
    assert not daemons.leftover_mounts(dockerd.workdir)


def test_dockerd_pull_direct_by_host_port(dockerd, plain_registry):
    """`docker pull 127.0.0.1:PORT/tiny:v1` pulls from a plain-HTTP loopback registry and records its digest."""
    dockerd.start()
    ref = f"{plain_registry.host}/tiny:v1"
    t0 = time.monotonic()
    dockerd.pull(ref)
    _timed("docker pull direct (tiny, http)", t0)
    assert dockerd.repo_digests(ref) == [f"{plain_registry.host}/tiny@{Images.tiny.digest}"]
    assert not dockerd.fell_back_to_hub()


def test_dockerd_pull_via_registry_mirror_adds_library(dockerd, plain_registry):
    """With registry-mirrors, `docker pull tiny:v1` fetches `library/tiny` from the mirror without falling back to the Hub."""
    t0 = time.monotonic()
    dockerd.start(mirrors=[plain_registry.url])
    _timed("dockerd start with mirror", t0)
    t0 = time.monotonic()
    dockerd.pull("tiny:v1")
    _timed("docker pull via mirror (tiny, http)", t0)
    assert dockerd.repo_digests("tiny:v1") == [f"tiny@{Images.tiny.digest}"]
    dockerd.pull("ocitiny:v1")
    assert dockerd.repo_digests("ocitiny:v1") == [f"ocitiny@{Images.oci.digest}"]
    assert not dockerd.fell_back_to_hub()
    assert "GET /v2/library/tiny/manifests/" in plain_registry.log_path.read_text()


def test_dockerd_restart_switches_to_tls_mirror(dockerd, plain_registry, tls_registry):
    """restart(mirrors=...) rewrites daemon.json; an https mirror on loopback works (dockerd treats loopback as insecure)."""
    dockerd.start(mirrors=[plain_registry.url])
    t0 = time.monotonic()
    dockerd.restart(mirrors=[tls_registry.url])
    _timed("dockerd restart", t0)
    assert json.loads(dockerd.daemon_json.read_text())["registry-mirrors"] == [tls_registry.url]
    assert tls_registry.url in dockerd.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
    t0 = time.monotonic()
    dockerd.pull("tiny:v1")
    _timed("docker pull via mirror (tiny, https)", t0)
    assert dockerd.repo_digests("tiny:v1") == [f"tiny@{Images.tiny.digest}"]


def test_dockerd_broken_mirror_falls_back_to_blackholed_hub_fast(dockerd):
    """A dead mirror makes dockerd fall back to registry-1.docker.io, which the namespace's /etc/hosts refuses at once; the log shows it."""
    dockerd.start(mirrors=[f"http://127.0.0.1:{free_port()}"])
    mark = dockerd.log_mark()
    t0 = time.monotonic()
    res = dockerd.pull("tiny:v1", check=False)
    _timed("docker pull via dead mirror (fails)", t0)
    assert res.returncode != 0
    assert dockerd.fell_back_to_hub(since=mark)
    assert "registry-1.docker.io" in res.stderr + dockerd.log_text(mark)


def test_dockerd_login_tag_push_rmi(dockerd, plain_registry):
    """login keeps its state in the private DOCKER_CONFIG; tag+push uploads an image whose digest the registry then serves."""
    dockerd.start(mirrors=[plain_registry.url])
    dockerd.login(plain_registry.host, "alice", "secret")
    auths = json.loads((dockerd.docker_config / "config.json").read_text())["auths"]
    assert plain_registry.host in auths
    dockerd.pull("tiny:v1")
    dst = f"{plain_registry.host}/pushed/tiny:p1"
    dockerd.tag("tiny:v1", dst)
    t0 = time.monotonic()
    dockerd.push(dst)
    _timed("docker push (tiny, http)", t0)
    pushed = plain_registry.manifest_digest("pushed/tiny", "p1")
    assert pushed and f"{plain_registry.host}/pushed/tiny@{pushed}" in dockerd.repo_digests(dst)
    dockerd.rmi(dst, "tiny:v1")
    assert not dockerd.has_image("tiny:v1")


def test_dockerd_login_and_pull_with_basic_auth(dockerd, auth_registry):
    """docker login fails with a wrong password, succeeds with the right one, and the stored credentials let a pull through."""
    dockerd.start()
    ref = f"{auth_registry.host}/tiny:v1"
    assert dockerd.pull(ref, check=False).returncode != 0
    assert dockerd.login(auth_registry.host, "alice", "wrong", check=False).returncode != 0
    dockerd.login(auth_registry.host, "alice", "secret")
    dockerd.pull(ref)
    assert dockerd.repo_digests(ref) == [f"{auth_registry.host}/tiny@{Images.tiny.digest}"]


def test_dockerd_second_mirror_is_not_hub_fallback(dockerd, plain_registry):
    """With a dead first mirror and a good second one, the pull succeeds; attempted_next_endpoint() is true but fell_back_to_hub() is not."""
    dockerd.start(mirrors=[f"http://127.0.0.1:{free_port()}", plain_registry.url])
    mark = dockerd.log_mark()
    dockerd.pull("tiny:v1")
    assert dockerd.attempted_next_endpoint(since=mark)
    assert not dockerd.fell_back_to_hub(since=mark)


def test_two_dockerds_run_side_by_side(tmp_path, plain_registry):
    """Two Dockerd instances (own sockets, exec-roots, namespaces) run and pull concurrently."""
    a, b = Dockerd(tmp_path / "a"), Dockerd(tmp_path / "b")
    try:
        a.start(mirrors=[plain_registry.url])
        b.start()
        a.pull("tiny:v1")
        b.pull(f"{plain_registry.host}/tiny:v1")
        assert a.sock != b.sock and a.image_id("tiny:v1") == b.image_id(f"{plain_registry.host}/tiny:v1")
    finally:
        a.stop()
        b.stop()


# -- containerd ---------------------------------------------------------------------

@pytest.fixture
def containerd(tmp_path):
    c = Containerd(tmp_path / "containerd")
    t0 = time.monotonic()
    c.start()
    _timed("containerd start", t0)
    yield c
    t0 = time.monotonic()
    c.stop()
    _timed("containerd stop", t0)
    assert not daemons.leftover_mounts(c.workdir)


def test_ctr_pull_via_hosts_toml_plain_http(containerd, plain_registry, tmp_path):
    """ctr pulls docker.io/library/tiny:v1 through a plain-HTTP hosts.toml mirror and unpacks it into the snapshotter."""
    hosts = tmp_path / "hosts.d"
    p = write_hosts_toml(hosts, "docker.io", plain_registry.url)
    assert f'[host."{plain_registry.url}"]' in p.read_text()
    t0 = time.monotonic()
    containerd.pull("docker.io/library/tiny:v1", hosts)
    _timed("ctr pull via hosts.toml (tiny, http)", t0)
    assert containerd.image_digest("docker.io/library/tiny:v1") == Images.tiny.digest
    assert containerd.snapshots(), "pull did not unpack"
    assert "ns=docker.io" in plain_registry.log_path.read_text()


def test_ctr_pull_via_hosts_toml_tls_with_ca(containerd, tls_registry, tls, tmp_path):
    """ctr verifies the mirror's certificate: it pulls with `ca = ...` in hosts.toml and fails without it."""
    without = tmp_path / "noca"
    write_hosts_toml(without, "docker.io", tls_registry.url)
    res = containerd.pull("docker.io/library/ocitiny:v1", without, check=False, allow_fallback=True)
    assert res.returncode != 0
    assert "x509" in res.stderr or "certificate" in res.stderr
    with_ca = tmp_path / "ca"
    write_hosts_toml(with_ca, "docker.io", tls_registry.url, ca_pem=tls.ca_pem)
    t0 = time.monotonic()
    containerd.pull("docker.io/library/ocitiny:v1", with_ca)
    _timed("ctr pull via hosts.toml (oci 2 layers, https+ca)", t0)
    assert containerd.image_digest("docker.io/library/ocitiny:v1") == Images.oci.digest


def test_ctr_pull_direct_plain_http(containerd, plain_registry):
    """ctr pulls a host-prefixed ref straight from a plain-HTTP registry with --plain-http and no hosts dir."""
    ref = f"{plain_registry.host}/tiny:v1"
    containerd.pull(ref, None, plain_http=True)
    assert containerd.image_digest(ref) == Images.tiny.digest


def test_ctr_pull_with_user_basic_auth(containerd, auth_registry):
    """ctr --user U:P answers a Basic challenge; without it the pull is refused."""
    ref = f"{auth_registry.host}/tiny:v1"
    res = containerd.pull(ref, None, plain_http=True, check=False)
    assert res.returncode != 0 and "401" in res.stderr
    containerd.pull(ref, None, user="alice:secret", plain_http=True)
    assert containerd.image_digest(ref) == Images.tiny.digest


def test_ctr_pull_fails_when_unpack_fails(containerd, plain_registry, tmp_path):
    """ctr pull unpacks: an image whose layer does not match its config's diff_id fails the pull."""
    hosts = tmp_path / "hosts.d"
    write_hosts_toml(hosts, "docker.io", plain_registry.url)
    res = containerd.pull("docker.io/library/broken:v1", hosts, check=False)
    assert res.returncode != 0, res.stderr
    assert "diff" in res.stderr.lower() or "unpack" in res.stderr.lower(), res.stderr


def test_ctr_dead_mirror_falls_back_to_blackholed_hub(containerd, tmp_path):
    """A dead hosts.toml mirror makes ctr try the server (registry-1.docker.io), which fails at once on loopback."""
    hosts = tmp_path / "hosts.d"
    write_hosts_toml(hosts, "docker.io", f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    res = containerd.pull("docker.io/library/tiny:v1", hosts, check=False)
    dt = _timed("ctr pull via dead mirror (fails)", t0)
    assert res.returncode != 0 and dt < 20
    assert "trying next host" in res.stderr
    assert "registry-1.docker.io" in res.stderr


# -- skopeo --------------------------------------------------------------------------

def _dir_manifest_digest(d: Path) -> str:
    return daemons_sha256((d / "manifest.json").read_bytes())


def daemons_sha256(b: bytes) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(b).hexdigest()


def test_skopeo_version_runs():
    """skopeo runs inside the Hub-blackholing namespace wrapper."""
    assert "skopeo version" in skopeo("--version").stdout


def test_skopeo_copy_tls_verifies_with_cert_dir(tls_registry, tls, tmp_path):
    """skopeo copy from https verifies against --src-cert-dir: fails with the default trust store, succeeds with our CA."""
    src = f"docker://{tls_registry.host}/library/ocitiny:v1"
    res = skopeo_copy(src, f"dir:{tmp_path / 'bad'}", check=False)
    assert res.returncode != 0 and "x509" in res.stderr
    t0 = time.monotonic()
    skopeo_copy(src, f"dir:{tmp_path / 'out'}", cert_dir=tls.cert_dir)
    _timed("skopeo copy (oci, https+cert-dir)", t0)
    assert _dir_manifest_digest(tmp_path / "out") == Images.oci.digest


def test_skopeo_copy_via_registries_conf_mirror(plain_registry, tmp_path):
    """With a [[registry.mirror]] for docker.io, skopeo fetches docker.io/library/tiny from the mirror first (podman/CRI-O path)."""
    conf = write_registries_conf(tmp_path / "registries.conf", "docker.io", plain_registry.host,
                                 insecure=True)
    t0 = time.monotonic()
    res = skopeo_copy("docker://docker.io/library/tiny:v1", f"dir:{tmp_path / 'out'}",
                      registries_conf=conf)
    _timed("skopeo copy via registries.conf mirror (tiny, http)", t0)
    assert skopeo_accessed(res)[0] == f"{plain_registry.host}/library/tiny:v1"
    assert _dir_manifest_digest(tmp_path / "out") == Images.tiny.digest


def test_skopeo_dead_mirror_falls_back_to_blackholed_hub(tmp_path):
    """A dead registries.conf mirror makes skopeo try docker.io next, which fails fast on loopback."""
    conf = write_registries_conf(tmp_path / "registries.conf", "docker.io",
                                 f"127.0.0.1:{free_port()}", insecure=True)
    t0 = time.monotonic()
    res = skopeo_copy("docker://docker.io/library/tiny:v1", f"dir:{tmp_path / 'out'}",
                      registries_conf=conf, check=False)
    dt = _timed("skopeo copy via dead mirror (fails)", t0)
    assert res.returncode != 0 and dt < 20
    assert skopeo_accessed(res)[-1] == "docker.io/library/tiny:v1"


def test_skopeo_push_with_creds_and_preserved_digest(plain_registry, tls_registry, tls, tmp_path):
    """skopeo pushes (docker:// destination, --dest-creds accepted by an auth-less registry) preserving the manifest digest."""
    skopeo_copy(f"docker://{tls_registry.host}/library/ocitiny:v1", f"dir:{tmp_path / 'o'}",
                cert_dir=tls.cert_dir)
    t0 = time.monotonic()
    skopeo_copy(f"dir:{tmp_path / 'o'}", f"docker://{plain_registry.host}/skopeo/pushed:v1",
                tls_verify=False, dest_creds="alice:secret")
    _timed("skopeo push (oci, http)", t0)
    assert plain_registry.manifest_digest("skopeo/pushed", "v1") == Images.oci.digest


def test_skopeo_src_creds_basic_auth(auth_registry, tmp_path):
    """skopeo --src-creds authenticates; without creds the copy is refused."""
    src = f"docker://{auth_registry.host}/library/tiny:v1"
    res = skopeo_copy(src, f"dir:{tmp_path / 'x'}", tls_verify=False, check=False)
    assert res.returncode != 0 and "unauthorized" in res.stderr.lower()
    skopeo_copy(src, f"dir:{tmp_path / 'out'}", tls_verify=False, src_creds="alice:secret")
    assert _dir_manifest_digest(tmp_path / "out") == Images.tiny.digest


# -- podman -------------------------------------------------------------------------

@pytest.fixture
def podman(tmp_path):
    p = Podman(tmp_path / "podman")
    yield p
    p.close()


def test_podman_pull_tls_with_cert_dir(podman, tls_registry, tls):
    """Rootful podman with private vfs storage pulls from https, verifying with --cert-dir."""
    ref = f"{tls_registry.host}/library/tiny:v1"
    res = podman.pull(ref, check=False)
    assert res.returncode != 0 and "x509" in res.stderr
    t0 = time.monotonic()
    podman.pull(ref, cert_dir=tls.cert_dir, creds="alice:secret")
    _timed("podman pull (tiny, https+cert-dir)", t0)
    assert podman.image_digest(ref) == Images.tiny.digest


def test_podman_pull_via_registries_conf_mirror(podman, plain_registry, tmp_path):
    """podman honours a registries.conf mirror for docker.io (CONTAINERS_REGISTRIES_CONF)."""
    conf = write_registries_conf(tmp_path / "registries.conf", "docker.io", plain_registry.host,
                                 insecure=True)
    t0 = time.monotonic()
    res = podman.pull("docker.io/library/ocitiny:v1", registries_conf=conf)
    _timed("podman pull via registries.conf mirror (oci, http)", t0)
    assert f"{plain_registry.host}/library/ocitiny" in res.stderr
    assert podman.image_digest("docker.io/library/ocitiny:v1") == Images.oci.digest


def test_podman_pull_with_creds(podman, auth_registry):
    """podman pull --creds authenticates against a Basic-auth registry."""
    ref = f"{auth_registry.host}/library/ocitiny:v1"
    podman.pull(ref, tls_verify=False, creds="alice:secret")
    assert podman.image_digest(ref) == Images.oci.digest


def test_missing_binary_fails_loudly(tmp_path):
    """A missing client binary raises FileNotFoundError (tests fail, never skip)."""
    with pytest.raises(FileNotFoundError):
        Dockerd(tmp_path, dockerd="/nonexistent/dockerd")
    with pytest.raises(FileNotFoundError):
        skopeo("--version", binary="no-such-skopeo")


# -- pattern: server in the reactor, blocking client in a thread ---------------------

def _listen(site):
    from twisted.internet import reactor
    return reactor.listenTCP(0, site, interface="127.0.0.1")


@pytest_twisted.inlineCallbacks
def test_in_reactor_registry_serves_docker_pull_run_in_thread(tmp_path):
    """A registry running in the test's reactor serves a mirror pull driven via deferToThread (the pattern for in-process proxy tests)."""
    from twisted.internet import threads
    from twisted.web import server

    res = static_registry_resource({"library/tiny": {"v1": Images.tiny}})
    port = _listen(server.Site(res))
    d = Dockerd(tmp_path / "dockerd")
    try:
        yield threads.deferToThread(d.start, mirrors=[f"http://127.0.0.1:{port.getHost().port}"])
        t0 = time.monotonic()
        yield threads.deferToThread(d.pull, "tiny:v1")
        _timed("docker pull via in-reactor registry (tiny)", t0)
        digests = yield threads.deferToThread(d.repo_digests, "tiny:v1")
        assert digests == [f"tiny@{Images.tiny.digest}"]
        assert ("GET", f"/v2/library/tiny/manifests/{Images.tiny.digest}") in res.requests
    finally:
        yield threads.deferToThread(d.stop)
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_dockerd_strict_pull_rejects_deprecated_fallbacks(tmp_path):
    """Dockerd.pull raises SuspiciousPullError when dockerd had to fall back to pulling by tag (what a proxy mangling manifests causes); strict=False allows it."""
    from twisted.internet import threads
    from twisted.web import server

    port = _listen(server.Site(static_registry_resource(
        {"library/tiny": {"v1": Images.tiny}}, fail_manifest_by_digest=True)))
    d = Dockerd(tmp_path / "dockerd")
    try:
        yield threads.deferToThread(d.start, mirrors=[f"http://127.0.0.1:{port.getHost().port}"])
        with pytest.raises(SuspiciousPullError, match="resolved digest"):
            yield threads.deferToThread(d.pull, "tiny:v1")
        yield threads.deferToThread(d.rmi, "tiny:v1")
        r = yield threads.deferToThread(d.pull, "tiny:v1", strict=False)
        assert "Failed to pull manifest by the resolved digest" in r.stdout + r.stderr
    finally:
        yield threads.deferToThread(d.stop)
        yield port.stopListening()


def test_dockerd_start_failure_reports_log_tail(tmp_path):
    """A dockerd that cannot start raises DaemonStartError with the daemon's log tail, and leaves no socket dir behind."""
    d = Dockerd(tmp_path / "bad", extra_args=["--no-such-flag"], start_timeout=10)
    with pytest.raises(DaemonStartError, match="no-such-flag"):
        d.start()
    assert d.short is None and not d.running
