"""WWW-Authenticate rewriting and token-request scope mapping."""

from __future__ import annotations

from urllib.parse import parse_qs

from regproxy.auth import map_scope, parse_challenge, rewrite_challenge, token_query
from regproxy.names import upstream_name

HUB = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull"'


def to_client(name: str) -> str:
    return "nginx" if name == "library/nginx" else name


def to_upstream(name: str) -> str:
    return upstream_name(name, True)


def test_realm_rewritten_service_and_scope_kept() -> None:
    """The realm points at the proxy; service stays; scope names the repo as the client asked."""
    value, realm = rewrite_challenge(HUB, "https://proxy/token", to_client)
    assert realm == "https://auth.docker.io/token"
    c = parse_challenge(value)
    assert c is not None
    assert c.get("realm") == "https://proxy/token"
    assert c.get("service") == "registry.docker.io"
    assert c.get("scope") == "repository:nginx:pull"


def test_error_param_kept() -> None:
    """insufficient_scope and other params survive the rewrite."""
    value, _ = rewrite_challenge(HUB + ',error="insufficient_scope"', "http://p/token", to_client)
    c = parse_challenge(value)
    assert c is not None and c.get("error") == "insufficient_scope"


def test_basic_challenge_untouched() -> None:
    """Non-Bearer challenges pass unchanged."""
    assert rewrite_challenge('Basic realm="x"', "http://p/token", to_client) == ('Basic realm="x"', None)


def test_quoted_values() -> None:
    """Escaped quotes and commas inside quoted values parse correctly."""
    c = parse_challenge('Bearer realm="https://a/t",scope="repository:a:pull,push",x="q\\"d"')
    assert c is not None and c.get("scope") == "repository:a:pull,push" and c.get("x") == 'q"d'


def test_map_scope() -> None:
    """Only repository names change; actions and other resource types stay."""
    assert map_scope("repository:nginx:pull,push repository:a/b:pull registry:catalog:*", to_upstream) == (
        "repository:library/nginx:pull,push repository:a/b:pull registry:catalog:*"
    )
    assert map_scope("repository(plugin):x:pull", to_upstream) == "repository(plugin):library/x:pull"


def test_token_query_keeps_every_scope() -> None:
    """Docker's repeated scope parameters (cross-repo mount) all reach the realm, renamed."""
    q = token_query(b"service=registry.docker.io&scope=repository:new:push,pull&scope=repository:old:pull&account=me", to_upstream)
    parsed = parse_qs(q.decode())
    assert parsed["scope"] == ["repository:library/new:push,pull", "repository:library/old:pull"]
    assert parsed["service"] == ["registry.docker.io"] and parsed["account"] == ["me"]


def test_token_form_body_scope_space_separated() -> None:
    """containerd's OAuth2 form sends scopes space-separated in one parameter."""
    q = token_query(b"grant_type=password&username=u&password=p&scope=repository%3Ax%3Apull+repository%3Ay%3Apull", to_upstream)
    assert parse_qs(q.decode())["scope"] == ["repository:library/x:pull repository:library/y:pull"]
