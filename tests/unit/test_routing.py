"""Many upstreams through one proxy, in memory: routing, spellings, the proxy's own upstream auth."""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.internet.task import Clock

from regproxy import routes
from regproxy.channel import RegistrySite
from regproxy.config import UpstreamConfig
from regproxy.errors import RegistryError
from regproxy.policy import PROXY_TOKEN_PREFIX, repository_allowed
from regproxy.resource import RegistryProxy, Served, Settings
from regproxy.routing import UpstreamTable
from regproxy.upstream import Upstream, policy_for
from regproxy.upstream.tokens import UpstreamTokens
from tests.unit.fakes import MANIFEST, FakeRegistry
from tests.unit.test_resource import Harness

HUB = UpstreamConfig(
    "docker.io", "https://registry.example", default=True, library_prefix=True,
    aliases=("registry-1.docker.io",), realm_hosts=("auth.example",),
)
GHCR = UpstreamConfig("ghcr.io", "https://ghcr.example", hosts=("ghcr.mirror.test",), realm_hosts=("auth.example",))
CORP = UpstreamConfig("corp.example:5000", "https://corp.example", allow=("team/**",), deny=("team/secret",))


class Many(Harness):
    """A proxy with three upstreams, each a FakeRegistry of its own."""

    def __init__(self, *configs: UpstreamConfig, settings: Settings | None = None) -> None:
        self.clock = Clock()
        self.registries: dict[str, FakeRegistry] = {}
        self.agents: list[RequestTraversalAgent] = []
        served = []
        for config in configs or (HUB, GHCR, CORP):
            registry = FakeRegistry(require_auth=config.name != CORP.name)
            agent = RequestTraversalAgent(registry)
            self.registries[config.name] = registry
            self.agents.append(agent)
            upstream = Upstream(config, agent, self.clock, policy=policy_for(config))
            served.append(Served(config, upstream, UpstreamTokens(upstream, self.clock, config.credentials)))
        self.proxy = RegistryProxy(served, self.clock, settings or Settings())
        self.client_agent = RequestTraversalAgent(self.proxy)
        self.client_agent._serverFactory = RegistrySite(self.proxy, reactor=self.clock)
        self.client = HTTPClient(self.client_agent, data_to_body_producer=_SynchronousProducer)
        self.registry = self.registries[(configs or (HUB,))[0].name]
        self.upstream_agent = self.agents[0]

    def settle(self, d: Any) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(200):
            if results:
                break
            for agent in self.agents:
                agent.flush()
            self.clock.advance(0)
            self.client_agent.flush()
        assert results, "request never completed"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def seen(self, name: str) -> list[bytes]:
        return [s.uri for s in self.registries[name].seen if not s.host.startswith(b"auth")]

    def token_requests(self, name: str) -> list[Any]:
        return [s for s in self.registries[name].seen if s.host.startswith(b"auth")]


@pytest.fixture
def m() -> Many:
    return Many()


AUTH = {b"Authorization": [b"Bearer T"]}


def test_path_prefix_selects_upstream_and_strips_it(m: Many) -> None:
    """/v2/ghcr.io/owner/img/... goes to ghcr as owner/img; the other upstreams see nothing."""
    r, body = m.request("GET", "/v2/ghcr.io/owner/img/manifests/latest", headers=AUTH)
    assert r.code == 200 and body == MANIFEST
    assert m.seen("ghcr.io") == [b"/v2/owner/img/manifests/latest"]
    assert m.seen("docker.io") == [] and m.seen("corp.example:5000") == []


def test_host_header_selects_upstream(m: Many) -> None:
    """A Host naming an upstream selects it; the path is the repository as it stands."""
    r, _ = m.request("GET", "/v2/owner/img/manifests/latest", headers={**AUTH, b"Host": [b"ghcr.mirror.test:5000"]})
    assert r.code == 200 and m.seen("ghcr.io") == [b"/v2/owner/img/manifests/latest"]


def test_ns_selects_upstream(m: Many) -> None:
    """containerd's ?ns=ghcr.io selects ghcr for an unprefixed name; the query goes along untouched."""
    r, _ = m.request("GET", "/v2/owner/img/manifests/latest?ns=ghcr.io", headers=AUTH)
    assert r.code == 200 and m.seen("ghcr.io") == [b"/v2/owner/img/manifests/latest?ns=ghcr.io"]


def test_default_upstream_with_library_rule(m: Many) -> None:
    """An unprefixed one-component name goes to the default upstream as library/NAME; docker.io/ prefix too."""
    m.request("GET", "/v2/alpine/manifests/latest", headers=AUTH)
    m.request("GET", "/v2/docker.io/alpine/manifests/latest", headers=AUTH)
    m.request("GET", "/v2/registry-1.docker.io/library/alpine/manifests/latest", headers=AUTH)
    assert m.seen("docker.io") == [b"/v2/library/alpine/manifests/latest"] * 3


