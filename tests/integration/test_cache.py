"""The pull-through blob cache against the real Docker-Hub-like upstream (registry, token server, CDN).

Each test states the behaviour it pins; the CDN's access log is the witness of
how many times a blob was fetched upstream.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.http import Reply, request, sha256_of
from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub

MIB = 1 << 20


@pytest.fixture(scope="module")
def cached(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """regproxy with a cache directory in front of the Hub stand-in."""
    work = tmp_path_factory.mktemp("cached")
    with ProxyProcess(
        work, hub.registry_url, ["--upstream-ca", str(hub.ca_pem), "--library-prefix", "--cache-dir", str(work / "cache")],
        tls=False,
    ) as proxy:
        yield proxy


def blob_gets(hub: Hub, digest: str, since: int = 0) -> list[dict[str, object]]:
    """The CDN's GETs of a blob (the registry redirects every blob GET there)."""
    hexpart = digest.split(":")[1]
    return [e for e in hub.cdn_log()[since:] if e["method"] == "GET" and hexpart in str(e["uri"])]


def anonymous(proxy: ProxyProcess) -> dict[str, str]:
    """An anonymous client's token: the proxy's own, straight from the proxy."""
    reply = request("GET", proxy.url + "/token?scope=repository:library/alpine:pull")
    return {"Authorization": "Bearer " + json.loads(reply.body)["token"]}


def test_second_pull_of_a_blob_is_a_hit(cached: ProxyProcess, hub: Hub) -> None:
    """The first GET of a layer fetches it upstream once (stored); the next one is a hit, bytes identical."""
    image = hub.images["library/alpine:3.19"]
    layer = image.layers[0]
    mark = len(hub.cdn_log())
    auth = anonymous(cached)
    url = f"{cached.url}/v2/library/alpine/blobs/{layer.digest}"
    first, digest1, size1 = sha256_of("GET", url, auth)
    assert first.status == 200 and digest1 == layer.digest and size1 == layer.size
    assert first.header("Cache-Status") == "regproxy; fwd=miss; stored"
    second, digest2, _ = sha256_of("GET", url, auth)
    assert second.status == 200 and digest2 == layer.digest
    assert second.header("Cache-Status") == "regproxy; hit"
    assert second.header("Docker-Content-Digest") == layer.digest and second.header("Content-Length") == str(layer.size)
    assert len(blob_gets(hub, layer.digest, mark)) == 1


def test_range_on_a_hit(cached: ProxyProcess, hub: Hub) -> None:
    """A Range on a cached blob is a 206 with the right Content-Range and exactly those bytes."""
    layer = hub.images["library/alpine:3.19"].layers[0]
    auth = anonymous(cached)
    url = f"{cached.url}/v2/library/alpine/blobs/{layer.digest}"
    whole = request("GET", url, auth)
    assert whole.status == 200
    part = request("GET", url, {**auth, "Range": "bytes=10-99"})
    assert part.status == 206 and part.body == whole.body[10:100]
    assert part.header("Content-Range") == f"bytes 10-99/{len(whole.body)}"
    assert part.header("Cache-Status") == "regproxy; hit"
    outside = request("GET", url, {**auth, "Range": f"bytes={len(whole.body)}-"})
    assert outside.status == 416 and outside.header("Content-Range") == f"bytes */{len(whole.body)}"


def test_head_on_a_hit(cached: ProxyProcess, hub: Hub) -> None:
    """HEAD of a cached blob carries its real length and digest, no body."""
    layer = hub.images["library/alpine:3.19"].layers[0]
    auth = anonymous(cached)
    url = f"{cached.url}/v2/library/alpine/blobs/{layer.digest}"
    request("GET", url, auth)
    head = request("HEAD", url, auth)
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Length") == str(layer.size) and head.header("Docker-Content-Digest") == layer.digest
    assert head.header("Cache-Status") == "regproxy; hit"


def test_private_blob_not_served_through_a_public_repository(cached: ProxyProcess, hub: Hub) -> None:
    """A digest cached through a private repository is not served to an anonymous client asking through another one."""
    secret = hub.images["private/secret:latest"].layers[0]
    alice = ("alice", "wonderland")
    from tests.integration.http import token

    private_auth = {"Authorization": "Bearer " + token(cached.url, ["repository:private/secret:pull"], hub.service, alice)}
    got = request("GET", f"{cached.url}/v2/private/secret/blobs/{secret.digest}", private_auth)
    assert got.status == 200 and got.header("Cache-Status") == "regproxy; fwd=miss; stored"
    # An anonymous client who knows the digest, through a public repository: the upstream says no, so does the proxy.
    peek = request("GET", f"{cached.url}/v2/library/alpine/blobs/{secret.digest}", anonymous(cached))
    assert peek.status != 200 and hashlib.sha256(peek.body).hexdigest() != secret.digest.split(":")[1]
    assert "hit" not in (peek.header("Cache-Status") or "")
    # ... and directly through the private repository, anonymously: refused too.
    peek = request("GET", f"{cached.url}/v2/private/secret/blobs/{secret.digest}", anonymous(cached))
    assert peek.status == 401
    # A logged-in client is served from the cache.
    again = request("GET", f"{cached.url}/v2/private/secret/blobs/{secret.digest}", private_auth)
    assert again.status == 200 and again.header("Cache-Status") == "regproxy; hit"


