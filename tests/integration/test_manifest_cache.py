"""The manifest cache: by digest immutable, by tag revalidated with one HEAD, stale on trouble, rate-limit budget.

Two kinds of upstream: the Docker-Hub-like ``hub`` (its access log, read with a
sentinel request so no line is missed, is the witness of what the proxy asked),
and :class:`~tests.upstream.memory.MemoryRegistry`, a scriptable upstream that
can hang up, fail, stall, rate-limit or hold its HEADs at a chosen moment (its
own request record is the witness). Rules (``fresh``, ``stale_while_revalidate``,
``max_stale``) come from a TOML ``--config``.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.faults.hostile import wait_until
from tests.integration.http import Reply, request
from tests.integration.test_cache import MANIFEST_TYPES, anonymous
from tests.proxyproc import ProxyProcess
from tests.upstream import images as img
from tests.upstream.attestations import ATTESTATION_TYPE, seed_attested
from tests.upstream.hub import Hub
from tests.upstream.images import SeededImage
from tests.upstream.memory import MemoryRegistry

#: What docker sends, as six separate Accept headers.
DOCKER_ACCEPTS = [
    img.DOCKER_MANIFEST,
    img.DOCKER_LIST,
    img.OCI_MANIFEST,
    img.OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
]
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
WARNING = re.compile(r'^110 regproxy "Response is stale: (?P<why>.+)"$')


# -- a regproxy reading a TOML configuration -------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write_toml(path: Path, upstreams: Sequence[Mapping[str, Any]], **top: Any) -> Path:
    """A regproxy TOML file: top-level keys, then one ``[[upstream]]`` table per mapping."""
    lines = [f"{key} = {_toml(value)}" for key, value in top.items()]
    for upstream in upstreams:
        lines += ["", "[[upstream]]", *(f"{key} = {_toml(value)}" for key, value in upstream.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def toml_proxy(workdir: Path, toml: Path, args: Sequence[str] = ()) -> ProxyProcess:
    """A plain-HTTP regproxy (not started) reading ``--config toml`` (the file names the upstreams)."""
    return ProxyProcess(workdir, "", list(args), tls=False, config=toml)


def hub_upstream(hub: Hub, tags: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    table: dict[str, Any] = {
        "name": "docker.io",
        "url": hub.registry_url,
        "default": True,
        "library_prefix": True,
        "ca": [str(hub.ca_pem)],
    }
    if tags:
        table["tags"] = list(tags)
    return table


def memory_proxy(workdir: Path, up: MemoryRegistry, tags: Sequence[Mapping[str, Any]] = (), *args: str) -> ProxyProcess:
    """A caching regproxy (not started) whose only upstream is the memory registry, with these tag rules."""
    table: dict[str, Any] = {"name": "registry.memory.test", "url": up.url, "default": True}
    if tags:
        table["tags"] = list(tags)
    toml = write_toml(workdir / "regproxy.toml", [table])
    return toml_proxy(workdir, toml, ["--cache-dir", str(workdir / "cache"), *args])


# -- witnesses -------------------------------------------------------------------------


def manifest_requests(hub: Hub, since: int) -> list[tuple[str, str]]:
    """``(method, path)`` of the manifest requests the hub logged from index ``since``, once its log caught up.

    The registry writes a line after answering; a request of our own, sent after
    everything under test was answered, is waited for, so what came before it is
    in the log by then. The sentinel itself is left out.
    """
    sentinel = f"/v2/mcache-sentinel/manifests/{uuid.uuid4().hex}"
    hub.head(sentinel)
    hub.wait_registry_request("HEAD", sentinel, since=since)
    return [
        (e["method"], e["path"])
        for e in hub.registry_requests()[since:]
        if "/manifests/" in e["path"] and e["path"] != sentinel
    ]


def accept(*types: str, auth: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**(auth or {}), "Accept": ", ".join(types)}


def manifest_url(proxy: ProxyProcess, repository: str, reference: str) -> str:
    return f"{proxy.url}/v2/{repository}/manifests/{reference}"


def assert_manifest(reply: Reply, image: SeededImage, method: str = "GET") -> None:
    """Exactly the upstream's manifest: status, bytes, type, digest and length."""
    assert reply.status == 200, (reply.status, reply.body[:300])
    assert reply.header("Docker-Content-Digest") == image.digest
    assert reply.header("Content-Type") == image.media_type
    assert reply.header("Content-Length") == str(len(image.manifest))
    assert reply.body == (image.manifest if method == "GET" else b"")


