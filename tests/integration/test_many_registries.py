"""Many registries through one ``twist regproxy --config FILE``, over plain HTTP.

The proxy (``many_proxy``) serves three real upstreams: the Docker-Hub-like ``hub``
as ``docker.io`` (default, ``library/`` rule), the ghcr.io-like registry as
``ghcr.io`` (own token server; also selected by ``Host: ghcr.mirror.test``) and
the company registry (no auth) as ``registry.corp.test`` with allow/deny rules.
What each upstream saw is read from its own access log and token-server log, so
"nothing dialled" is asserted where it happens, not inferred from the answer.
Two more proxies: one in front of a scripted hostile upstream (foreign token
realm, ``Link``/``Location`` spelling), one using a server-side Hub account.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from tests.faults.hostile import HostileServer, Respond, Sink, bearer, challenge, ok
from tests.integration.http import Reply, basic, request
from tests.manyconfig import CORP, GHCR_HOST, config_proxy, hub_upstream, tokens_since
from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub, Registry
from tests.upstream.images import ALL_MANIFEST_TYPES, DOCKER_MANIFEST
from tests.upstream.registries import CompanyRegistry, GhcrRegistry

ACCEPT = {"Accept": ALL_MANIFEST_TYPES}


def get(proxy: ProxyProcess, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
    return request(method, proxy.url + path, {**ACCEPT, **(headers or {})})


def error(reply: Reply) -> tuple[int, str, str]:
    """Status, OCI code and message of an error answer (fails if the body is not OCI error JSON)."""
    entry = json.loads(reply.body)["errors"][0]
    return reply.status, entry["code"], entry["message"]


def challenge_params(reply: Reply) -> dict[str, str]:
    """The auth-params of the answer's Bearer challenge."""
    value = reply.header("WWW-Authenticate") or ""
    scheme, _, rest = value.partition(" ")
    assert scheme == "Bearer", value
    params = {}
    for item in rest.split('",'):
        key, _, val = item.partition("=")
        params[key.strip()] = val.strip().strip('"')
    return params


def settle(registry: Registry, proxy: ProxyProcess) -> None:
    """Send one request through the proxy that must reach ``registry`` and wait until it logged it.

    Whatever the proxy forwarded before is in the registry's log by then, so a
    check for "no such request" after this is not racing the log writer.
    """
    since = len(registry.registry_requests())
    if isinstance(registry, GhcrRegistry):
        get(proxy, "/v2/ghcr.io/owner/img/manifests/1")
        registry.wait_registry_request("GET", "/v2/owner/img/manifests/1", since=since)
    elif isinstance(registry, CompanyRegistry):
        get(proxy, f"/v2/{CORP}/team/app/manifests/1.0")
        registry.wait_registry_request("GET", "/v2/team/app/manifests/1.0", since=since)
    else:
        get(proxy, "/v2/library/alpine/manifests/latest")
        registry.wait_registry_request("GET", "/v2/library/alpine/manifests/latest", since=since)


def paths_since(registry: Registry, since: int) -> list[str]:
    return [e["path"] for e in registry.registry_requests()[since:]]


@pytest.fixture
def marks(hub: Hub, ghcr: GhcrRegistry, company: CompanyRegistry) -> dict[str, int]:
    """Lengths of every upstream's request log and token log before the test."""
    return {
        "hub": len(hub.registry_requests()),
        "ghcr": len(ghcr.registry_requests()),
        "company": len(company.registry_requests()),
        "hub_tokens": len(hub.token_log()),
        "ghcr_tokens": len(ghcr.token_log()),
    }


# -- selection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, headers",
    [
        ("/v2/ghcr.io/owner/img/manifests/1", {}),
        ("/v2/owner/img/manifests/1", {"Host": GHCR_HOST}),
        ("/v2/owner/img/manifests/1?ns=ghcr.io", {}),
        ("/v2/ghcr.io/owner/img/manifests/1?ns=ghcr.io", {}),
    ],
    ids=["path-prefix", "host", "ns", "path-and-ns"],
)
def test_each_selector_reaches_the_second_registry(
    many_proxy: ProxyProcess, hub: Hub, ghcr: GhcrRegistry, marks: dict[str, int], path: str, headers: dict[str, str]
) -> None:
    """Path prefix, Host header and ?ns= each serve ghcr.io's owner/img:1 byte for byte, from ghcr and never the default."""
    image = ghcr.images["owner/img:1"]
    if "Host" in headers:
        headers = {"Host": f"{headers['Host']}:{many_proxy.port}"}
    r = get(many_proxy, path, headers)
    assert r.status == 200, r.body
    assert r.body == image.manifest
    assert r.header("Docker-Content-Digest") == image.digest
    ghcr.wait_registry_request("GET", "/v2/owner/img/manifests/1", since=marks["ghcr"])
    settle(hub, many_proxy)
    assert not [p for p in paths_since(hub, marks["hub"]) if "owner/img" in p]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/library/alpine/manifests/3.21",
        "/v2/alpine/manifests/3.21",
        "/v2/docker.io/library/alpine/manifests/3.21",
        "/v2/docker.io/alpine/manifests/3.21",
        "/v2/registry-1.docker.io/library/alpine/manifests/3.21",
        "/v2/library/alpine/manifests/3.21?ns=docker.io",
    ],
)
def test_default_upstream_and_its_aliases(many_proxy: ProxyProcess, hub: Hub, marks: dict[str, int], path: str) -> None:
    """No prefix, the docker.io prefix, the registry-1.docker.io alias and ?ns=docker.io all reach the Hub as library/alpine."""
    image = hub.images["library/alpine:3.21"]
    r = get(many_proxy, path)
    assert r.status == 200, r.body
    assert r.body == image.manifest
    hub.wait_registry_request("GET", "/v2/library/alpine/manifests/3.21", since=marks["hub"])


