"""Pulling through a real regproxy process from a real Docker-Hub-like upstream.

The upstream is the distribution registry with token auth and a CDN redirect
that rejects Authorization (tests/upstream); the proxy is `twist regproxy`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.http import basic, request, sha256_of, token
from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub
from tests.upstream.images import ALL_MANIFEST_TYPES, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX

DOCKER_ACCEPTS = [
    ("Accept", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
    ("Accept", "application/json"),
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", DOCKER_MANIFEST),
    ("Accept", DOCKER_LIST),
    ("Accept", OCI_INDEX),
]


def pull_token(proxy: ProxyProcess, hub: Hub, name: str, creds: tuple[str, str] | None = None) -> dict[str, str]:
    return {"Authorization": "Bearer " + token(proxy.url, [f"repository:{name}:pull"], hub.service, creds)}


def test_ping_challenge_rewritten(proxy: ProxyProcess, hub: Hub) -> None:
    """/v2/ answers 401 whose realm is the proxy's token endpoint, with the upstream's service."""
    r = request("GET", proxy.url + "/v2/")
    assert r.status == 401
    assert r.header("WWW-Authenticate") == f'Bearer realm="{proxy.url}/token",service="{hub.service}"'
    assert r.header("Docker-Distribution-API-Version") == "registry/2.0"


def test_challenge_over_tls_names_https_realm(proxy: ProxyProcess, hub: Hub) -> None:
    """Over the proxy's own TLS listener (certificate verified) the realm is https."""
    r = request("GET", proxy.tls_url + "/v2/", ca=proxy.ca_pem)
    assert r.status == 401
    assert f'realm="{proxy.tls_url}/token"' in (r.header("WWW-Authenticate") or "")


def test_manifest_scope_names_client_spelling(proxy: ProxyProcess) -> None:
    """A direct pull of 'alpine' with a refused token is challenged for repository:alpine, though upstream says library/alpine."""
    r = request("HEAD", proxy.url + "/v2/alpine/manifests/latest", {"Authorization": "Bearer not-a-token"})
    assert r.status == 401
    assert 'scope="repository:alpine:pull"' in (r.header("WWW-Authenticate") or "")


def test_anonymous_pull_of_private_repository_is_challenged(proxy: ProxyProcess) -> None:
    """An anonymous client reading a private repository gets the rewritten challenge (the proxy's token is refused)."""
    r = request("HEAD", proxy.url + "/v2/private/secret/manifests/latest")
    assert r.status == 401
    challenge = r.header("WWW-Authenticate") or ""
    assert f'realm="{proxy.url}/token"' in challenge and 'scope="repository:private/secret:pull"' in challenge


@pytest.mark.parametrize("name", ["library/alpine", "alpine"])
def test_manifest_byte_identical(proxy: ProxyProcess, hub: Hub, name: str) -> None:
    """Docker's six Accept headers; the manifest bytes, digest, type and length equal upstream's."""
    image = hub.images["library/alpine:latest"]
    r = request("GET", f"{proxy.url}/v2/{name}/manifests/latest", DOCKER_ACCEPTS + list(pull_token(proxy, hub, name).items()))
    assert r.status == 200
    assert r.body == image.manifest
    assert r.header("Docker-Content-Digest") == image.digest
    assert r.header("Content-Type") == image.media_type
    assert r.header("Content-Length") == str(len(image.manifest))


def test_head_manifest_exact(proxy: ProxyProcess, hub: Hub) -> None:
    """HEAD gives the digest and the real Content-Length (containerd resolves with HEAD)."""
    image = hub.images["library/alpine:latest"]
    r = request("HEAD", f"{proxy.url}/v2/library/alpine/manifests/latest",
                {"Accept": ALL_MANIFEST_TYPES, **pull_token(proxy, hub, "library/alpine")})
    assert r.status == 200 and r.body == b""
    assert r.header("Content-Length") == str(len(image.manifest))
    assert r.header("Docker-Content-Digest") == image.digest


@pytest.mark.parametrize("key", ["library/multi:latest", "library/ociidx:latest"])
def test_multiarch_index_identical(proxy: ProxyProcess, hub: Hub, key: str) -> None:
    """A Docker manifest list and an OCI index come back byte-identical, then a child by digest."""
    image = hub.images[key]
    auth = pull_token(proxy, hub, image.repository)
    r = request("GET", f"{proxy.url}/v2/{image.repository}/manifests/{image.tag}", {"Accept": ALL_MANIFEST_TYPES, **auth})
    assert r.status == 200 and r.body == image.manifest and r.header("Docker-Content-Digest") == image.digest
    child = image.children[0]
    r = request("GET", f"{proxy.url}/v2/{image.repository}/manifests/{child}", {"Accept": ALL_MANIFEST_TYPES, **auth})
    assert r.status == 200 and r.header("Docker-Content-Digest") == child


