"""Pushing through a real regproxy process to a real Docker-Hub-like upstream.

The HTTP-level upload protocol as docker, skopeo and containerd speak it: POST,
chunked and Content-Range PATCHes, PUT ?digest=, manifest PUTs, cross-repository
mounts, upload status and cancellation, and what happens when things go wrong
(no credentials, size limit, an upstream that drops mid-upload). Every upload
goes to a new repository under C{pushtest/}: the hub is shared by the session.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.integration.http import basic, connect, request, token
from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub
from tests.upstream.images import DOCKER_MANIFEST, OCI_MANIFEST, make_image, random_bytes, random_stream

MIB = 1 << 20
GIB = 1 << 30
ALICE = ("alice", "wonderland")


# -- helpers --------------------------------------------------------------------


def new_repo(stem: str) -> str:
    """A repository name nobody has pushed to yet in this session."""
    return f"pushtest/{stem}-{uuid.uuid4().hex[:8]}"


def push_auth(proxy: ProxyProcess, hub: Hub, *scopes: str, url: str | None = None) -> dict[str, str]:
    """alice's bearer token from the proxy's /token for ``scopes``."""
    ca = proxy.ca_pem if url and url.startswith("https:") else None
    bearer = token(url or proxy.url, list(scopes), hub.service, ALICE, ca=ca)
    return {"Authorization": "Bearer " + bearer}


def repo_auth(proxy: ProxyProcess, hub: Hub, repo: str) -> dict[str, str]:
    return push_auth(proxy, hub, f"repository:{repo}:push,pull")


def send(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes | Iterable[bytes] | None = None,
    *,
    chunked: bool = False,
    ca: Path | None = None,
    timeout: float = 120,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request whose body may be an iterable (sent chunked, no Content-Length)."""
    conn = connect(url, ca, timeout=timeout)
    parts = urlsplit(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    hdrs = dict(headers or {})
    if chunked:
        assert "Content-Length" not in hdrs
        conn.request(method, target, body=body, headers=hdrs, encode_chunked=True)
    else:
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        conn.request(method, target, body=body, headers=hdrs)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, response.headers, data


def check_location(proxy_base: str, location: str | None, repo: str) -> str:
    """A Location must point at the proxy (absolute or relative); returns it absolute."""
    assert location, "no Location header"
    parts = urlsplit(location)
    if parts.scheme or parts.netloc:
        assert f"{parts.scheme}://{parts.netloc}" == proxy_base, f"Location {location!r} does not point at the proxy"
        absolute = location
    else:
        assert location.startswith("/v2/"), location
        absolute = proxy_base + location
    assert parts.path.startswith(f"/v2/{repo}/blobs/"), f"Location {location!r} names another repository than {repo}"
    return absolute


def assert_forwarded_exact(hub: Hub, method: str, url: str) -> None:
    """The upstream registry's access log shows C{method} on exactly this path and query (``_state`` byte-exact)."""
    parts = urlsplit(url)
    target = parts.path + "?" + parts.query
    deadline = time.monotonic() + 5
    while f'"{method} {target} HTTP/1.1"' not in hub.registry_log():
        assert time.monotonic() < deadline, f"upstream never saw {method} {target}"
        time.sleep(0.1)


def start_upload(proxy: ProxyProcess, repo: str, auth: dict[str, str], base: str | None = None) -> str:
    """POST /blobs/uploads/ → 202; returns the (absolute) upload URL, checked to point at the proxy."""
    base = base or proxy.url
    status, headers, body = send("POST", f"{base}/v2/{repo}/blobs/uploads/", auth)
    assert status == 202, body
    assert headers["Docker-Upload-UUID"]
    assert headers["Range"] == "0-0"
    location = check_location(base, headers["Location"], repo)
    state = parse_qs(urlsplit(location).query).get("_state")
    assert state and state[0], f"upload Location lost its _state: {location}"
    return location


def with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + "digest=" + digest


def finish_upload(location: str, digest: str, auth: dict[str, str], repo: str, base: str) -> None:
    status, headers, body = send("PUT", with_digest(location, digest), {**auth, "Content-Length": "0"})
    assert status == 201, body
    assert headers["Docker-Content-Digest"] == digest
    check_location(base, headers["Location"], repo)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob_via_proxy(proxy: ProxyProcess, repo: str, auth: dict[str, str], data: bytes) -> str:
    """Monolithic upload through the proxy (POST, then PUT ?digest= with the body)."""
    location = start_upload(proxy, repo, auth)
    digest = sha256(data)
    status, headers, body = send(
        "PUT", with_digest(location, digest), {**auth, "Content-Type": "application/octet-stream"}, data
    )
    assert status == 201, body
    return digest


# -- the upload protocol ---------------------------------------------------------


def test_chunked_patch_then_put(proxy: ProxyProcess, hub: Hub) -> None:
    """POST → PATCH with Transfer-Encoding: chunked → PUT ?digest=: 201, blob exact upstream."""
    repo = new_repo("chunked")
    auth = repo_auth(proxy, hub, repo)
    data = random_bytes("push-chunked", 5 * MIB + 123)
    location = start_upload(proxy, repo, auth)
    pieces = (data[i : i + 256 * 1024] for i in range(0, len(data), 256 * 1024))
    status, headers, body = send(
        "PATCH", location, {**auth, "Content-Type": "application/octet-stream"}, pieces, chunked=True
    )
    assert status == 202, body
    assert headers["Range"] == f"0-{len(data) - 1}"
    assert_forwarded_exact(hub, "PATCH", location)
    location = check_location(proxy.url, headers["Location"], repo)
    assert parse_qs(urlsplit(location).query)["_state"]
    finish_upload(location, sha256(data), auth, repo, proxy.url)
    assert hub.blob_digest(repo, sha256(data)) == sha256(data)
    assert f'"PATCH /v2/{repo}/blobs/uploads/' in proxy.log_text()


def test_monolithic_post_with_digest(proxy: ProxyProcess, hub: Hub) -> None:
    """POST ?digest= with the whole blob: the proxy answers as the upstream does (201, or 202 → PUT finishes it)."""
    repo = new_repo("mono")
    auth = repo_auth(proxy, hub, repo)
    data = random_bytes("push-mono", 3 * MIB + 7)
    digest = sha256(data)
    headers_in = {"Content-Type": "application/octet-stream"}
    status, headers, body = send(
        "POST", f"{proxy.url}/v2/{repo}/blobs/uploads/?digest={digest}", {**auth, **headers_in}, data
    )
    # The same request straight to the upstream (distribution 2.8 ignores ?digest= on POST: 202).
    direct_repo = new_repo("monodirect")
    direct_auth = {"Authorization": "Bearer " + hub.admin_token(f"repository:{direct_repo}:push,pull")}
    direct_status, _, _ = send(
        "POST", f"{hub.registry_url}/v2/{direct_repo}/blobs/uploads/?digest={digest}",
        {**direct_auth, **headers_in}, data, ca=hub.ca_pem,
    )
    assert status == direct_status, (status, direct_status, body)
    assert_forwarded_exact(hub, "POST", f"{proxy.url}/v2/{repo}/blobs/uploads/?digest={digest}")
    if status == 202:
        # OCI: a registry may not support monolithic POST; the client then PUTs the body.
        location = check_location(proxy.url, headers["Location"], repo)
        status, headers, body = send("PUT", with_digest(location, digest), {**auth, **headers_in}, data)
    assert status == 201, body
    assert headers["Docker-Content-Digest"] == digest
    check_location(proxy.url, headers["Location"], repo)
    assert hub.blob_digest(repo, digest) == digest


def test_content_range_chunks(proxy: ProxyProcess, hub: Hub) -> None:
    """Two PATCHes with Content-Range/Content-Length (OCI chunked upload), each 202 with the growing Range."""
    repo = new_repo("ranges")
    auth = repo_auth(proxy, hub, repo)
    data = random_bytes("push-ranges", 2 * MIB + 999)
    split = MIB + 17
    location = start_upload(proxy, repo, auth)
    for start, end in ((0, split), (split, len(data))):
        status, headers, body = send(
            "PATCH",
            location,
            {**auth, "Content-Type": "application/octet-stream", "Content-Range": f"{start}-{end - 1}"},
            data[start:end],
        )
        assert status == 202, body
        assert headers["Range"] == f"0-{end - 1}"
        location = check_location(proxy.url, headers["Location"], repo)
    finish_upload(location, sha256(data), auth, repo, proxy.url)
    assert hub.blob_digest(repo, sha256(data)) == sha256(data)


def test_upload_status_get(proxy: ProxyProcess, hub: Hub) -> None:
    """GET on an upload in progress: 204 with Range, Docker-Upload-UUID and a Location at the proxy."""
    repo = new_repo("status")
    auth = repo_auth(proxy, hub, repo)
    location = start_upload(proxy, repo, auth)
    data = random_bytes("push-status", 100_000)
    status, headers, _ = send("PATCH", location, auth, data)
    assert status == 202
    location = check_location(proxy.url, headers["Location"], repo)
    status, headers, body = send("GET", location, auth)
    assert status == 204, body
    assert headers["Range"] == f"0-{len(data) - 1}"
    assert headers["Docker-Upload-UUID"]
    check_location(proxy.url, headers["Location"], repo)


def test_delete_upload(proxy: ProxyProcess, hub: Hub) -> None:
    """DELETE cancels an upload (needs the delete action: admin): 204, then 404 BLOB_UPLOAD_UNKNOWN; alice gets a 401 challenge."""
    repo = new_repo("cancel")
    auth = repo_auth(proxy, hub, repo)
    location = start_upload(proxy, repo, auth)
    status, headers, body = send("DELETE", location, auth)
    assert status == 401, body  # alice may push but not delete
    challenge = headers["WWW-Authenticate"]
    assert f'realm="{proxy.url}/token"' in challenge and "delete" in challenge, challenge
    bearer = token(proxy.url, [f"repository:{repo}:push,pull,delete"], hub.service, ("admin", "admin"))
    admin = {"Authorization": f"Bearer {bearer}"}
    status, _, body = send("DELETE", location, admin)
    assert status == 204, body
    status, _, body = send("GET", location, admin)
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


@pytest.mark.parametrize("oci", [False, True], ids=["docker", "oci"])
def test_manifest_put_by_tag_and_digest(proxy: ProxyProcess, hub: Hub, oci: bool) -> None:
    """Manifest PUT by tag and by digest with its media type; upstream serves the same bytes by digest."""
    repo = new_repo("manifest")
    auth = repo_auth(proxy, hub, repo)
    image = make_image(repo, "1", seed=repo, platform=hub.platform, oci=oci)
    for blob in image.blobs():
        assert blob.data is not None
        assert push_blob_via_proxy(proxy, repo, auth, blob.data) == blob.digest
    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    assert image.media_type == media_type
    for reference in ("1", image.digest):
        status, headers, body = send(
            "PUT", f"{proxy.url}/v2/{repo}/manifests/{reference}", {**auth, "Content-Type": media_type}, image.manifest
        )
        assert status == 201, body
        assert headers["Docker-Content-Digest"] == image.digest
        location = headers["Location"]
        assert location
        parts = urlsplit(location)
        if parts.netloc:
            assert f"{parts.scheme}://{parts.netloc}" == proxy.url, location
        assert parts.path == f"/v2/{repo}/manifests/{image.digest}"
    upstream = hub.get(f"/v2/{repo}/manifests/{image.digest}", {"Accept": media_type})
    assert upstream.status == 200
    assert upstream.body == image.manifest
    assert upstream.headers["Content-Type"] == media_type
    by_tag = hub.get(f"/v2/{repo}/manifests/1", {"Accept": media_type})
    assert by_tag.headers["Docker-Content-Digest"] == image.digest
    # And back through the proxy, byte-identical.
    status, headers, body = send("GET", f"{proxy.url}/v2/{repo}/manifests/{image.digest}", {**auth, "Accept": media_type})
    assert status == 200 and body == image.manifest


# -- cross-repository mounts -----------------------------------------------------


def _mount(proxy: ProxyProcess, hub: Hub, from_name: str) -> tuple[str, int, http.client.HTTPMessage, bytes]:
    layer = hub.images["library/alpine:latest"].layers[0]
    repo = new_repo("mount")
    auth = push_auth(proxy, hub, f"repository:{repo}:push,pull", f"repository:{from_name}:pull")
    status, headers, body = send(
        "POST", f"{proxy.url}/v2/{repo}/blobs/uploads/?mount={layer.digest}&from={from_name}", auth
    )
    return repo, status, headers, body


def test_cross_repo_mount(proxy: ProxyProcess, hub: Hub) -> None:
    """POST ?mount=&from=library/alpine with a two-scope token → 201; both scopes reach the token server."""
    before = len(hub.token_log())
    layer = hub.images["library/alpine:latest"].layers[0]
    repo, status, headers, body = _mount(proxy, hub, "library/alpine")
    assert status == 201, body
    assert headers["Docker-Content-Digest"] == layer.digest
    location = check_location(proxy.url, headers["Location"], repo)
    assert urlsplit(location).path == f"/v2/{repo}/blobs/{layer.digest}"
    entries = hub.token_log()[before:]
    asked = [set(e["scopes_requested"]) for e in entries if e.get("username") == "alice"]
    assert {f"repository:{repo}:push,pull", "repository:library/alpine:pull"} in asked, entries
    assert hub.blob_digest(repo, layer.digest) == layer.digest


def test_cross_repo_mount_from_short_name(proxy: ProxyProcess, hub: Hub) -> None:
    """With the library/ prefix on, ``from=alpine`` (as docker sends for PROXY/alpine) mounts library/alpine: 201."""
    layer = hub.images["library/alpine:latest"].layers[0]
    repo, status, headers, body = _mount(proxy, hub, "alpine")
    assert status == 201, (
        f"mount from=alpine answered {status} {body[:300]!r}; proxy log tail:\n"
        + "\n".join(proxy.log_text().splitlines()[-5:])
    )
    assert headers["Docker-Content-Digest"] == layer.digest
    check_location(proxy.url, headers["Location"], repo)
    upstream_posts = [line for line in hub.registry_log().splitlines() if f'"POST /v2/{repo}/blobs/uploads/?' in line]
    assert upstream_posts and all("from=library/alpine" in line for line in upstream_posts), upstream_posts
    assert hub.blob_digest(repo, layer.digest) == layer.digest


# -- auth ------------------------------------------------------------------------


def test_push_without_credentials_is_challenged(proxy: ProxyProcess, hub: Hub) -> None:
    """An anonymous POST gets 401 with realm = the proxy's /token and a push scope for the client's name."""
    repo = new_repo("anon")
    status, headers, body = send("POST", f"{proxy.url}/v2/{repo}/blobs/uploads/")
    assert status == 401, body
    challenge = headers["WWW-Authenticate"]
    assert f'realm="{proxy.url}/token"' in challenge
    assert f'service="{hub.service}"' in challenge
    assert f"repository:{repo}:" in challenge and "push" in challenge, challenge
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"


def test_push_with_anonymous_token_is_denied(proxy: ProxyProcess, hub: Hub) -> None:
    """An anonymous token (the token server grants no push) gets 401 insufficient_scope, realm at the proxy."""
    repo = new_repo("anontoken")
    bearer = token(proxy.url, [f"repository:{repo}:push,pull"], hub.service)
    status, headers, body = send("POST", f"{proxy.url}/v2/{repo}/blobs/uploads/", {"Authorization": f"Bearer {bearer}"})
    assert status == 401, body
    challenge = headers["WWW-Authenticate"]
    assert f'realm="{proxy.url}/token"' in challenge
    assert 'error="insufficient_scope"' in challenge


def test_wrong_password_token_401(proxy: ProxyProcess, hub: Hub) -> None:
    """The proxy's /token passes the token server's 401 for a wrong password on."""
    r = request(
        "GET",
        f"{proxy.url}/token?service={hub.service}&scope=repository:pushtest/x:push,pull",
        {"Authorization": basic("alice", "wrong")},
    )
    assert r.status == 401


def test_push_over_proxy_tls(proxy: ProxyProcess, hub: Hub) -> None:
    """The whole chunked push over the proxy's TLS listener: Locations are https at the proxy."""
    repo = new_repo("tls")
    auth = push_auth(proxy, hub, f"repository:{repo}:push,pull", url=proxy.tls_url)
    data = random_bytes("push-tls", MIB + 5)
    status, headers, body = send("POST", f"{proxy.tls_url}/v2/{repo}/blobs/uploads/", auth, ca=proxy.ca_pem)
    assert status == 202, body
    location = check_location(proxy.tls_url, headers["Location"], repo)
    status, headers, body = send("PATCH", location, auth, iter([data]), chunked=True, ca=proxy.ca_pem)
    assert status == 202, body
    location = check_location(proxy.tls_url, headers["Location"], repo)
    status, headers, body = send("PUT", with_digest(location, sha256(data)), auth, b"", ca=proxy.ca_pem)
    assert status == 201, body
    assert hub.blob_digest(repo, sha256(data)) == sha256(data)


# -- limits and failures -------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_proxy(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with ProxyProcess(
        tmp_path_factory.mktemp("limited"),
        hub.registry_url,
        ["--upstream-ca", str(hub.ca_pem), "--library-prefix", "--max-upload-size", "1M"],
        tls=False,
    ) as started:
        yield started