@pytest.mark.parametrize("path", [f"/v2/{CORP}/team/app/manifests/1.0", "/v2/team/app/manifests/1.0?ns=" + CORP])
def test_company_registry_by_prefix_and_ns(
    many_proxy: ProxyProcess, company: CompanyRegistry, marks: dict[str, int], path: str
) -> None:
    """The auth-less company registry is reached by its path prefix and by ?ns=, with its exact Docker manifest."""
    image = company.images["team/app:1.0"]
    r = get(many_proxy, path, {"Accept": DOCKER_MANIFEST})
    assert r.status == 200, r.body
    assert (r.body, r.header("Docker-Content-Digest")) == (image.manifest, image.digest)
    company.wait_registry_request("GET", "/v2/team/app/manifests/1.0", since=marks["company"])


def test_blobs_follow_the_selection(many_proxy: ProxyProcess, ghcr: GhcrRegistry, company: CompanyRegistry) -> None:
    """Blob GETs under a prefix come from that registry: every layer's bytes hash to its digest."""
    for registry, prefix, key in ((ghcr, "ghcr.io", "owner/tool:latest"), (company, CORP, "team/base:2")):
        image = registry.images[key]
        repo = key.partition(":")[0]
        for blob in image.layers:
            r = get(many_proxy, f"/v2/{prefix}/{repo}/blobs/{blob.digest}")
            assert r.status == 200, (prefix, r.status, r.body[:200])
            assert "sha256:" + hashlib.sha256(r.body).hexdigest() == blob.digest


# -- spellings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, host, realm_path, scope",
    [
        ("/v2/ghcr.io/owner/img/manifests/1", None, "/token/ghcr.io", "repository:ghcr.io/owner/img:pull"),
        ("/v2/owner/img/manifests/1?ns=ghcr.io", None, "/token/ghcr.io", "repository:owner/img:pull"),
        ("/v2/owner/img/manifests/1", GHCR_HOST, "/token", "repository:owner/img:pull"),
        ("/v2/alpine/manifests/latest", None, "/token", "repository:alpine:pull"),
        ("/v2/docker.io/alpine/manifests/latest", None, "/token", "repository:docker.io/alpine:pull"),
    ],
    ids=["ghcr-prefix", "ghcr-ns", "ghcr-host", "hub-short", "hub-prefix-short"],
)
def test_challenge_names_the_client_spelling(
    many_proxy: ProxyProcess, hub: Hub, ghcr: GhcrRegistry, path: str, host: str | None, realm_path: str, scope: str
) -> None:
    """A refused client token is challenged with the proxy's realm for that upstream, its service, and the scope as the client spelled it."""
    headers = {"Authorization": "Bearer not-a-token"}
    base = many_proxy.url
    if host is not None:
        headers["Host"] = f"{host}:{many_proxy.port}"
        base = f"http://{host}:{many_proxy.port}"
    r = get(many_proxy, path, headers)
    assert r.status == 401, r.body
    params = challenge_params(r)
    assert params["realm"] == base + realm_path
    assert params["service"] == (ghcr.service if "ghcr" in path or host else hub.service)
    assert params["scope"] == scope


def test_ping_challenge_per_selector(many_proxy: ProxyProcess, hub: Hub, ghcr: GhcrRegistry) -> None:
    """/v2/ is the default's challenge (realm /token); with Host ghcr.mirror.test or ?ns=ghcr.io it is ghcr's (its realm, its service)."""
    r = get(many_proxy, "/v2/")
    assert r.status == 401
    assert challenge_params(r) == {"realm": many_proxy.url + "/token", "service": hub.service}
    host = f"{GHCR_HOST}:{many_proxy.port}"
    r = get(many_proxy, "/v2/", {"Host": host})
    assert challenge_params(r) == {"realm": f"http://{host}/token", "service": ghcr.service}
    r = get(many_proxy, "/v2/?ns=ghcr.io")
    assert challenge_params(r) == {"realm": many_proxy.url + "/token/ghcr.io", "service": ghcr.service}