def test_blob_via_cdn_without_credentials(proxy: ProxyProcess, hub: Hub) -> None:
    """A blob GET follows the registry's 307 to the CDN server-side, without Authorization; digest matches."""
    image = hub.images["library/alpine:latest"]
    layer = image.layers[0]
    before = len(hub.cdn_log())
    reply, digest, size = sha256_of("GET", f"{proxy.url}/v2/alpine/blobs/{layer.digest}", pull_token(proxy, hub, "alpine"))
    assert reply.status == 200
    assert digest == layer.digest and size == layer.size
    new = hub.cdn_log()[before:]
    assert new, "the blob came through the CDN"
    assert all(not entry["authorization"] for entry in new)
    assert all(entry["status"] in (200, 206) for entry in new)


@pytest.mark.parametrize("rng", ["bytes=0-0", "bytes=100-1099", "bytes=1000-", "bytes=-500"])
def test_blob_ranges(proxy: ProxyProcess, hub: Hub, rng: str) -> None:
    """Range requests get 206 with Content-Range and exactly the requested bytes."""
    layer = hub.images["library/alpine:latest"].layers[0]
    auth = pull_token(proxy, hub, "alpine")
    full = request("GET", f"{proxy.url}/v2/alpine/blobs/{layer.digest}", auth).body
    r = request("GET", f"{proxy.url}/v2/alpine/blobs/{layer.digest}", {**auth, "Range": rng})
    assert r.status == 206
    spec = rng[6:]
    start_s, end_s = spec.split("-")
    if not start_s:
        start, end = len(full) - int(end_s), len(full) - 1
    else:
        start, end = int(start_s), int(end_s) if end_s else len(full) - 1
    assert r.body == full[start : end + 1]
    assert r.header("Content-Range") == f"bytes {start}-{end}/{len(full)}"


def test_head_blob(proxy: ProxyProcess, hub: Hub) -> None:
    """HEAD on a blob gives its size without a body."""
    layer = hub.images["library/alpine:latest"].layers[0]
    r = request("HEAD", f"{proxy.url}/v2/alpine/blobs/{layer.digest}", pull_token(proxy, hub, "alpine"))
    assert r.status == 200 and r.header("Content-Length") == str(layer.size) and r.body == b""


def test_private_repo_needs_credentials(proxy: ProxyProcess, hub: Hub) -> None:
    """Anonymous tokens can't read private/; alice's Basic credentials through /token can."""
    image = hub.images["private/secret:latest"]
    url = f"{proxy.url}/v2/private/secret/manifests/latest"
    anonymous = request("GET", url, {"Accept": ALL_MANIFEST_TYPES, **pull_token(proxy, hub, "private/secret")})
    assert anonymous.status == 401
    assert anonymous.error_code() in ("UNAUTHORIZED", "DENIED")
    alice = pull_token(proxy, hub, "private/secret", ("alice", hub.users["alice"]))
    r = request("GET", url, {"Accept": ALL_MANIFEST_TYPES, **alice})
    assert r.status == 200 and r.body == image.manifest


def test_wrong_password_is_401(proxy: ProxyProcess, hub: Hub) -> None:
    """The realm's 401 for bad credentials reaches the client unchanged."""
    r = request("GET", f"{proxy.url}/token?service={hub.service}&scope=repository:alpine:pull",
                {"Authorization": basic("alice", "wrong")})
    assert r.status == 401


def test_token_post_oauth2(proxy: ProxyProcess, hub: Hub) -> None:
    """The OAuth2 password grant (containerd with credentials) works through the proxy."""
    form = f"grant_type=password&service={hub.service}&client_id=test&username=alice&password={hub.users['alice']}&scope=repository%3Aprivate%2Fsecret%3Apull"
    r = request("POST", f"{proxy.url}/token", {"Content-Type": "application/x-www-form-urlencoded"}, form.encode())
    assert r.status == 200
    access = json.loads(r.body)["access_token"]
    m = request("HEAD", f"{proxy.url}/v2/private/secret/manifests/latest", {"Accept": ALL_MANIFEST_TYPES, "Authorization": f"Bearer {access}"})
    assert m.status == 200


def test_tags_list_query_forwarded(proxy: ProxyProcess, hub: Hub) -> None:
    """tags/list works with a query string forwarded, for the client's spelling of the name."""
    r = request("GET", f"{proxy.url}/v2/alpine/tags/list?n=100", pull_token(proxy, hub, "alpine"))
    assert r.status == 200
    body = r.json()
    assert isinstance(body, dict) and {"latest", "3.19", "3.20", "3.21"} <= set(body["tags"])