@pytest.mark.parametrize(
    "path, status, code",
    [
        ("/v2/quay.io/x/y/manifests/1", 404, "NAME_UNKNOWN"),
        ("/v2/localhost/x/manifests/1", 404, "NAME_UNKNOWN"),
        ("/v2/owner/img/manifests/1?ns=evil.example", 404, "NAME_UNKNOWN"),
        ("/v2/ghcr.io/owner/img/manifests/1?ns=docker.io", 400, "DENIED"),
        ("/v2/corp.example:5000/team/secret/manifests/1", 403, "DENIED"),
        ("/v2/corp.example:5000/other/app/manifests/1", 403, "DENIED"),
    ],
)
def test_refusals_dial_nothing(m: Many, path: str, status: int, code: str) -> None:
    """Unknown registries, ns/path conflicts and denied repositories are clear OCI errors, nothing dialled."""
    r, body = m.request("GET", path, headers=AUTH)
    error = json.loads(body)["errors"][0]
    assert r.code == status and error["code"] == code
    if code == "NAME_UNKNOWN":
        assert "docker.io (default)" in error["message"] and "ghcr.io" in error["message"]
    assert all(m.seen(name) == [] for name in m.registries)


def test_allowed_repository_passes(m: Many) -> None:
    """A repository the allow list admits is served (the company registry needs no auth)."""
    r, _ = m.request("GET", "/v2/corp.example:5000/team/app/manifests/latest")
    assert r.code == 200 and m.seen("corp.example:5000") == [b"/v2/team/app/manifests/latest"]


def test_no_default_needs_a_prefix() -> None:
    """Without a default upstream, an unprefixed name is a 404 that says how to name a registry."""
    m = Many(GHCR, CORP)
    r, body = m.request("GET", "/v2/alpine/manifests/latest")
    assert r.code == 404 and "/v2/REGISTRY/NAME" in json.loads(body)["errors"][0]["message"]


def test_spelling_comes_back_in_challenge_location_and_link(m: Many) -> None:
    """The client's prefixed spelling is what it sees in the challenge scope, upload Location and Link."""
    r, _ = m.request("GET", "/v2/ghcr.io/owner/img/manifests/latest", headers={b"Authorization": [b"Bearer bad"]})
    challenge = r.headers.getRawHeaders(b"www-authenticate")[0]
    assert b'realm="http://proxy.test/token/ghcr.io"' in challenge
    assert b'scope="repository:ghcr.io/owner/img:pull"' in challenge
    r, _ = m.request("POST", "/v2/ghcr.io/owner/img/blobs/uploads/", headers=AUTH)
    assert r.headers.getRawHeaders(b"location")[0].startswith(b"http://proxy.test/v2/ghcr.io/owner/img/blobs/uploads/u1?")
    r, _ = m.request("GET", "/v2/ghcr.io/owner/img/tags/list", headers=AUTH)
    assert r.headers.getRawHeaders(b"link") == [b'</v2/ghcr.io/library/x/tags/list?last=a&n=1>; rel="next"']


def test_mount_from_same_upstream_renamed_other_upstream_dropped(m: Many) -> None:
    """A mount source on the same upstream loses the prefix; one on another upstream isn't attempted (plain upload)."""
    digest = "sha256:" + "a" * 64
    m.request("POST", f"/v2/ghcr.io/owner/new/blobs/uploads/?mount={digest}&from=ghcr.io/owner/old", headers=AUTH)
    assert m.seen("ghcr.io")[-1] == f"/v2/owner/new/blobs/uploads/?mount={digest}&from=owner/old".encode()
    r, _ = m.request("POST", f"/v2/ghcr.io/owner/new/blobs/uploads/?mount={digest}&from=docker.io/library/alpine", headers=AUTH)
    assert r.code == 202 and m.seen("ghcr.io")[-1] == b"/v2/owner/new/blobs/uploads/"
    assert m.seen("docker.io") == []


def test_anonymous_token_request_answered_by_proxy(m: Many) -> None:
    """An anonymous pull-only token request gets the proxy's own token at once: no token server is asked."""
    r, body = m.request("GET", "/token?service=fake&scope=repository:alpine:pull")
    token = json.loads(body)
    assert r.code == 200 and token["token"].startswith(PROXY_TOKEN_PREFIX) and token["expires_in"] > 0
    assert all(m.token_requests(name) == [] for name in m.registries)