def test_push_through_prefix_keeps_prefixed_locations(
    many_proxy: ProxyProcess, company: CompanyRegistry, marks: dict[str, int]
) -> None:
    """A push to registry.corp.test/team/pushed: every Location names the proxy and the prefixed name; the upstream stores team/pushed."""
    layer = b"many registries layer\n" * 100
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    repo = f"{CORP}/team/pushed"
    prefix = f"{many_proxy.url}/v2/{repo}/"
    digests = []
    for data in (layer, config):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        started = request("POST", f"{many_proxy.url}/v2/{repo}/blobs/uploads/")
        assert started.status == 202, started.body
        location = started.header("Location") or ""
        assert location.startswith(prefix + "blobs/uploads/"), location
        sep = "&" if "?" in location else "?"
        done = request("PUT", f"{location}{sep}digest={digest}", {"Content-Type": "application/octet-stream"}, data)
        assert done.status == 201, done.body
        assert done.header("Location") == f"{prefix}blobs/{digest}"
        digests.append((digest, len(data)))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": digests[1][1],
                "digest": digests[1][0],
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": digests[0][1],
                    "digest": digests[0][0],
                }
            ],
        }
    ).encode()
    put = request("PUT", f"{many_proxy.url}/v2/{repo}/manifests/1", {"Content-Type": DOCKER_MANIFEST}, manifest)
    assert put.status == 201, put.body
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert put.header("Location") == f"{prefix}manifests/{manifest_digest}"
    direct = company.get("/v2/team/pushed/manifests/1", {"Accept": DOCKER_MANIFEST})
    assert direct.status == 200 and direct.body == manifest
    assert all(not p.startswith(f"/v2/{CORP}") for p in paths_since(company, marks["company"]))


# -- the token endpoint --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, host",
    [
        ("/token/ghcr.io?service=ghcr.test&scope=repository:ghcr.io/owner/img:pull", None),
        ("/token?service=registry.test&scope=repository:ghcr.io/owner/img:pull", None),
        ("/token?service=ghcr.test&scope=repository:owner/img:pull", GHCR_HOST),
        ("/token?service=registry.test&scope=repository:library/alpine:pull", None),
        ("/token/registry.corp.test?scope=repository:registry.corp.test/team/app:pull", None),
    ],
    ids=["ghcr-suffix", "ghcr-scope-prefix", "ghcr-host", "hub", "company"],
)
def test_anonymous_pull_token_is_the_proxys_own(
    many_proxy: ProxyProcess, hub: Hub, ghcr: GhcrRegistry, marks: dict[str, int], path: str, host: str | None
) -> None:
    """A token request without credentials for pull only gets the proxy's own token at once; no token server is asked."""
    headers = {"Host": f"{host}:{many_proxy.port}"} if host else {}
    r = request("GET", many_proxy.url + path, headers)
    assert r.status == 200, r.body
    document = r.json()
    assert isinstance(document, dict)
    assert document["token"].startswith("regproxy-anonymous.")
    assert document["access_token"] == document["token"]
    assert tokens_since(hub, marks["hub_tokens"]) == []
    assert tokens_since(ghcr, marks["ghcr_tokens"]) == []


def test_basic_token_request_forwarded_to_selected_realm(
    many_proxy: ProxyProcess, hub: Hub, ghcr: GhcrRegistry, marks: dict[str, int]
) -> None:
    """GET /token with Basic alice and a ghcr.io-prefixed scope goes to ghcr's token server, scope renamed, ghcr's service; the token then reads private/secret."""
    query = urlencode([("service", hub.service), ("scope", "repository:ghcr.io/private/secret:pull"), ("account", "alice")])
    r = request("GET", f"{many_proxy.url}/token?{query}", {"Authorization": basic("alice", "wonderland")})
    assert r.status == 200, r.body
    token = r.json()["token"]  # type: ignore[index]
    seen = tokens_since(ghcr, marks["ghcr_tokens"])
    assert [(e["method"], e["username"], e["scopes_requested"]) for e in seen] == [
        ("GET", "alice", ["repository:private/secret:pull"])
    ]
    assert seen[0]["query"]["service"] == [ghcr.service]
    assert seen[0]["query"]["account"] == ["alice"]
    assert tokens_since(hub, marks["hub_tokens"]) == []
    image = ghcr.images["private/secret:latest"]
    m = get(many_proxy, "/v2/ghcr.io/private/secret/manifests/latest", {"Authorization": f"Bearer {token}"})
    assert m.status == 200 and m.body == image.manifest