def _assert_413(status: int, body: bytes) -> None:
    assert status == 413, body
    error = json.loads(body)["errors"][0]
    assert error["code"] == "SIZE_INVALID"
    assert error["message"]


def test_max_upload_size_content_length(limited_proxy: ProxyProcess, hub: Hub) -> None:
    """A PATCH whose Content-Length exceeds --max-upload-size gets 413 SIZE_INVALID as OCI error JSON."""
    repo = new_repo("limit")
    auth = repo_auth(limited_proxy, hub, repo)
    location = start_upload(limited_proxy, repo, auth)
    data = random_bytes("push-limit", 2 * MIB)
    try:
        status, headers, body = send("PATCH", location, auth, data)
    except (BrokenPipeError, ConnectionResetError) as e:  # pragma: no cover - would be a finding
        pytest.fail(f"proxy dropped the connection instead of answering 413: {e!r}")
    _assert_413(status, body)
    assert headers["Content-Type"].startswith("application/json")


def test_max_upload_size_chunked(limited_proxy: ProxyProcess, hub: Hub) -> None:
    """A chunked PATCH running past --max-upload-size gets 413 SIZE_INVALID; nothing is committed upstream."""
    repo = new_repo("limitchunked")
    auth = repo_auth(limited_proxy, hub, repo)
    location = start_upload(limited_proxy, repo, auth)
    data = random_bytes("push-limit-chunked", 3 * MIB)
    pieces = (data[i : i + 64 * 1024] for i in range(0, len(data), 64 * 1024))
    try:
        status, _, body = send("PATCH", location, auth, pieces, chunked=True)
    except (BrokenPipeError, ConnectionResetError) as e:
        pytest.fail(f"proxy dropped the connection instead of answering 413: {e!r}")
    _assert_413(status, body)
    assert hub.head(f"/v2/{repo}/blobs/{sha256(data)}").status == 404