def entries(index: SeededImage) -> list[SeededImage]:
    """An index's children in index order (images and attestations); an image alone for an image."""
    by_digest = {c.digest: c for c in index.platforms.values()}
    return [by_digest[d] for d in index.children] if index.is_index else []


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attested(hub: Hub) -> SeededImage:
    """The OCI index with attestation manifests (two platforms), pushed once per session."""
    return seed_attested(hub)


@pytest.fixture(scope="module")
def cached(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A caching regproxy in front of the Hub; ``mcache-fresh/**`` tags are fresh for 60 s, the rest revalidated."""
    work = tmp_path_factory.mktemp("manifest-cache")
    toml = write_toml(work / "regproxy.toml", [hub_upstream(hub, [{"repositories": ["mcache-fresh/**"], "fresh": 60}])])
    with toml_proxy(work, toml, ["--cache-dir", str(work / "cache")]) as proxy:
        yield proxy


@pytest.fixture
def memory() -> Iterator[MemoryRegistry]:
    with MemoryRegistry() as up:
        yield up


@pytest.fixture(params=["docker-manifest", "docker-list", "oci-index-attested"])
def image(request: pytest.FixtureRequest, hub: Hub, attested: SeededImage) -> SeededImage:
    """A Docker manifest, a Docker manifest list, or an OCI index with attestations."""
    if request.param == "docker-manifest":
        return hub.images["library/alpine:3.20"]
    if request.param == "docker-list":
        return hub.images["library/multi:latest"]
    return attested


def _push_image(hub: Hub, repository: str, tag: str, seed: str) -> SeededImage:
    return hub.push(img.make_image(repository, tag, seed=seed, platform=hub.platform, layer_sizes=(4096,)))


# -- against the hub -------------------------------------------------------------------


def test_second_round_costs_one_head_per_tag_and_nothing_by_digest(
    cached: ProxyProcess, hub: Hub, image: SeededImage
) -> None:
    """A tag and its children fetched twice: the second round asks the upstream one HEAD for the tag and nothing by digest."""
    auth = accept(MANIFEST_TYPES, auth=anonymous(cached))
    children = entries(image)
    if image.repository == "mcache/attested":
        assert [c.platform for c in children].count("unknown/unknown") == 2
        annotations = [m.get("annotations", {}) for m in json.loads(image.manifest)["manifests"]]
        assert [a.get("vnd.docker.reference.type") for a in annotations].count(ATTESTATION_TYPE) == 2

    def one_round() -> list[Reply]:
        got = [request("GET", manifest_url(cached, image.repository, image.tag), auth)]
        got += [request("GET", manifest_url(cached, image.repository, c.digest), auth) for c in children]
        return got

    first = one_round()
    for reply, expected in zip(first, [image, *children], strict=True):
        assert_manifest(reply, expected)
    mark = len(hub.registry_requests())
    second = one_round()
    for reply, expected in zip(second, [image, *children], strict=True):
        assert_manifest(reply, expected)
    seen = manifest_requests(hub, mark)
    print(f"\n[figures] {image.reference}: second round of {len(second)} GETs -> upstream {seen}")
    assert seen == [("HEAD", f"/v2/{image.repository}/manifests/{image.tag}")]
    assert second[0].header("Cache-Status") == "regproxy; hit; detail=revalidated"
    assert all(r.header("Cache-Status") == "regproxy; hit" for r in second[1:])
    mark = len(hub.registry_requests())
    again = request("GET", manifest_url(cached, image.repository, image.digest), auth)
    assert_manifest(again, image)
    assert manifest_requests(hub, mark) == []


def test_head_on_a_cached_manifest_has_its_length_and_digest(
    cached: ProxyProcess, hub: Hub, image: SeededImage
) -> None:
    """HEAD by tag and by digest of a cached manifest: exact Content-Length, Docker-Content-Digest and type, no body."""
    auth = accept(MANIFEST_TYPES, auth=anonymous(cached))
    assert_manifest(request("GET", manifest_url(cached, image.repository, image.tag), auth), image)
    for reference in (image.tag, image.digest):
        head = request("HEAD", manifest_url(cached, image.repository, reference), auth)
        assert_manifest(head, image, "HEAD")
        assert "hit" in (head.header("Cache-Status") or ""), head.header("Cache-Status")
    for child in entries(image):
        head = request("HEAD", manifest_url(cached, image.repository, child.digest), auth)
        assert_manifest(head, child, "HEAD")


def test_head_miss_by_digest_stores_the_body(cached: ProxyProcess, hub: Hub) -> None:
    """A cold HEAD by digest answers the right headers and stores the manifest: the GET after it is a hit, no upstream GET."""
    image = _push_image(hub, "mcache-head/app", "1", "mcache-head")
    auth = accept(MANIFEST_TYPES, auth=anonymous(cached))
    path = f"/v2/{image.repository}/manifests/{image.digest}"
    mark = len(hub.registry_requests())
    head = request("HEAD", cached.url + path, auth)
    assert_manifest(head, image, "HEAD")
    assert manifest_requests(hub, mark) == [("GET", path)]
    mark = len(hub.registry_requests())
    got = request("GET", cached.url + path, auth)
    assert_manifest(got, image)
    assert got.header("Cache-Status") == "regproxy; hit"
    assert ("GET", path) not in manifest_requests(hub, mark)


def test_second_request_by_digest_asks_the_upstream_nothing(cached: ProxyProcess, hub: Hub) -> None:
    """A manifest first fetched by digest (an index: no blob prefetch to learn the right) is served again without any upstream request."""
    children = [
        img.make_image("mcache-digest/app", "1", seed=f"mcache-digest/{p}", platform=p, layer_sizes=(4096,))
        for p in ("linux/amd64", "linux/arm64/v8")
    ]
    index = hub.push(img.make_index("mcache-digest/app", "1", children, oci=True))
    auth = accept(MANIFEST_TYPES, auth=anonymous(cached))
    path = f"/v2/{index.repository}/manifests/{index.digest}"
    assert_manifest(request("GET", cached.url + path, auth), index)
    mark = len(hub.registry_requests())
    again = request("GET", cached.url + path, auth)
    assert_manifest(again, index)
    assert again.header("Cache-Status") == "regproxy; hit"
    assert manifest_requests(hub, mark) == []




def relocated(image: SeededImage, repository: str) -> SeededImage:
    """The same image (same bytes, same digests) under another repository."""
    children = {key: replace(child, repository=repository) for key, child in image.platforms.items()}
    return replace(image, repository=repository, platforms=children)


def test_digest_shared_by_two_repositories_is_checked_once(cached: ProxyProcess, hub: Hub) -> None:
    """A manifest cached through one repository and asked by digest through another costs one upstream HEAD there, then nothing."""
    suffix = uuid.uuid4().hex[:8]
    first = _push_image(hub, f"mcache-shared/a{suffix}", "1", f"mcache-shared/{suffix}")
    second = hub.push(relocated(first, f"mcache-shared/b{suffix}"))
    assert second.digest == first.digest
    auth = accept(MANIFEST_TYPES, auth=anonymous(cached))
    assert_manifest(request("GET", manifest_url(cached, first.repository, first.tag), auth), first)
    url = manifest_url(cached, second.repository, second.digest)
    assert_manifest(request("GET", url, auth), second)
    mark = len(hub.registry_requests())
    for _ in range(2):
        again = request("GET", url, auth)
        assert_manifest(again, second)
        assert again.header("Cache-Status") == "regproxy; hit"
    assert manifest_requests(hub, mark) == []


def test_digest_shared_by_two_repositories_serves_with_the_upstream_down(
    memory: MemoryRegistry, tmp_path: Path
) -> None:
    """A manifest served by digest through a second repository is served there again, by digest, once the upstream is gone."""
    image = memory.add(_memory_image("team/a"))
    other = memory.add(relocated(image, "team/b"))
    with memory_proxy(tmp_path, memory) as proxy:
        assert_manifest(request("GET", manifest_url(proxy, image.repository, image.tag), accept(MANIFEST_TYPES)), image)
        url = manifest_url(proxy, other.repository, other.digest)
        assert_manifest(request("GET", url, accept(MANIFEST_TYPES)), other)
        memory.close()
        assert_manifest(
            request("GET", manifest_url(proxy, image.repository, image.digest), accept(MANIFEST_TYPES)), image
        )
        down = request("GET", url, accept(MANIFEST_TYPES))
        assert_manifest(down, other)


@pytest.mark.parametrize("repository", ["library/multi", "library/ociidx", "mcache/attested"])
def test_narrow_accept_never_gets_a_list_from_the_cache(
    cached: ProxyProcess, hub: Hub, attested: SeededImage, repository: str
) -> None:
    """With the tag's list/index cached, a client accepting only a Docker manifest gets that type or the upstream's own answer."""
    auth = anonymous(cached)
    index = attested if repository == "mcache/attested" else hub.images[f"{repository}:latest"]
    url = manifest_url(cached, repository, "latest")
    assert_manifest(request("GET", url, accept(MANIFEST_TYPES, auth=auth)), index)
    narrow = [img.DOCKER_MANIFEST, f"{img.DOCKER_MANIFEST}; q=0.9", f"  {img.DOCKER_MANIFEST} ,{img.DOCKER_MANIFEST}"]
    upstream = hub.get(f"/v2/{repository}/manifests/latest", {"Accept": img.DOCKER_MANIFEST})
    for method in ("GET", "HEAD", "GET", "HEAD"):
        for spelling in narrow:
            got = request(method, url, {**auth, "Accept": spelling})
            if got.status == 200:
                assert got.header("Content-Type") == img.DOCKER_MANIFEST, (method, spelling, got.header("Content-Type"))
                assert got.header("Docker-Content-Digest") != index.digest
            # Whatever it is, it is what the upstream answers this client.
            assert got.status == upstream.status, (method, spelling, got.status, got.body[:200])
            assert got.header("Docker-Content-Digest") == upstream.headers.get("Docker-Content-Digest")
            if method == "GET":
                assert got.body == upstream.body or upstream.status != 200
    # ... and the narrow answers did not replace the list for clients that take one.
    assert_manifest(request("GET", url, accept(MANIFEST_TYPES, auth=auth)), index)


def test_narrow_accept_gets_no_list_with_the_upstream_down(memory: MemoryRegistry, tmp_path: Path) -> None:
    """With an index cached for full-Accept clients and the upstream gone, a client accepting only a Docker manifest is refused, not given the index."""
    children = [
        img.make_image("team/multi", "1", seed=f"memory/multi/{p}", platform=p, layer_sizes=(2048,))
        for p in ("linux/amd64", "linux/arm64/v8")
    ]
    index = memory.add(img.make_index("team/multi", "1", children, oci=False))
    with memory_proxy(tmp_path, memory) as proxy:
        url = manifest_url(proxy, index.repository, index.tag)
        assert_manifest(request("GET", url, accept(MANIFEST_TYPES)), index)
        memory.close()
        assert_manifest(request("GET", url, accept(MANIFEST_TYPES)), index)
        for method in ("GET", "HEAD"):
            narrow = request(method, url, accept(img.DOCKER_MANIFEST))
            assert narrow.status == 502, (method, narrow.status, narrow.header("Content-Type"))
            assert narrow.header("Docker-Content-Digest") is None


def test_accept_spelling_is_one_key(cached: ProxyProcess, hub: Hub) -> None:
    """Six Accept headers and one comma-joined list of the same types share one cache entry (the second is a hit)."""
    image = hub.images["library/alpine:3.19"]
    auth = anonymous(cached)
    url = manifest_url(cached, image.repository, image.tag)
    six = [*auth.items(), *(("Accept", t) for t in DOCKER_ACCEPTS)]
    first = request("GET", url, six)
    assert_manifest(first, image)
    assert first.header("Cache-Status") == "regproxy; fwd=miss; stored"
    joined = request("GET", url, {**auth, "Accept": ",".join(reversed(DOCKER_ACCEPTS))})
    assert_manifest(joined, image)
    assert joined.header("Cache-Status") == "regproxy; hit; detail=revalidated"


def test_schema1_client_gets_the_upstreams_answer(cached: ProxyProcess, hub: Hub) -> None:
    """A client accepting only schema 1 gets what the upstream answers it (schema 1, the upstream's digest), cache or not."""
    upstream = hub.get("/v2/library/alpine/manifests/3.21", {"Accept": SCHEMA1})
    assert upstream.status == 200 and upstream.headers["Content-Type"] == SCHEMA1
    got = request("GET", manifest_url(cached, "library/alpine", "3.21"), accept(SCHEMA1, auth=anonymous(cached)))
    assert got.status == 200, (got.status, got.body)
    assert got.header("Content-Type") == SCHEMA1
    assert got.header("Docker-Content-Digest") == upstream.headers["Docker-Content-Digest"]


def test_moved_tag_is_served_with_its_new_digest(cached: ProxyProcess, hub: Hub) -> None:
    """A tag pushed anew upstream: the next GET and HEAD (after revalidation) give the new digest; the old digest still serves."""
    repository = f"mcache-moved/app{uuid.uuid4().hex[:8]}"
    old = _push_image(hub, repository, "latest", f"{repository}/1")
    auth = accept(MANIFEST_TYPES, auth=anonymous(cached))
    url = manifest_url(cached, repository, "latest")
    assert_manifest(request("GET", url, auth), old)
    assert_manifest(request("HEAD", url, auth), old, "HEAD")
    new = _push_image(hub, repository, "latest", f"{repository}/2")
    mark = len(hub.registry_requests())
    moved = request("GET", url, auth)
    assert_manifest(moved, new)
    print(f"\n[figures] GET of a moved tag -> upstream {manifest_requests(hub, mark)}")
    assert_manifest(request("HEAD", url, auth), new, "HEAD")
    assert_manifest(request("GET", manifest_url(cached, repository, old.digest), auth), old)
    # Moved again, and this time a HEAD asks first (containerd's way): HEAD, then GET by digest, then GET by tag.
    newer = _push_image(hub, repository, "latest", f"{repository}/3")
    assert_manifest(request("HEAD", url, auth), newer, "HEAD")
    assert_manifest(request("GET", manifest_url(cached, repository, newer.digest), auth), newer)
    assert_manifest(request("GET", url, auth), newer)


def test_fresh_window_asks_the_upstream_nothing(cached: ProxyProcess, hub: Hub) -> None:
    """Within a glob's fresh window, repeated GETs and HEADs of a tag make no upstream manifest request; outside it, one HEAD each."""
    fresh = _push_image(hub, "mcache-fresh/app", "1", "mcache-fresh")
    other = _push_image(hub, "mcache-stale/app", "1", "mcache-stale")
    auth = accept(MANIFEST_TYPES, auth=anonymous(cached))
    for image in (fresh, other):
        assert_manifest(request("GET", manifest_url(cached, image.repository, image.tag), auth), image)
    mark = len(hub.registry_requests())
    for method in ("GET", "HEAD", "GET", "HEAD", "GET"):
        got = request(method, manifest_url(cached, fresh.repository, fresh.tag), auth)
        assert_manifest(got, fresh, method)
        assert got.header("Cache-Status") == "regproxy; hit"
    assert manifest_requests(hub, mark) == []
    mark = len(hub.registry_requests())
    for method in ("GET", "HEAD"):
        assert_manifest(request(method, manifest_url(cached, other.repository, other.tag), auth), other, method)
    assert manifest_requests(hub, mark) == [("HEAD", f"/v2/{other.repository}/manifests/1")] * 2


# -- against a scriptable upstream -----------------------------------------------------


def _memory_image(repository: str, tag: str = "1") -> SeededImage:
    return img.make_image(repository, tag, seed=f"memory/{repository}/{tag}", layer_sizes=(2048,))


def test_stale_while_revalidate_answers_at_once_with_one_background_head(
    memory: MemoryRegistry, tmp_path: Path
) -> None:
    """In the stale-while-revalidate window, ten clients are answered while the one upstream HEAD is still held; a moved tag shows after it."""
    image = memory.add(_memory_image("team/swr"))
    with memory_proxy(tmp_path, memory, [{"repositories": ["team/**"], "stale_while_revalidate": 60}]) as proxy:
        url = manifest_url(proxy, image.repository, image.tag)
        assert_manifest(request("GET", url, accept(MANIFEST_TYPES)), image)
        memory.hold = threading.Event()
        mark = memory.mark()
        replies: list[Reply] = []
        lock = threading.Lock()

        def client(method: str) -> None:
            reply = request(method, url, accept(MANIFEST_TYPES))
            with lock:
                replies.append(reply)

        threads = [threading.Thread(target=client, args=("GET" if i % 3 else "HEAD",)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # Every client has its answer, and the revalidation is still held upstream.
        assert not memory.hold.is_set() and len(replies) == 10
        for reply in replies:
            assert reply.status == 200 and reply.header("Docker-Content-Digest") == image.digest
            assert reply.header("Cache-Status") == "regproxy; hit; fwd=stale; detail=revalidating"
        wait_until(lambda: memory.manifest_requests(mark), 10, what="the background HEAD")
        assert memory.manifest_requests(mark) == [("HEAD", "/v2/team/swr/manifests/1")]
        # The tag moves while the HEAD is held; the revalidation learns it, the next client gets the new manifest.
        moved = memory.add(_memory_image("team/swr", "moved"), tag=False)
        memory.manifests[("team/swr", "1")] = (moved.media_type, moved.manifest, moved.digest)
        memory.hold.set()
        memory.hold = None

        def revalidated() -> bool:
            got = request("GET", url, accept(MANIFEST_TYPES))
            return got.header("Docker-Content-Digest") == moved.digest and got.body == moved.manifest

        wait_until(revalidated, 10, what="the moved tag after revalidation")
        gets = [r for r in memory.manifest_requests() if r[0] == "GET" and r[1].endswith("/manifests/1")]
        print(
            f"\n[figures] stale-while-revalidate: 10 clients -> upstream {memory.manifest_requests(mark)[:1]} while held"
        )
        assert len(gets) == 2, gets  # the fill, and the moved tag's body


@pytest.mark.parametrize("trouble", ["hang-up", "error", "stall"])
def test_stale_on_trouble(memory: MemoryRegistry, tmp_path: Path, trouble: str) -> None:
    """When the upstream hangs up, answers 503 or stalls, a cached tag is served stale with Warning; uncached content fails clearly."""
    image = memory.add(_memory_image("team/app"))
    other = memory.add(_memory_image("team/other"))
    with memory_proxy(tmp_path, memory, (), "--response-timeout", "1") as proxy:
        url = manifest_url(proxy, image.repository, image.tag)
        assert_manifest(request("GET", url, accept(MANIFEST_TYPES)), image)
        memory.mode = trouble
        for method in ("GET", "HEAD"):
            stale = request(method, url, accept(MANIFEST_TYPES))
            assert_manifest(stale, image, method)
            status = stale.header("Cache-Status") or ""
            assert status.startswith("regproxy; hit; fwd=stale"), status
            if trouble == "error":
                assert status == "regproxy; hit; fwd=stale; fwd-status=503"
            warning = WARNING.match(stale.header("Warning") or "")
            assert warning, stale.header("Warning")
        by_digest = request("GET", manifest_url(proxy, image.repository, image.digest), accept(MANIFEST_TYPES))
        assert_manifest(by_digest, image)
        uncached = request("GET", manifest_url(proxy, other.repository, other.tag), accept(MANIFEST_TYPES))
        print(
            f"\n[figures] {trouble}: uncached -> {uncached.status} {uncached.body[:160]!r}; warning {warning['why']!r}"
        )
        assert uncached.status in (502, 503, 504), uncached.status
        error = json.loads(uncached.body)["errors"][0]
        assert error["code"] == "UNAVAILABLE" and error["message"], error
        assert "serving registry.memory.test/team/app stale" in proxy.log_text()
        assert "Traceback" not in proxy.log_text()


def test_stale_warning_says_what_happened_in_words(memory: MemoryRegistry, tmp_path: Path) -> None:
    """The Warning on a stale answer names the trouble in words a client can show, not an internal repr."""
    image = memory.add(_memory_image("team/app"))
    with memory_proxy(tmp_path, memory) as proxy:
        url = manifest_url(proxy, image.repository, image.tag)
        assert_manifest(request("GET", url, accept(MANIFEST_TYPES)), image)
        memory.mode = "hang-up"
        stale = request("GET", url, accept(MANIFEST_TYPES))
        assert_manifest(stale, image)
        warning = WARNING.match(stale.header("Warning") or "")
        assert warning, stale.header("Warning")
        assert "<" not in warning["why"] and "twisted." not in warning["why"], warning["why"]


def test_upstream_stopped_then_max_stale(memory: MemoryRegistry, tmp_path: Path) -> None:
    """Upstream gone: the cached tag is served stale until max_stale (2 s), then refused with a clear 503; its digest still serves."""
    image = memory.add(_memory_image("team/app"))
    other = memory.add(_memory_image("team/other"))
    with memory_proxy(tmp_path, memory, [{"repositories": ["**"], "max_stale": 2}]) as proxy:
        url = manifest_url(proxy, image.repository, image.tag)
        assert_manifest(request("GET", url, accept(MANIFEST_TYPES)), image)
        memory.close()
        stale = request("GET", url, accept(MANIFEST_TYPES))
        assert_manifest(stale, image)
        assert stale.header("Cache-Status") == "regproxy; hit; fwd=stale"
        assert "upstream unreachable" in (stale.header("Warning") or ""), stale.header("Warning")
        uncached = request("GET", manifest_url(proxy, other.repository, other.tag), accept(MANIFEST_TYPES))
        assert uncached.status in (502, 503), uncached.status
        assert "unreachable" in json.loads(uncached.body)["errors"][0]["message"]

        def expired() -> Reply | None:
            got = request("GET", url, accept(MANIFEST_TYPES))
            return got if got.status != 200 else None

        gone = wait_until(expired, 15, interval=0.2, what="max_stale to pass")
        error = json.loads(gone.body)["errors"][0]
        print(f"\n[figures] after max_stale: {gone.status} {error}")
        assert gone.status == 503 and error["code"] == "UNAVAILABLE"
        assert "nothing fresh enough is cached" in error["message"]
        assert request("HEAD", url, accept(MANIFEST_TYPES)).status == 503
        assert_manifest(
            request("GET", manifest_url(proxy, image.repository, image.digest), accept(MANIFEST_TYPES)), image
        )


def test_rate_limited_upstream(memory: MemoryRegistry, tmp_path: Path) -> None:
    """Upstream 429: cached tag served stale, budget logged, uncached content a 429 with Retry-After naming whose limit, no upstream GET spent."""
    image = memory.add(_memory_image("team/app"))
    other = memory.add(_memory_image("team/other"))
    memory.remaining = 10
    with memory_proxy(tmp_path, memory) as proxy:
        url = manifest_url(proxy, image.repository, image.tag)
        assert_manifest(request("GET", url, accept(MANIFEST_TYPES)), image)
        wait_until(lambda: "pulls left" in proxy.log_text(), 5, what="the low-budget warning")
        assert re.search(r"9 of 100 pulls left for proxy:anonymous \(window 21600s\)", proxy.log_text()), (
            proxy.log_text()[-2000:]
        )
        memory.mode = "limited"
        stale = request("GET", url, accept(MANIFEST_TYPES))
        assert_manifest(stale, image)
        assert stale.header("Cache-Status") == "regproxy; hit; fwd=stale; fwd-status=429"
        assert "upstream answered 429" in (stale.header("Warning") or "")
        assert_manifest(request("HEAD", url, accept(MANIFEST_TYPES)), image, "HEAD")
        wait_until(
            lambda: "rate limit reached for proxy:anonymous" in proxy.log_text(), 5, what="the rate-limit log line"
        )
        mark = memory.mark()
        for reference in (other.tag, other.digest):
            limited = request("GET", manifest_url(proxy, other.repository, reference), accept(MANIFEST_TYPES))
            assert limited.status == 429, (reference, limited.status, limited.body)
            retry = limited.header("Retry-After")
            assert retry is not None and 1 <= int(retry) <= 30, retry
            error = json.loads(limited.body)["errors"][0]
            assert error["code"] == "TOOMANYREQUESTS"
            assert "the proxy's (ratelimit-source 1.2.3.4) pulls" in error["message"], error
            print(f"\n[figures] uncached {reference[:20]} while limited: 429 Retry-After {retry}: {error['message']}")
        # The budget is known to be gone: no GET the upstream would only refuse.
        assert memory.manifest_requests(mark) == []
        # A client with credentials of its own is on its own budget, and is told so.
        own = request(
            "GET",
            manifest_url(proxy, other.repository, other.tag),
            {**accept(MANIFEST_TYPES), "Authorization": "Bearer client-own-token"},
        )
        assert own.status == 429 and own.header("Retry-After") == "30"
        assert "your (ratelimit-source 1.2.3.4) pulls" in json.loads(own.body)["errors"][0]["message"]
        assert "Traceback" not in proxy.log_text()