def test_oauth_post_forwarded_with_renamed_scope_and_service(
    many_proxy: ProxyProcess, ghcr: GhcrRegistry, marks: dict[str, int]
) -> None:
    """An OAuth2 password POST to /token/ghcr.io reaches ghcr's realm: scope without the prefix, ghcr's service, other registries' scopes dropped."""
    form = urlencode(
        [
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", "wonderland"),
            ("service", "registry.test"),
            ("client_id", "regproxy-tests"),
            ("scope", "repository:ghcr.io/owner/img:pull,push"),
            ("scope", f"repository:{CORP}/team/app:pull"),
        ]
    ).encode()
    r = request(
        "POST", many_proxy.url + "/token/ghcr.io", {"Content-Type": "application/x-www-form-urlencoded"}, form
    )
    assert r.status == 200, r.body
    assert r.json()["access_token"]  # type: ignore[index]
    seen = tokens_since(ghcr, marks["ghcr_tokens"])
    assert len(seen) == 1, seen
    entry = seen[0]
    assert (entry["method"], entry["username"]) == ("POST", "alice")
    assert entry["form"]["service"] == [ghcr.service]
    assert entry["form"]["scope"] == ["repository:owner/img:pull,push"]
    assert entry["form"]["client_id"] == ["regproxy-tests"]
    assert entry["scopes_granted"] == ["repository:owner/img:pull,push"]


def test_proxy_token_fetched_once_per_scope(
    many_proxy: ProxyProcess, ghcr: GhcrRegistry, marks: dict[str, int]
) -> None:
    """Anonymous reads (manifest GET/HEAD, every blob, three rounds) cost ghcr's token server at most one anonymous request for the scope, then none."""
    image = ghcr.images["owner/tool:latest"]
    paths = [("GET", "/v2/ghcr.io/owner/tool/manifests/latest"), ("HEAD", "/v2/ghcr.io/owner/tool/manifests/latest")]
    paths += [("GET", f"/v2/ghcr.io/owner/tool/blobs/{b.digest}") for b in image.blobs()]

    def read_all() -> None:
        for method, path in paths:
            r = get(many_proxy, path, method=method)
            assert r.status == 200, (path, r.status, r.body[:200])

    read_all()
    registry_mark = len(ghcr.registry_requests())
    first = [e for e in tokens_since(ghcr, marks["ghcr_tokens"]) if "owner/tool" in json.dumps(e)]
    assert len(first) <= 1, first
    assert all(e["username"] is None and not e["authorization"] for e in first), first
    mark = len(ghcr.token_log())
    for _ in range(3):
        read_all()
    assert tokens_since(ghcr, mark) == []
    # once the token is held, every request upstream carries it (none is challenged)
    served = [e for e in ghcr.registry_requests()[registry_mark:] if "owner/tool" in e["path"]]
    assert served and all(e["status"] == 200 for e in served), served


def test_refused_scope_does_not_refetch_the_proxy_token(
    many_proxy: ProxyProcess, ghcr: GhcrRegistry, marks: dict[str, int]
) -> None:
    """Five anonymous reads of ghcr's private/secret (refused upstream): all 401, at most one token request for the scope (a fresh refused token is not refetched)."""
    for _ in range(5):
        assert get(many_proxy, "/v2/ghcr.io/private/secret/manifests/latest").status == 401
    seen = [e for e in tokens_since(ghcr, marks["ghcr_tokens"]) if "private/secret" in json.dumps(e)]
    print(f"[tokens] 5 anonymous reads of a refused repository: {len(seen)} token request(s)")
    assert len(seen) <= 1, [(e["username"], e["scopes_granted"]) for e in seen]


# -- refusals: nothing dialled -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, host",
    [
        ("GET", "/v2/quay.io/x/manifests/1", None),
        ("HEAD", "/v2/quay.io/x/y/blobs/sha256:" + "0" * 64, None),
        ("POST", "/v2/quay.io/x/blobs/uploads/", None),
        ("GET", "/v2/x/manifests/1?ns=quay.io", None),
        ("GET", "/v2/x/manifests/1?ns=quay.io", GHCR_HOST),
        ("GET", "/v2/localhost/x/manifests/1", None),
        ("GET", "/v2/?ns=quay.io", None),
        ("GET", "/token/quay.io?scope=repository:x:pull", None),
        ("GET", "/token?scope=repository:quay.io/x:pull", None),
    ],
)
def test_unknown_registry_is_404_and_not_dialled(
    many_proxy: ProxyProcess,
    hub: Hub,
    ghcr: GhcrRegistry,
    company: CompanyRegistry,
    marks: dict[str, int],
    method: str,
    path: str,
    host: str | None,
) -> None:
    """A registry name the config doesn't list is a 404 NAME_UNKNOWN naming what is served; no upstream sees the request."""
    headers = {"Host": f"{host}:{many_proxy.port}"} if host else {}
    r = request(method, many_proxy.url + path, headers)
    assert r.status == 404
    if method != "HEAD":
        status, code, message = error(r)
        assert code == "NAME_UNKNOWN"
        assert "docker.io (default), ghcr.io, registry.corp.test" in message, message
    for registry, key in ((hub, "hub"), (ghcr, "ghcr"), (company, "company")):
        settle(registry, many_proxy)
        leaked = [p for p in paths_since(registry, marks[key]) if "/x/" in p or p.endswith("/x") or "quay" in p]
        assert not leaked, (registry.label, leaked)
    assert tokens_since(hub, marks["hub_tokens"]) == [] and tokens_since(ghcr, marks["ghcr_tokens"]) == []