def test_under_max_upload_size_passes(limited_proxy: ProxyProcess, hub: Hub) -> None:
    """Below the limit a chunked push still works through the limited proxy."""
    repo = new_repo("underlimit")
    auth = repo_auth(limited_proxy, hub, repo)
    data = random_bytes("push-underlimit", 512 * 1024)
    location = start_upload(limited_proxy, repo, auth)
    status, headers, body = send("PATCH", location, auth, iter([data]), chunked=True)
    assert status == 202, body
    location = check_location(limited_proxy.url, headers["Location"], repo)
    finish_upload(location, sha256(data), auth, repo, limited_proxy.url)
    assert hub.blob_digest(repo, sha256(data)) == sha256(data)


class DroppingUpstream(threading.Thread):
    """A fake upstream: reads the request head and ``keep`` body bytes, then closes the socket."""

    def __init__(self, keep: int) -> None:
        super().__init__(daemon=True)
        self.keep = keep
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.received: list[int] = []
        self.requests: list[bytes] = []

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    head, _, body = data.partition(b"\r\n\r\n")
                    self.requests.append(head)
                    got = len(body)
                    while got < self.keep:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        got += len(chunk)
                    self.received.append(got)
                except OSError:
                    pass
                # Reset rather than FIN: the upstream process died.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def close(self) -> None:
        self.server.close()