def test_concurrent_cold_clients_share_one_fill(cached: ProxyProcess, hub: Hub) -> None:
    """Eight clients of one cold blob at once (two with Range): one upstream GET, every body right."""
    image = hub.images["library/multi:latest"]
    child = next(iter(image.platforms.values()))
    layer = child.layers[0]
    mark = len(hub.cdn_log())
    auth = anonymous(cached)
    url = f"{cached.url}/v2/library/multi/blobs/{layer.digest}"
    results: list[tuple[Reply, str, int]] = []
    lock = threading.Lock()

    def pull(headers: dict[str, str]) -> None:
        got = sha256_of("GET", url, headers)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=pull, args=({**auth},)) for _ in range(6)]
    threads += [threading.Thread(target=pull, args=({**auth, "Range": "bytes=5-"},)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    full = [r for r in results if r[0].status == 200]
    ranged = [r for r in results if r[0].status == 206]
    assert len(full) == 6 and len(ranged) == 2
    assert all(digest == layer.digest for _, digest, _ in full)
    assert all(size == layer.size - 5 for _, _, size in ranged)
    assert len(blob_gets(hub, layer.digest, mark)) == 1


def test_cache_survives_restart(hub: Hub, tmp_path: Path) -> None:
    """A blob cached before a restart is a hit after it."""
    layer = hub.images["library/alpine:3.20"].layers[0]
    args = ["--upstream-ca", str(hub.ca_pem), "--library-prefix", "--cache-dir", str(tmp_path / "cache")]
    with ProxyProcess(tmp_path / "a", hub.registry_url, args, tls=False) as proxy:
        url = f"{proxy.url}/v2/library/alpine/blobs/{layer.digest}"
        assert request("GET", url, anonymous(proxy)).header("Cache-Status") == "regproxy; fwd=miss; stored"
        deadline = time.monotonic() + 10
        while not list((tmp_path / "cache" / "blobs").rglob(layer.digest.split(":")[1])) and time.monotonic() < deadline:
            time.sleep(0.05)
    mark = len(hub.cdn_log())
    with ProxyProcess(tmp_path / "b", hub.registry_url, args, tls=False) as proxy:
        url = f"{proxy.url}/v2/library/alpine/blobs/{layer.digest}"
        reply, digest, _ = sha256_of("GET", url, anonymous(proxy))
        assert reply.header("Cache-Status") == "regproxy; hit" and digest == layer.digest
    assert blob_gets(hub, layer.digest, mark) == []


MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)


def test_tag_is_revalidated_with_head_and_digest_served_from_cache(cached: ProxyProcess, hub: Hub) -> None:
    """A second GET of a tag costs the upstream one HEAD; a GET by digest costs nothing; bytes and headers exact."""
    image = hub.images["library/alpine:3.21"]
    auth = {**anonymous(cached), "Accept": MANIFEST_TYPES}
    url = f"{cached.url}/v2/library/alpine/manifests/3.21"
    first = request("GET", url, auth)
    assert first.status == 200 and first.body == image.manifest
    assert first.header("Cache-Status") == "regproxy; fwd=miss; stored"
    mark = len(hub.registry_requests())
    second = request("GET", url, auth)
    assert second.status == 200 and second.body == image.manifest
    assert second.header("Docker-Content-Digest") == image.digest and second.header("Content-Type") == image.media_type
    assert second.header("Cache-Status") == "regproxy; hit; detail=revalidated"
    by_digest = request("GET", f"{cached.url}/v2/library/alpine/manifests/{image.digest}", auth)
    assert by_digest.status == 200 and by_digest.body == image.manifest and "hit" in (by_digest.header("Cache-Status") or "")
    head = request("HEAD", f"{cached.url}/v2/library/alpine/manifests/{image.digest}", auth)
    assert head.header("Content-Length") == str(len(image.manifest)) and head.header("Docker-Content-Digest") == image.digest
    time.sleep(1.2)  # the registry writes its access-log line after answering
    seen = [(r["method"], r["path"]) for r in hub.registry_requests()[mark:] if "/manifests/" in str(r["path"])]
    assert seen == [("HEAD", "/v2/library/alpine/manifests/3.21")], seen


def test_delete_through_the_proxy_stops_cache_hits(cached: ProxyProcess, hub: Hub) -> None:
    """A blob deleted through the proxy is no longer served from the cache through that repository: the upstream's 404."""
    from tests.integration.http import token
    from tests.upstream import images as img

    image = hub.push(img.make_image("scratch/deleted", "1", seed="scratch/deleted", platform=hub.platform))
    layer = image.layers[0]
    admin = {"Authorization": "Bearer " + token(cached.url, ["repository:scratch/deleted:pull,push,delete"], hub.service, ("admin", "admin"))}
    url = f"{cached.url}/v2/scratch/deleted/blobs/{layer.digest}"
    assert request("GET", url, admin).status == 200
    assert request("GET", url, admin).header("Cache-Status") == "regproxy; hit"
    assert request("DELETE", url, admin).status == 202
    again = request("GET", url, admin)
    assert again.status == 404 and "hit" not in (again.header("Cache-Status") or "")