@pytest.mark.parametrize(
    "path, host, names",
    [
        ("/v2/ghcr.io/owner/img/manifests/1?ns=docker.io", None, ("docker.io", "ghcr.io")),
        ("/v2/owner/img/manifests/1?ns=docker.io", GHCR_HOST, ("docker.io", "ghcr.io")),
        (f"/v2/{CORP}/team/app/manifests/1.0?ns=ghcr.io", None, ("ghcr.io", CORP)),
        ("/v2/docker.io/library/alpine/manifests/latest?ns=registry-1.docker.io", None, None),
    ],
    ids=["path-vs-ns", "host-vs-ns", "corp-vs-ns", "alias-agrees"],
)
def test_ns_naming_another_upstream_is_refused(
    many_proxy: ProxyProcess,
    hub: Hub,
    ghcr: GhcrRegistry,
    company: CompanyRegistry,
    marks: dict[str, int],
    path: str,
    host: str | None,
    names: tuple[str, str] | None,
) -> None:
    """?ns= naming a different upstream than the path prefix or Host is a 400 DENIED naming both, and nothing is dialled (an alias of the same upstream is fine)."""
    headers = {"Host": f"{host}:{many_proxy.port}"} if host else {}
    r = get(many_proxy, path, headers)
    if names is None:
        assert r.status == 200, r.body
        return
    status, code, message = error(r)
    assert (status, code) == (400, "DENIED")
    assert all(repr(n) in message for n in names), message
    for registry in (hub, ghcr, company):
        settle(registry, many_proxy)
    # each registry saw its settle request once, and nothing of the refused one
    assert ghcr.registry_request_counts(marks["ghcr"])[("GET", "/v2/owner/img/manifests/1")] == 1
    assert hub.registry_request_counts(marks["hub"])[("GET", "/v2/library/alpine/manifests/latest")] == 1
    assert company.registry_request_counts(marks["company"])[("GET", "/v2/team/app/manifests/1.0")] == 1
    assert not [p for p in paths_since(hub, marks["hub"]) + paths_since(company, marks["company"]) if "owner/img" in p]
    assert not [p for p in paths_since(hub, marks["hub"]) + paths_since(ghcr, marks["ghcr"]) if "team/app" in p]


def test_token_suffix_conflicting_with_host_is_refused(many_proxy: ProxyProcess, hub: Hub, ghcr: GhcrRegistry, marks: dict[str, int]) -> None:
    """/token/docker.io asked through Host ghcr.mirror.test is a 400 DENIED; neither token server is asked, even with credentials."""
    r = request(
        "GET",
        many_proxy.url + "/token/docker.io?scope=repository:library/alpine:pull",
        {"Host": f"{GHCR_HOST}:{many_proxy.port}", "Authorization": basic("alice", "wonderland")},
    )
    assert error(r)[:2] == (400, "DENIED")
    assert tokens_since(hub, marks["hub_tokens"]) == [] and tokens_since(ghcr, marks["ghcr_tokens"]) == []


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", f"/v2/{CORP}/team/secret-x/manifests/1"),
        ("HEAD", f"/v2/{CORP}/team/secret/manifests/latest"),
        ("GET", f"/v2/{CORP}/team/secretive/blobs/sha256:" + "1" * 64),
        ("GET", f"/v2/{CORP}/team/secret-x/tags/list"),
        ("POST", f"/v2/{CORP}/team/secret-x/blobs/uploads/"),
        ("PUT", f"/v2/{CORP}/team/secret-x/manifests/1"),
        ("GET", f"/v2/{CORP}/other/app/manifests/1.0"),
        ("GET", "/v2/team/secret-x/manifests/1?ns=" + CORP),
    ],
)
def test_denied_repository_is_403_and_not_dialled(
    many_proxy: ProxyProcess, company: CompanyRegistry, marks: dict[str, int], method: str, path: str
) -> None:
    """A repository matching deny (team/secret*) or outside allow (team/**) is a 403 DENIED for every method; the company registry never sees it."""
    body = b"{}" if method == "PUT" else None
    r = request(method, many_proxy.url + path, {"Content-Type": DOCKER_MANIFEST} if body else {}, body)
    assert r.status == 403
    if method != "HEAD":
        status, code, message = error(r)
        assert code == "DENIED" and f"{CORP}/" in message, message
    settle(company, many_proxy)
    assert not [p for p in paths_since(company, marks["company"]) if "secret" in p or "/other/" in p]