def test_upstream_drops_mid_upload(tmp_path: Path) -> None:
    """An upstream that vanishes after 1 MiB of a 32 MiB PATCH: the client sees an error or a drop, never 2xx."""
    fake = DroppingUpstream(keep=MIB)
    fake.start()
    try:
        with ProxyProcess(tmp_path / "proxy", f"http://127.0.0.1:{fake.port}", ["--library-prefix"], tls=False) as px:
            url = f"{px.url}/v2/pushtest/dropped/blobs/uploads/0a1b2c3d?_state=abc"
            pieces = random_stream("push-dropped", 32 * MIB, chunk=256 * 1024)
            started = time.monotonic()
            outcome: object
            try:
                status, _, body = send("PATCH", url, {"Authorization": "Bearer x"}, pieces, chunked=True, timeout=60)
                outcome = status
                assert not 200 <= status < 300, f"got {status} {body[:200]!r} for an upload the upstream never took"
                assert status >= 500, (status, body)
            except (ConnectionError, http.client.HTTPException, TimeoutError) as e:
                outcome = e
            elapsed = time.monotonic() - started
            print(f"client outcome: {outcome!r} after {elapsed:.2f}s; upstream got {fake.received} body bytes")
            assert not isinstance(outcome, TimeoutError), "the client waited for a timeout instead of getting an answer"
            assert fake.requests and fake.requests[0].startswith(b"PATCH /v2/pushtest/dropped/blobs/uploads/0a1b2c3d?_state=abc ")
            # The proxy survives and still answers.
            assert request("GET", px.url + "/healthz").status == 200
    finally:
        fake.close()