def test_catalog_paginates_with_link_to_proxy(proxy: ProxyProcess, hub: Hub) -> None:
    """_catalog passes through; its Link header points at the proxy."""
    auth = {"Authorization": "Bearer " + token(proxy.url, ["registry:catalog:*"], hub.service, ("admin", hub.users["admin"]))}
    r = request("GET", f"{proxy.url}/v2/_catalog?n=2", auth)
    assert r.status == 200
    link = r.header("Link")
    assert link is not None and link.startswith("</v2/_catalog?") or link.startswith(f"<{proxy.url}/v2/_catalog?")


def test_containerd_ns_param(proxy: ProxyProcess, hub: Hub) -> None:
    """?ns=docker.io is accepted (with the library prefix on); ?ns=other is a 404, never a dial."""
    auth = {"Accept": ALL_MANIFEST_TYPES, **pull_token(proxy, hub, "library/alpine")}
    assert request("HEAD", f"{proxy.url}/v2/library/alpine/manifests/latest?ns=docker.io", auth).status == 200
    assert request("HEAD", f"{proxy.url}/v2/library/alpine/manifests/latest?ns=ghcr.io", auth).status == 404


@pytest.mark.parametrize(
    "method, path, status, code",
    [
        ("GET", "/v2/Alpine/manifests/latest", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/alpine/blobs/sha256:1234", 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/alpine/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("PUT", "/v2/Alpine/manifests/latest", 400, "NAME_INVALID"),
        ("PUT", "/v2/alpine/manifests/bad..:tag", 400, "DIGEST_INVALID"),
        ("GET", "/v2/alpine/whatever", 404, "UNSUPPORTED"),
    ],
)
def test_bad_input(proxy: ProxyProcess, method: str, path: str, status: int, code: str) -> None:
    """Impossible reads are 404 as a registry answers; malformed writes and paths get precise OCI errors."""
    r = request(method, proxy.url + path, body=b"{}" if method == "PUT" else None)
    assert r.status == status and r.error_code() == code


def test_upstream_unreachable_502(tmp_path: Path) -> None:
    """With the upstream down, clients get a 502 OCI error, and the proxy keeps running."""
    from tests.proxyproc import free_port

    with ProxyProcess(tmp_path, f"http://127.0.0.1:{free_port()}", ["--no-library-prefix"], tls=False) as p:
        r = request("GET", p.url + "/v2/x/manifests/latest")
        assert r.status == 502 and r.error_code() == "UNAVAILABLE"
        assert request("GET", p.url + "/healthz").status == 200
        assert "Traceback" not in p.log_text()


def test_access_log_line(proxy: ProxyProcess) -> None:
    """Each request leaves one access-log line with method, path, status, bytes, duration and upstream status."""
    request("GET", proxy.url + "/v2/?marker=accesslog")
    lines = [line for line in proxy.log_text().splitlines() if "marker=accesslog" in line]
    assert len(lines) == 1
    assert '"GET /v2/?marker=accesslog" 401' in lines[0] and "upstream=401" in lines[0]


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()] if children.exists() else []


def test_workers_share_ports_and_stop_together(hub: Hub, tmp_path: Path) -> None:
    """--workers 2: a second process serves the same TCP and TLS ports, and goes away with the first."""
    import subprocess
    import time

    def listeners(port: int) -> str:
        return subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout

    with ProxyProcess(tmp_path, hub.registry_url, ["--upstream-ca", str(hub.ca_pem), "--library-prefix", "--workers", "2"]) as p:
        assert p.process is not None
        deadline = time.monotonic() + 30
        children: list[int] = []
        while time.monotonic() < deadline:
            children = _children(p.process.pid)
            if children and all(f"pid={children[0]}," in listeners(port) for port in (p.port, p.tls_port)):
                break
            time.sleep(0.1)
        (child,) = children
        for port in (p.port, p.tls_port):
            assert f"pid={p.process.pid}," in listeners(port) and f"pid={child}," in listeners(port), listeners(port)
        image = hub.images["library/alpine:latest"]
        auth = pull_token(p, hub, "alpine")
        for _ in range(20):  # new connections are spread over both processes
            assert request("GET", f"{p.url}/v2/alpine/manifests/latest", {"Accept": ALL_MANIFEST_TYPES, **auth}).body == image.manifest
            assert request("HEAD", f"{p.tls_url}/v2/alpine/manifests/latest", {"Accept": ALL_MANIFEST_TYPES, **auth}, ca=p.ca_pem).status == 200
    deadline = time.monotonic() + 20
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the worker outlived the first process"