# -- a hostile upstream: foreign realm, Link and Location -------------------------------------------------


@pytest.fixture(scope="module")
def hostile_rig(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, HostileServer, Sink]]:
    """regproxy serving the Hub (default) and a scripted upstream "hostile.test" whose challenges name a realm on another host (the Sink)."""
    with Sink() as sink, HostileServer() as up:
        realm = f"http://localhost:{sink.port}/token"
        refused = challenge(bearer(realm, service="hostile.test", scope="repository:evil:pull"))
        up.route(None, r"/v2/", refused)
        up.route(None, r"/v2/evil/.*", refused)
        up.route(
            "GET",
            r"/v2/links/tags/list",
            ok(
                b'{"name":"links","tags":["a"]}',
                headers=[
                    ("Content-Type", "application/json"),
                    ("Link", f'<{up.url}/v2/links/tags/list?last=a&n=1>; rel="next"'),
                ],
            ),
        )
        up.route(
            "POST",
            r"/v2/links/blobs/uploads/",
            Respond(status=202, headers=[("Location", f"{up.url}/v2/links/blobs/uploads/u-1?_state=s%2B1")]),
        )
        upstreams = [hub_upstream(hub), {"name": "hostile.test", "url": up.url}]
        with config_proxy(tmp_path_factory.mktemp("hostile-proxy"), upstreams) as proxy:
            yield proxy, up, sink


def test_realm_outside_the_config_is_never_contacted(hostile_rig: tuple[ProxyProcess, HostileServer, Sink]) -> None:
    """An upstream naming a token realm on another host: anonymous reads get the proxy's challenge, a credentialed token request a 502 UNAVAILABLE, and the realm is never dialled."""
    proxy, up, sink = hostile_rig
    r = get(proxy, "/v2/hostile.test/evil/manifests/1")
    assert r.status == 401
    params = challenge_params(r)
    assert params["realm"] == proxy.url + "/token/hostile.test"
    assert params["scope"] == "repository:hostile.test/evil:pull"
    assert f"localhost:{sink.port}" not in (r.header("WWW-Authenticate") or "")
    r = request(
        "GET",
        proxy.url + "/token/hostile.test?scope=repository:hostile.test/evil:pull",
        {"Authorization": basic("alice", "wonderland")},
    )
    status, code, message = error(r)
    assert (status, code) == (502, "UNAVAILABLE") and "does not trust" in message, message
    form = b"grant_type=password&username=alice&password=wonderland&scope=repository%3Aevil%3Apull"
    r = request("POST", proxy.url + "/token/hostile.test", {"Content-Type": "application/x-www-form-urlencoded"}, form)
    assert error(r)[:2] == (502, "UNAVAILABLE")
    assert up.requests("GET", r"/v2/evil/manifests/1"), "the upstream itself was asked"
    assert all(r.header("Authorization") is None for r in up.requests()), "credentials went to the upstream"
    sink.assert_untouched()
    assert "which is not used" in proxy.log_text()


def test_link_and_location_name_the_prefixed_spelling(hostile_rig: tuple[ProxyProcess, HostileServer, Sink]) -> None:
    """Absolute Link and Location URLs at the upstream's origin come back at the proxy, under the client's hostile.test/ prefix, query kept."""
    proxy, up, _ = hostile_rig
    r = get(proxy, "/v2/hostile.test/links/tags/list")
    assert r.status == 200, r.body
    assert r.header("Link") == f'<{proxy.url}/v2/hostile.test/links/tags/list?last=a&n=1>; rel="next"'
    r = request("POST", proxy.url + "/v2/hostile.test/links/blobs/uploads/")
    assert r.status == 202
    assert r.header("Location") == f"{proxy.url}/v2/hostile.test/links/blobs/uploads/u-1?_state=s%2B1"
    assert [x.path for x in up.requests("POST")] == ["/v2/links/blobs/uploads/"]