def test_proxy_token_is_never_forwarded_and_upstream_token_is_shared(m: Many) -> None:
    """Requests with the proxy's token go upstream with the proxy's own upstream token, fetched once per scope."""
    token = json.loads(m.request("GET", "/token?scope=repository:alpine:pull")[1])["token"]
    for _ in range(3):
        r, body = m.request("GET", "/v2/alpine/manifests/latest", headers={b"Authorization": [f"Bearer {token}".encode()]})
        assert r.code == 200 and body == MANIFEST
    hub = m.registries["docker.io"]
    upstream_auth = [s.headers.get(b"authorization") for s in hub.seen if not s.host.startswith(b"auth")]
    assert [b"Bearer " + token.encode()] not in upstream_auth
    assert upstream_auth[-3:] == [[b"Bearer T"]] * 3
    fetched = m.token_requests("docker.io")
    assert len(fetched) == 1 and b"scope=repository%3Alibrary%2Falpine%3Apull" in fetched[0].uri
    assert b"authorization" not in fetched[0].headers  # anonymous: no account configured


def test_proxy_token_ping_is_answered_by_proxy(m: Many) -> None:
    """GET /v2/ with the proxy's token is a 200 from the proxy itself."""
    token = json.loads(m.request("GET", "/token")[1])["token"]
    r, _ = m.request("GET", "/v2/", headers={b"Authorization": [f"Bearer {token}".encode()]})
    assert r.code == 200 and m.seen("docker.io") == []


def test_configured_account_is_used_for_the_proxy_token() -> None:
    """With credentials configured, the proxy's token request carries the account (Basic), the client's carries none."""
    from dataclasses import replace

    m = Many(replace(HUB, username="bot", password="pw"))
    r, _ = m.request("GET", "/v2/alpine/manifests/latest")
    assert r.code == 200
    (fetched,) = m.token_requests("docker.io")
    assert fetched.headers[b"authorization"] == [b"Basic Ym90OnB3"]


def test_client_credentials_forwarded_to_the_selected_realm(m: Many) -> None:
    """A token request with credentials goes to the realm of the upstream the scope names, scope renamed, service its own."""
    m.request("GET", "/v2/ghcr.io/owner/img/manifests/latest", headers={b"Authorization": [b"Bearer bad"]})
    r, _ = m.request(
        "GET", "/token?service=other&scope=repository:ghcr.io/owner/img:pull,push&scope=repository:docker.io/library/x:pull",
        headers={b"Authorization": [b"Basic dTpw"]},
    )
    assert r.code == 200
    (fetched,) = m.token_requests("ghcr.io")
    assert fetched.headers[b"authorization"] == [b"Basic dTpw"]
    assert b"scope=repository%3Aowner%2Fimg%3Apull%2Cpush" in fetched.uri and b"library" not in fetched.uri
    assert b"service=fake" in fetched.uri and b"service=other" not in fetched.uri
    assert m.token_requests("docker.io") == []


def test_token_path_names_the_upstream(m: Many) -> None:
    """/token/ghcr.io routes a credentialed token request to ghcr's realm even without a prefixed scope."""
    r, _ = m.request("GET", "/token/ghcr.io?scope=repository:owner/img:push", headers={b"Authorization": [b"Basic dTpw"]})
    assert r.code == 200 and len(m.token_requests("ghcr.io")) == 1
    r, body = m.request("GET", "/token/quay.io?scope=repository:x:push", headers={b"Authorization": [b"Basic dTpw"]})
    assert r.code == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"


def test_writes_never_use_the_proxy_account(m: Many) -> None:
    """A push from a client without credentials goes upstream without any; the proxy's token is not lent to it."""
    r, _ = m.request("POST", "/v2/alpine/blobs/uploads/")
    assert r.code == 401
    hub = m.registries["docker.io"]
    assert b"authorization" not in hub.seen[-1].headers and m.token_requests("docker.io") == []


@pytest.mark.parametrize(
    "allow, deny, name, ok",
    [
        ((), (), "any/thing", True),
        (("library/*",), (), "library/alpine", True),
        (("library/*",), (), "library/a/b", False),
        (("team/**",), (), "team/a/b", True),
        ((), ("private/**",), "private/x", False),
        (("**",), ("x",), "x", False),
    ],
)
def test_repository_globs(allow: tuple[str, ...], deny: tuple[str, ...], name: str, ok: bool) -> None:
    """Allow/deny globs: * stays within a component, ** crosses them, deny wins."""
    assert repository_allowed(UpstreamConfig("r.io", "https://r", allow=allow, deny=deny), name) is ok


def test_table_conflict_of_host_and_ns() -> None:
    """A Host naming one upstream and ?ns= naming another is refused."""
    table = UpstreamTable([(HUB, "hub"), (GHCR, "ghcr")])
    with pytest.raises(RegistryError) as e:
        table.select(b"ghcr.mirror.test", routes.Route(routes.Kind.MANIFEST, "x", "1"), b"ns=docker.io")
    assert e.value.status == 400
