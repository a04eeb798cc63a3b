"""The ghcr.io-like and company upstreams behave as documented, next to the Hub.

Like ``test_hub.py`` these pin the fixtures' contract and go to the upstreams
directly, never via a proxy.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt
import pytest

from tests.upstream import images as img
from tests.upstream.client import Response
from tests.upstream.hub import Hub, Registry, parse_access_line
from tests.upstream.registries import CompanyRegistry, GhcrRegistry


def _basic(user: str, password: str) -> dict[str, str]:
    return {
        "Authorization": "Basic "
        + base64.b64encode(f"{user}:{password}".encode()).decode()
    }


def _token(
    registry: Registry, *scopes: str, user: tuple[str, str] | None = None
) -> Response:
    params = [("service", registry.service), *(("scope", s) for s in scopes)]
    return registry.client.request(
        "GET",
        f"{registry.token_realm}?{urlencode(params)}",
        _basic(*user) if user else None,
        auth=False,
    )


def _claims(resp: Response) -> dict[str, Any]:
    assert resp.status == 200, resp.body
    token = json.loads(resp.body)["token"]
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    claims["_token"] = token
    return claims


def _bearer(token: str, accept: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if accept:
        headers["Accept"] = accept
    return headers


# -- ghcr --------------------------------------------------------------------


def test_ghcr_challenge_names_its_own_realm_and_service(ghcr: GhcrRegistry) -> None:
    """Anonymous /v2/ on ghcr is a 401 Bearer challenge with realm .../ghcr-token and service ghcr.test."""
    resp = ghcr.get("/v2/", auth=False)
    assert resp.status == 401
    assert ghcr.service == "ghcr.test"
    assert urlsplit(ghcr.token_realm).path == "/ghcr-token"
    assert (
        resp.headers["WWW-Authenticate"]
        == f'Bearer realm="{ghcr.token_realm}",service="ghcr.test"'
    )


def test_ghcr_is_independent_of_hub(hub: Hub, ghcr: GhcrRegistry) -> None:
    """ghcr has its own ports, CA, token log and signing key: a Hub token is refused there."""
    assert ghcr.registry_url != hub.registry_url
    assert urlsplit(ghcr.token_realm).netloc != urlsplit(hub.token_realm).netloc
    assert ghcr.ca_pem.read_bytes() != hub.ca_pem.read_bytes()
    assert ghcr.cdn_url == "" and ghcr.cdn_log() == []
    hub_token = hub.admin_token("repository:owner/img:pull")
    resp = ghcr.get("/v2/owner/img/manifests/1", _bearer(hub_token))
    assert resp.status == 401
    hub_before = len(hub.token_log())
    _claims(_token(ghcr, "repository:owner/img:pull"))
    assert len(hub.token_log()) == hub_before
    assert ghcr.token_log()[-1]["path"] == "/ghcr-token"


def test_ghcr_token_server_answers_only_its_realm_path(ghcr: GhcrRegistry) -> None:
    """The ghcr token server 404s on /token (Hub's path): only the challenged realm works."""
    base = ghcr.token_realm.rsplit("/", 1)[0]
    query = urlencode({"service": ghcr.service, "scope": "repository:owner/img:pull"})
    resp = ghcr.client.request("GET", f"{base}/token?{query}", auth=False)
    assert resp.status == 404
    entry = ghcr.token_log()[-1]
    assert entry["path"] == "/token" and entry["status"] == 404


def test_ghcr_anonymous_token_pulls_public_image(ghcr: GhcrRegistry) -> None:
    """An anonymous ghcr token (iss ghcr-test-auth, aud ghcr.test) pulls owner/img:1 byte-for-byte."""
    image = ghcr.images["owner/img:1"]
    claims = _claims(_token(ghcr, "repository:owner/img:pull"))
    assert claims["iss"] == "ghcr-test-auth" and claims["aud"] == "ghcr.test"
    assert claims["access"] == [
        {"type": "repository", "name": "owner/img", "actions": ["pull"]}
    ]
    resp = ghcr.get(
        "/v2/owner/img/manifests/1", _bearer(claims["_token"], image.media_type)
    )
    assert resp.status == 200 and resp.body == image.manifest
    assert resp.headers["Docker-Content-Digest"] == image.digest
    entry = ghcr.token_log()[-1]
    assert entry["username"] is None and entry["authorization"] is False
    assert entry["scopes_granted"] == ["repository:owner/img:pull"]


def test_ghcr_private_repo_needs_alice(ghcr: GhcrRegistry) -> None:
    """private/secret on ghcr: the anonymous token grants nothing (401), alice's pulls it."""
    anon = _claims(_token(ghcr, "repository:private/secret:pull"))
    assert anon["access"] == []
    resp = ghcr.get("/v2/private/secret/manifests/latest", _bearer(anon["_token"]))
    assert resp.status == 401
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    alice = _claims(
        _token(ghcr, "repository:private/secret:pull", user=("alice", "wonderland"))
    )
    assert alice["sub"] == "alice"
    resp = ghcr.get("/v2/private/secret/manifests/latest", _bearer(alice["_token"]))
    assert resp.status == 200
    assert resp.body == ghcr.images["private/secret:latest"].manifest
    assert ghcr.token_log()[-1]["username"] == "alice"


def test_ghcr_serves_blobs_without_redirect(ghcr: GhcrRegistry) -> None:
    """ghcr has no CDN: blob GET and HEAD are answered by the registry itself with 200."""
    image = ghcr.images["owner/tool:latest"]
    layer = image.layers[0]
    path = f"/v2/owner/tool/blobs/{layer.digest}"
    head = ghcr.head(path)
    assert head.status == 200 and "Location" not in head.headers
    assert head.headers["Content-Length"] == str(layer.size)
    resp = ghcr.get(path)
    assert resp.status == 200 and resp.body == layer.data
    assert ghcr.blob_digest("owner/tool", layer.digest) == layer.digest


def test_ghcr_seeded_images(ghcr: GhcrRegistry) -> None:
    """ghcr holds owner/img:{1,latest}, owner/tool:latest, owner/multi:latest (OCI index), private/secret:latest."""
    assert set(ghcr.images) == {
        "owner/img:1",
        "owner/img:latest",
        "owner/tool:latest",
        "owner/multi:latest",
        "private/secret:latest",
    }
    for image in ghcr.images.values():
        resp = ghcr.get(f"/v2/{image.repository}/manifests/{image.tag}")
        assert resp.status == 200 and resp.body == image.manifest
        assert resp.headers["Content-Type"] == image.media_type
        for child in image.platforms.values():
            got = ghcr.get(f"/v2/{image.repository}/manifests/{child.digest}")
            assert got.status == 200 and got.body == child.manifest
    assert ghcr.images["owner/img:1"].media_type == img.OCI_MANIFEST
    assert ghcr.images["owner/multi:latest"].media_type == img.OCI_INDEX
    tags = json.loads(ghcr.get("/v2/owner/img/tags/list").body)["tags"]
    assert sorted(tags) == ["1", "latest"]


def test_seeded_digests_differ_from_hub(
    hub: Hub, ghcr: GhcrRegistry, company: CompanyRegistry
) -> None:
    """No manifest digest is shared between the upstreams (private/secret differs too)."""
    assert hub.images["private/secret:latest"] != ghcr.images["private/secret:latest"]
    digests = [{i.digest for i in r.images.values()} for r in (hub, ghcr, company)]
    assert not digests[0] & digests[1] and not digests[0] & digests[2]
    assert not digests[1] & digests[2]


# -- company -----------------------------------------------------------------


def test_company_v2_is_open(company: CompanyRegistry) -> None:
    """The company registry answers /v2/ 200 without any auth and without a challenge."""
    resp = company.get("/v2/", auth=False)
    assert resp.status == 200
    assert "WWW-Authenticate" not in resp.headers
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert urlsplit(company.registry_url).scheme == "https"


def test_company_has_no_auth_machinery(company: CompanyRegistry) -> None:
    """No auth: service and realm are "", no users, no token log, admin_token raises."""
    assert company.service == "" and company.token_realm == ""
    assert company.users == {} and company.token_log() == []
    with pytest.raises(RuntimeError, match="no token auth"):
        company.admin_token("repository:team/app:pull")


def test_company_images_pull_anonymously(company: CompanyRegistry) -> None:
    """team/app:1.0 and team/base:2 (manifests, configs, layers) come back without Authorization."""
    assert set(company.images) == {"team/app:1.0", "team/base:2"}
    for image in company.images.values():
        resp = company.get(f"/v2/{image.repository}/manifests/{image.tag}", auth=False)
        assert resp.status == 200 and resp.body == image.manifest
        assert image.config_digest is not None
        for digest in [image.config_digest, *(x.digest for x in image.layers)]:
            blob = company.get(f"/v2/{image.repository}/blobs/{digest}", auth=False)
            assert blob.status == 200
            assert "sha256:" + hashlib.sha256(blob.body).hexdigest() == digest


def test_company_accepts_anonymous_push(company: CompanyRegistry) -> None:
    """No auth means push is open too: a scratch image lands under a fresh name."""
    image = img.make_image(
        "scratch/pushed", "t", seed="company/scratch", layer_sizes=(1024,)
    )
    company.push(image)
    resp = company.get("/v2/scratch/pushed/manifests/t", auth=False)
    assert resp.status == 200 and resp.body == image.manifest


# -- access log --------------------------------------------------------------


def test_registry_requests_parse_the_access_log(company: CompanyRegistry) -> None:
    """registry_requests() yields method, path, query and status of each request the registry logged."""
    before = len(company.registry_requests())
    company.get("/v2/team/app/manifests/absent", auth=False)
    company.get("/v2/team/app/tags/list?n=1", auth=False)
    company.head("/v2/team/base/manifests/2", auth=False)
    (missing,) = company.wait_registry_request(
        "GET", "/v2/team/app/manifests/absent", since=before
    )
    assert missing["status"] == 404 and missing["query"] == {}
    (tags,) = company.wait_registry_request(
        "GET", "/v2/team/app/tags/list", since=before
    )
    assert tags["status"] == 200 and tags["query"] == {"n": ["1"]}
    assert tags["target"] == "/v2/team/app/tags/list?n=1"
    assert tags["proto"] == "HTTP/1.1" and tags["remote"] == "127.0.0.1"
    (head,) = company.wait_registry_request(
        "HEAD", "/v2/team/base/manifests/2", since=before
    )
    assert head["status"] == 200
    counts = company.registry_request_counts(since=before)
    assert counts[("GET", "/v2/team/app/manifests/absent")] == 1
    assert counts[("HEAD", "/v2/team/base/manifests/2")] == 1


def test_registry_requests_are_per_registry(hub: Hub, ghcr: GhcrRegistry) -> None:
    """A request to ghcr shows in ghcr's access log only, with the 401 of an unauthenticated GET."""
    hub_before = len(hub.registry_requests())
    before = len(ghcr.registry_requests())
    ghcr.get("/v2/owner/img/manifests/1", auth=False)
    (entry,) = ghcr.wait_registry_request(
        "GET", "/v2/owner/img/manifests/1", since=before
    )
    assert entry["status"] == 401
    assert not [
        e
        for e in hub.registry_requests()[hub_before:]
        if e["path"].startswith("/v2/owner/")
    ]


def test_parse_access_line_formats() -> None:
    """The combined-format parser handles escaped quotes in the user agent and skips logrus lines."""
    line = (
        '127.0.0.1 - - [01/Dec/2026:09:08:39 +0000] "PUT /v2/a/b/blobs/uploads/u?_state=x%3D'
        '&digest=sha256:00 HTTP/1.1" 201 0 "" "say \\"hi\\" docker/27"'
    )
    entry = parse_access_line(line)
    assert entry is not None
    assert entry["method"] == "PUT" and entry["path"] == "/v2/a/b/blobs/uploads/u"
    assert entry["query"] == {"_state": ["x="], "digest": ["sha256:00"]}
    assert entry["status"] == 201 and entry["bytes"] == 0
    assert entry["user_agent"] == 'say "hi" docker/27'
    assert entry["time"] == "01/Dec/2026:09:08:39 +0000"
    logrus = 'time="2026-12-01T09:08:39Z" level=info msg="response completed" http.request.method=GET'
    assert parse_access_line(logrus) is None