# -- the proxy's own account ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def account_proxy(
    hub: Hub, ghcr: GhcrRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """regproxy whose docker.io upstream carries the account alice (password_file), allow = library/*, myorg/*; ghcr.io stays anonymous."""
    workdir = tmp_path_factory.mktemp("account-proxy")
    secret = workdir / "hub-password"
    secret.write_text("wonderland\n")
    upstreams = [
        hub_upstream(hub, username="alice", password_file=str(secret), allow=["library/*", "myorg/*"]),
        {"name": "ghcr.io", "url": ghcr.registry_url, "ca": [str(ghcr.ca_pem)]},
    ]
    with config_proxy(workdir, upstreams) as proxy:
        yield proxy


def test_account_token_shared_by_anonymous_reads(account_proxy: ProxyProcess, hub: Hub, marks: dict[str, int]) -> None:
    """Anonymous reads of library/alpine under three spellings: the Hub's token server sees one request, from alice, for that scope."""
    image = hub.images["library/alpine:3.20"]
    for name in ("library/alpine", "alpine", "docker.io/library/alpine", "alpine", "library/alpine"):
        r = get(account_proxy, f"/v2/{name}/manifests/3.20")
        assert r.status == 200 and r.body == image.manifest, r.body[:200]
        for blob in image.blobs():
            assert get(account_proxy, f"/v2/{name}/blobs/{blob.digest}").status == 200
    seen = tokens_since(hub, marks["hub_tokens"])
    assert [(e["method"], e["username"], e["authorization"], e["scopes_requested"]) for e in seen] == [
        ("GET", "alice", True, ["repository:library/alpine:pull"])
    ]
    assert seen[0]["scopes_granted"] == ["repository:library/alpine:pull"]
    assert "token for docker.io repository:library/alpine:pull (alice)" in account_proxy.log_text()


def test_account_not_used_outside_allow(account_proxy: ProxyProcess, hub: Hub, marks: dict[str, int]) -> None:
    """private/secret (alice could read it) is outside allow: 403 DENIED, the Hub and its token server are not asked."""
    r = get(account_proxy, "/v2/private/secret/manifests/latest")
    assert error(r)[:2] == (403, "DENIED")
    settle(hub, account_proxy)
    assert not [p for p in paths_since(hub, marks["hub"]) if "private" in p]
    assert not [e for e in tokens_since(hub, marks["hub_tokens"]) if "private" in json.dumps(e)]


def test_account_never_used_for_writes(account_proxy: ProxyProcess, hub: Hub, marks: dict[str, int]) -> None:
    """An anonymous push start is challenged (401, proxy realm, pull,push scope) and an anonymous push token request goes upstream without the account."""
    r = request("POST", account_proxy.url + "/v2/myorg/pushed/blobs/uploads/")
    assert r.status == 401, r.body
    params = challenge_params(r)
    assert params["realm"] == account_proxy.url + "/token"
    kind, name, actions = params["scope"].split(":")
    assert (kind, name, sorted(actions.split(","))) == ("repository", "myorg/pushed", ["pull", "push"])
    assert tokens_since(hub, marks["hub_tokens"]) == []
    query = urlencode([("service", hub.service), ("scope", "repository:myorg/pushed:pull,push")])
    r = request("GET", f"{account_proxy.url}/token?{query}")
    assert r.status == 200
    assert not r.json()["token"].startswith("regproxy-anonymous.")  # type: ignore[index]
    seen = tokens_since(hub, marks["hub_tokens"])
    assert [(e["username"], e["authorization"], e["scopes_granted"]) for e in seen] == [
        (None, False, ["repository:myorg/pushed:pull"])
    ]


def test_account_not_sent_to_another_upstream(account_proxy: ProxyProcess, ghcr: GhcrRegistry, marks: dict[str, int]) -> None:
    """Anonymous reads of ghcr.io through the account proxy use an anonymous ghcr token: the Hub account never reaches ghcr's token server."""
    r = get(account_proxy, "/v2/ghcr.io/owner/img/manifests/latest")
    assert r.status == 200 and r.body == ghcr.images["owner/img:latest"].manifest
    seen = tokens_since(ghcr, marks["ghcr_tokens"])
    assert seen and all(e["username"] is None and not e["authorization"] for e in seen), seen


def test_client_credentials_win_over_the_account(account_proxy: ProxyProcess, hub: Hub, marks: dict[str, int]) -> None:
    """A client with its own credentials (admin) gets its own token from the Hub and reads with it; the proxy's account is not substituted."""
    query = urlencode([("service", hub.service), ("scope", "repository:myorg/tool:pull")])
    r = request("GET", f"{account_proxy.url}/token?{query}", {"Authorization": basic("admin", "admin")})
    assert r.status == 200, r.body
    token = r.json()["token"]  # type: ignore[index]
    seen = tokens_since(hub, marks["hub_tokens"])
    assert [(e["username"], e["scopes_requested"]) for e in seen] == [("admin", ["repository:myorg/tool:pull"])]
    m = get(account_proxy, "/v2/myorg/tool/manifests/1.0", {"Authorization": f"Bearer {token}"})
    assert m.status == 200 and m.body == hub.images["myorg/tool:1.0"].manifest
    assert len(tokens_since(hub, marks["hub_tokens"])) == 1