def test_upstream_drops_mid_upload_content_length(tmp_path: Path) -> None:
    """Same with a Content-Length PATCH (the body is streamed, not buffered first): never 2xx."""
    fake = DroppingUpstream(keep=MIB)
    fake.start()
    try:
        with ProxyProcess(tmp_path / "proxy", f"http://127.0.0.1:{fake.port}", ["--library-prefix"], tls=False) as px:
            data = random_bytes("push-dropped-cl", 16 * MIB)
            try:
                status, _, body = send("PATCH", f"{px.url}/v2/pushtest/dropped/blobs/uploads/abc", {}, data, timeout=60)
                assert not 200 <= status < 300, f"got {status} {body[:200]!r}"
                assert status >= 500, (status, body)
            except (ConnectionError, http.client.HTTPException, TimeoutError):
                pass
            assert fake.received and fake.received[0] < 16 * MIB
            assert request("GET", px.url + "/healthz").status == 200
    finally:
        fake.close()


def test_upstream_drop_mid_upload_is_502(tmp_path: Path) -> None:
    """A client that can still read gets 502 UNAVAILABLE (upstream's fault), not 500 "internal proxy error"."""
    fake = DroppingUpstream(keep=MIB)
    fake.start()
    try:
        with ProxyProcess(tmp_path / "proxy", f"http://127.0.0.1:{fake.port}", ["--library-prefix"], tls=False) as px:
            with socket.create_connection(("127.0.0.1", px.port), timeout=30) as sock:
                sock.sendall(
                    b"PATCH /v2/pushtest/dropped/blobs/uploads/abc?_state=x HTTP/1.1\r\n"
                    + f"Host: {px.host}\r\nContent-Length: {16 * MIB}\r\n\r\n".encode()
                )
                sock.sendall(random_bytes("push-drop-502", 2 * MIB))  # then stop sending, and listen
                answer = b""
                while b"\r\n\r\n" not in answer or len(answer) < 2000:
                    try:
                        chunk = sock.recv(65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            status_line = head.split(b"\r\n", 1)[0]
            log_lines = [line for line in px.log_text().splitlines() if "PATCH" in line]
            assert status_line, f"no answer at all; proxy log: {log_lines}"
            assert status_line.split()[1] == b"502", (status_line, body[:300], log_lines)
            assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        fake.close()


# -- a 1 GiB blob --------------------------------------------------------------------


class ProcSampler(threading.Thread):
    """Every 100 ms: the proxy's RSS, and the largest regular file it holds open (temp-file spooling)."""

    def __init__(self, proxy: ProxyProcess) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        assert proxy.process is not None
        self.pid = proxy.process.pid
        self.baseline = proxy.rss_kib()
        self.peak = self.baseline
        self.samples = 0
        self.biggest_file = 0
        self.biggest_file_name = ""
        self._cpu_start = self._cpu()
        self.cpu_seconds = 0.0
        self._stop_event = threading.Event()

    def _cpu(self) -> float:
        """User + system CPU seconds the proxy process has used so far."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _files(self) -> None:
        fd_dir = f"/proc/{self.pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
                if not target.startswith("/"):
                    continue  # socket:[..], pipe:[..], anon_inode:...
                size = os.stat(f"{fd_dir}/{fd}").st_size
            except OSError:
                continue
            if size > self.biggest_file:
                self.biggest_file, self.biggest_file_name = size, target

    def run(self) -> None:
        while not self._stop_event.wait(0.1):
            try:
                self.peak = max(self.peak, self.proxy.rss_kib())
            except (OSError, RuntimeError):
                pass
            self._files()
            self.samples += 1

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.cpu_seconds = self._cpu() - self._cpu_start
        return self.peak


class Hashing:
    """Wraps a chunk iterator, hashing what passes."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.sha = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.sha.update(chunk)
            self.size += len(chunk)
            yield chunk

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def _push_big(base: str, repo: str, auth: dict[str, str], seed: str, ca: Path | None) -> tuple[float, str, str]:
    """POST, one chunked 1 GiB PATCH, PUT ?digest=; returns (seconds, digest, final Location)."""
    started = time.monotonic()
    status, headers, body = send("POST", f"{base}/v2/{repo}/blobs/uploads/", auth, ca=ca)
    assert status == 202, body
    location = headers["Location"]
    if location.startswith("/"):
        location = base + location
    stream = Hashing(random_stream(seed, GIB, chunk=MIB))
    status, headers, body = send(
        "PATCH", location, {**auth, "Content-Type": "application/octet-stream"}, stream, chunked=True, ca=ca, timeout=600
    )
    assert status == 202, body
    assert headers["Range"] == f"0-{GIB - 1}"
    location = headers["Location"]
    if location.startswith("/"):
        location = base + location
    status, headers, body = send("PUT", with_digest(location, stream.digest), auth, b"", ca=ca, timeout=600)
    assert status == 201, body
    return time.monotonic() - started, stream.digest, headers["Location"]


def test_1gib_chunked_push_streams(proxy: ProxyProcess, hub: Hub) -> None:
    """A 1 GiB chunked PATCH through the proxy: RSS growth < 100 MiB, no temp-file spooling, digest exact upstream."""
    repo = new_repo("big")
    auth = repo_auth(proxy, hub, repo)
    sampler = ProcSampler(proxy)
    sampler.start()
    try:
        via_proxy, digest, location = _push_big(proxy.url, repo, auth, "push-1gib", None)
    finally:
        peak = sampler.stop()
    check_location(proxy.url, location, repo)
    growth_mib = (peak - sampler.baseline) / 1024
    assert sampler.samples > 10
    assert hub.blob_digest(repo, digest) == digest

    direct_repo = new_repo("bigdirect")
    direct_auth = {"Authorization": "Bearer " + hub.admin_token(f"repository:{direct_repo}:push,pull")}
    direct, direct_digest, _ = _push_big(hub.registry_url, direct_repo, direct_auth, "push-1gib", hub.ca_pem)
    assert direct_digest == digest
    print(
        f"\n1 GiB chunked blob push: via proxy {via_proxy:.1f} s ({GIB / MIB / via_proxy:.0f} MiB/s), "
        f"direct to upstream {direct:.1f} s ({GIB / MIB / direct:.0f} MiB/s); proxy RSS baseline "
        f"{sampler.baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, growth {growth_mib:.1f} MiB; "
        f"proxy CPU {sampler.cpu_seconds:.1f} s; largest file the proxy held open: {sampler.biggest_file} bytes {sampler.biggest_file_name!r}"
    )
    assert growth_mib < 100
    assert sampler.biggest_file < 8 * MIB, f"proxy spooled the upload to {sampler.biggest_file_name}"