# -- found by these tests, fixed: each pinned here -------------------------------------------------------


def test_login_at_a_many_registry_proxy_keeps_credentials_not_a_refresh_token(
    many_proxy: ProxyProcess, hub: Hub, ghcr: GhcrRegistry, marks: dict[str, int]
) -> None:
    """`docker login PROXY` gets no refresh token (it would be one registry's), so docker's credentials reach each registry."""
    login = urlencode(
        [("account", "alice"), ("client_id", "docker"), ("offline_token", "true"), ("service", hub.service)]
    )
    r = request("GET", f"{many_proxy.url}/token?{login}", {"Authorization": basic("alice", "wonderland")})
    assert r.status == 200, r.body
    assert "refresh_token" not in r.json()  # type: ignore[operator]
    query = urlencode([("account", "alice"), ("scope", "repository:ghcr.io/private/secret:pull")])
    r = request("GET", f"{many_proxy.url}/token?{query}", {"Authorization": basic("alice", "wonderland")})
    seen = tokens_since(ghcr, marks["ghcr_tokens"])
    assert r.status == 200 and [e["username"] for e in seen] == ["alice"], (r.status, r.body, seen)


def test_credentialed_token_request_for_registry_without_auth(many_proxy: ProxyProcess, company: CompanyRegistry) -> None:
    """A client that sends its credentials to /token for registry.corp.test (no auth upstream) still gets a token it can read with."""
    query = urlencode([("service", "registry.test"), ("scope", f"repository:{CORP}/team/app:pull")])
    r = request("GET", f"{many_proxy.url}/token?{query}", {"Authorization": basic("alice", "wonderland")})
    assert r.status == 200, (r.status, r.body)
    token = r.json()["token"]  # type: ignore[index]
    m = get(many_proxy, f"/v2/{CORP}/team/app/manifests/1.0", {"Authorization": f"Bearer {token}"})
    assert m.status == 200


def test_upload_started_with_ns_stays_on_its_registry(
    many_proxy: ProxyProcess, hub: Hub, ghcr: GhcrRegistry, marks: dict[str, int]
) -> None:
    """A blob upload started with ?ns=ghcr.io completes on ghcr through the Location the proxy returned; the Hub never sees it."""
    query = urlencode([("scope", "repository:owner/ns-upload:pull,push")])
    r = request("GET", f"{many_proxy.url}/token/ghcr.io?{query}", {"Authorization": basic("alice", "wonderland")})
    auth = {"Authorization": "Bearer " + r.json()["token"]}  # type: ignore[index]
    data = b"uploaded with ?ns=ghcr.io\n"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    started = request("POST", f"{many_proxy.url}/v2/owner/ns-upload/blobs/uploads/?ns=ghcr.io", auth)
    assert started.status == 202, started.body
    location = started.header("Location") or ""
    if location.startswith("/"):
        location = many_proxy.url + location
    sep = "&" if "?" in location else "?"
    done = request(
        "PUT", f"{location}{sep}digest={digest}", {**auth, "Content-Type": "application/octet-stream"}, data
    )
    settle(hub, many_proxy)
    at_hub = [p for p in paths_since(hub, marks["hub"]) if "ns-upload" in p]
    assert (done.status, at_hub) == (201, []), (done.status, location, at_hub)
    assert ghcr.head(f"/v2/owner/ns-upload/blobs/{digest}").status == 200


def test_token_request_follows_the_first_scope(
    many_proxy: ProxyProcess, hub: Hub, ghcr: GhcrRegistry, marks: dict[str, int]
) -> None:
    """Scopes [myorg/mounted:pull,push (default upstream), ghcr.io/owner/tool:pull]: the Hub's token server is asked, with only its own scope."""
    query = urlencode(
        [
            ("account", "alice"),
            ("scope", "repository:myorg/mounted:push,pull"),
            ("scope", "repository:ghcr.io/owner/tool:pull"),
            ("service", hub.service),
        ]
    )
    r = request("GET", f"{many_proxy.url}/token?{query}", {"Authorization": basic("alice", "wonderland")})
    assert r.status == 200, r.body
    at_ghcr = [(e["username"], e["scopes_requested"]) for e in tokens_since(ghcr, marks["ghcr_tokens"])]
    at_hub = [(e["username"], e["scopes_requested"]) for e in tokens_since(hub, marks["hub_tokens"])]
    assert (at_hub, at_ghcr) == ([("alice", ["repository:myorg/mounted:push,pull"])], [])

