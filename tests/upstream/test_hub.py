"""The test upstream must behave like Docker Hub where regproxy cares.

These pin the fixture's contract, so a failure here means the fixture (not the
proxy) is broken.  Everything goes to the upstream directly, never via a proxy.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest

from tests.upstream import hub as hub_module
from tests.upstream import images as img
from tests.upstream.client import Response
from tests.upstream.hub import Hub


def _basic(user: str, password: str) -> dict[str, str]:
    return {
        "Authorization": "Basic "
        + base64.b64encode(f"{user}:{password}".encode()).decode()
    }


def _token_get(
    hub: Hub, params: list[tuple[str, str]], headers: dict[str, str] | None = None
) -> Response:
    return hub.client.request(
        "GET", f"{hub.token_realm}?{urlencode(params)}", headers, auth=False
    )


def _token_post(hub: Hub, form: dict[str, str]) -> Response:
    return hub.client.request(
        "POST",
        hub.token_realm,
        {"Content-Type": "application/x-www-form-urlencoded"},
        urlencode(form).encode(),
        auth=False,
    )


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _anon_token(hub: Hub, *scopes: str) -> str:
    resp = _token_get(hub, [("service", hub.service), *(("scope", s) for s in scopes)])
    assert resp.status == 200, resp.body
    return str(json.loads(resp.body)["token"])


def test_v2_ping_anonymous_gets_bearer_challenge(hub: Hub) -> None:
    """Anonymous /v2/ answers 401 with a scope-less Bearer challenge naming realm and service."""
    resp = hub.get("/v2/", auth=False)
    assert resp.status == 401
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge == f'Bearer realm="{hub.token_realm}",service="{hub.service}"'
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_repository_challenge_carries_pull_scope(hub: Hub) -> None:
    """A 401 on a repository path carries scope="repository:NAME:pull"."""
    resp = hub.get("/v2/library/alpine/manifests/latest", auth=False)
    assert resp.status == 401
    assert 'scope="repository:library/alpine:pull"' in resp.headers["WWW-Authenticate"]


def test_token_get_grants_each_repeated_scope(hub: Hub) -> None:
    """GET /token with two scope= params grants both and logs both (anonymous pull)."""
    scopes = ["repository:library/alpine:pull", "repository:myorg/tool:pull"]
    resp = _token_get(hub, [("service", hub.service), *(("scope", s) for s in scopes)])
    assert resp.status == 200
    body = json.loads(resp.body)
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300 and body["issued_at"]
    claims = _claims(body["token"])
    assert claims["aud"] == hub.service
    assert [
        f"{a['type']}:{a['name']}:{','.join(a['actions'])}" for a in claims["access"]
    ] == scopes
    entry = hub.token_log()[-1]
    assert entry["method"] == "GET" and entry["query"]["scope"] == scopes
    assert entry["scopes_granted"] == scopes and entry["authorization"] is False


def test_anonymous_token_pulls_manifest(hub: Hub) -> None:
    """An anonymous token fetched from the realm pulls a public manifest byte-for-byte."""
    image = hub.images["library/alpine:latest"]
    token = _anon_token(hub, "repository:library/alpine:pull")
    resp = hub.get(
        "/v2/library/alpine/manifests/latest",
        {"Authorization": f"Bearer {token}", "Accept": image.media_type},
    )
    assert resp.status == 200
    assert resp.body == image.manifest
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert resp.headers["Content-Type"] == image.media_type


def test_anonymous_gets_no_push(hub: Hub) -> None:
    """Anonymous push is not granted: the token carries pull only."""
    token = _anon_token(hub, "repository:library/alpine:pull,push")
    assert _claims(token)["access"] == [
        {"type": "repository", "name": "library/alpine", "actions": ["pull"]}
    ]


def test_token_post_password_and_refresh_grants(hub: Hub) -> None:
    """OAuth2 POST: password grant (offline → refresh_token), then refresh_token grant."""
    resp = _token_post(
        hub,
        {
            "grant_type": "password",
            "username": "alice",
            "password": hub.users["alice"],
            "service": hub.service,
            "client_id": "regproxy-tests",
            "access_type": "offline",
            "scope": "repository:library/alpine:pull,push repository:private/secret:pull",
        },
    )
    assert resp.status == 200, resp.body
    body = json.loads(resp.body)
    assert body["expires_in"] == 300
    claims = _claims(body["access_token"])
    assert claims["sub"] == "alice"
    assert {a["name"]: a["actions"] for a in claims["access"]} == {
        "library/alpine": ["pull", "push"],
        "private/secret": ["pull"],
    }
    refreshed = _token_post(
        hub,
        {
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "service": hub.service,
            "client_id": "regproxy-tests",
            "scope": "repository:myorg/tool:push",
        },
    )
    assert refreshed.status == 200
    assert _claims(json.loads(refreshed.body)["access_token"])["access"][0][
        "actions"
    ] == ["push"]
    assert "<redacted>" in json.dumps(hub.token_log()[-2]["form"]["password"])


def test_token_get_offline_returns_refresh_token(hub: Hub) -> None:
    """docker login's GET (account, client_id, offline_token=true, no scope) returns a refresh_token."""
    resp = _token_get(
        hub,
        [
            ("account", "alice"),
            ("client_id", "docker"),
            ("offline_token", "true"),
            ("service", hub.service),
        ],
        _basic("alice", "wonderland"),
    )
    assert resp.status == 200
    body = json.loads(resp.body)
    assert body["refresh_token"] and _claims(body["token"])["access"] == []


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_wrong_password_is_401_json(hub: Hub, method: str) -> None:
    """Bad credentials get 401 with a JSON error body, for both token flavours."""
    if method == "GET":
        resp = _token_get(hub, [("service", hub.service)], _basic("alice", "nope"))
    else:
        resp = _token_post(
            hub,
            {
                "grant_type": "password",
                "username": "alice",
                "password": "nope",
                "service": hub.service,
                "client_id": "t",
            },
        )
    assert resp.status == 401
    assert resp.headers["Content-Type"] == "application/json"
    assert json.loads(resp.body)["errors"][0]["code"] == "UNAUTHORIZED"


def test_private_repo_denied_anonymously(hub: Hub) -> None:
    """private/ gets no anonymous grant (registry says insufficient_scope); alice can pull."""
    token = _anon_token(hub, "repository:private/secret:pull")
    assert _claims(token)["access"] == []
    resp = hub.get(
        "/v2/private/secret/manifests/latest", {"Authorization": f"Bearer {token}"}
    )
    assert resp.status == 401
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    alice = json.loads(
        _token_get(
            hub,
            [("service", hub.service), ("scope", "repository:private/secret:pull")],
            _basic("alice", "wonderland"),
        ).body
    )["token"]
    ok = hub.get(
        "/v2/private/secret/manifests/latest", {"Authorization": f"Bearer {alice}"}
    )
    assert ok.status == 200 and ok.body == hub.images["private/secret:latest"].manifest


def test_blob_get_redirects_to_cdn(hub: Hub) -> None:
    """Blob GET answers 307 to the CDN (like Docker Hub's redirect to Cloudflare)."""
    layer = hub.images["library/alpine:latest"].layers[0]
    resp = hub.get(f"/v2/library/alpine/blobs/{layer.digest}")
    assert resp.status == 307
    assert resp.headers["Location"].startswith(
        hub.cdn_url + "/docker/registry/v2/blobs/sha256/"
    )


def test_blob_head_redirects_too(hub: Hub) -> None:
    """Unlike Docker Hub, distribution's redirect middleware also answers HEAD with 307."""
    layer = hub.images["library/alpine:latest"].layers[0]
    resp = hub.head(f"/v2/library/alpine/blobs/{layer.digest}")
    assert resp.status == 307 and resp.headers["Location"].startswith(hub.cdn_url)


def test_cdn_rejects_authorization(hub: Hub) -> None:
    """The CDN answers 400 to a request carrying Authorization, as S3 presigned URLs do."""
    layer = hub.images["library/alpine:latest"].layers[0]
    location = hub.get(f"/v2/library/alpine/blobs/{layer.digest}").headers["Location"]
    mark = len(hub.cdn_log())
    resp = hub.client.request(
        "GET", location, {"Authorization": "Bearer x"}, auth=False
    )
    assert resp.status == 400 and b"InvalidArgument" in resp.body
    deadline = time.monotonic() + 5  # nginx writes its log line just after answering
    while len(hub.cdn_log()) <= mark and time.monotonic() < deadline:
        time.sleep(0.02)
    entry = hub.cdn_log()[-1]
    assert entry["status"] == 400 and entry["authorization"] is True


def test_cdn_serves_blob_bytes_matching_digest(hub: Hub) -> None:
    """Following the 307 without Authorization yields bytes whose sha256 is the digest."""
    image = hub.images["library/alpine:latest"]
    for digest in [image.config_digest, *(layer.digest for layer in image.layers)]:
        assert digest is not None
        assert hub.blob_digest("library/alpine", digest) == digest
    entry = hub.cdn_log()[-1]
    assert entry["status"] == 200 and entry["authorization"] is False
    assert entry["bytes"] == image.layers[-1].size


def test_cdn_supports_range(hub: Hub) -> None:
    """The CDN answers Range requests with 206 (proxies may forward client ranges)."""
    layer = hub.images["library/alpine:latest"].layers[0]
    location = hub.get(f"/v2/library/alpine/blobs/{layer.digest}").headers["Location"]
    resp = hub.client.request("GET", location, {"Range": "bytes=10-19"}, auth=False)
    assert resp.status == 206 and len(resp.body) == 10
    assert resp.headers["Content-Range"] == f"bytes 10-19/{layer.size}"


@pytest.mark.parametrize(
    ("ref", "media_type"),
    [
        ("library/multi:latest", img.DOCKER_LIST),
        ("library/ociidx:latest", img.OCI_INDEX),
    ],
)
def test_indexes_and_children_are_served(hub: Hub, ref: str, media_type: str) -> None:
    """Docker list / OCI index and each child (by digest) come back byte-identical."""
    image = hub.images[ref]
    assert image.media_type == media_type and len(image.children) == 2
    assert set(image.platforms) == {"linux/amd64", "linux/arm64/v8"}
    resp = hub.get(f"/v2/{image.repository}/manifests/{image.tag}")
    assert resp.status == 200 and resp.body == image.manifest
    assert resp.headers["Content-Type"] == media_type
    for child in image.platforms.values():
        got = hub.get(f"/v2/{image.repository}/manifests/{child.digest}")
        assert got.status == 200 and got.body == child.manifest
        assert got.headers["Content-Type"] == child.media_type


def test_seeded_tags_and_catalog(hub: Hub) -> None:
    """All documented repositories and alpine tags exist (catalog needs admin's registry scope)."""
    tags = json.loads(hub.get("/v2/library/alpine/tags/list").body)["tags"]
    assert sorted(tags) == ["3.19", "3.20", "3.21", "latest"]
    repos = json.loads(hub.get("/v2/_catalog").body)["repositories"]
    assert {
        "library/alpine",
        "library/multi",
        "library/ociidx",
        "myorg/tool",
        "private/secret",
    } <= set(repos)


def test_layers_unpack_to_their_diff_ids(hub: Hub) -> None:
    """Every seeded layer is a gzip'ed tar whose uncompressed sha256 is in the config's diff_ids."""
    for image in hub.images.values():
        for child in [image, *image.platforms.values()]:
            if child.config is None:
                continue
            config = json.loads(child.config)
            assert config["os"] == "linux" and config["rootfs"]["type"] == "layers"
            diff_ids = []
            for layer in child.layers:
                assert layer.data is not None
                raw = gzip.decompress(layer.data)
                with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                    assert any(m.isfile() for m in tar.getmembers())
                diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
            assert config["rootfs"]["diff_ids"] == diff_ids


def test_big_layer_writer_streams_a_valid_layer(tmp_path: Path) -> None:
    """write_big_layer (used by seed_big) produces a valid gzip'ed tar with correct digests."""
    size = 3 << 20
    blob = img.write_big_layer(tmp_path / "big.tar.gz", size)
    data = (tmp_path / "big.tar.gz").read_bytes()
    assert blob.digest == img.sha256_digest(data) and blob.size == len(data)
    raw = gzip.decompress(data)
    assert blob.diff_id == img.sha256_digest(raw)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        member = tar.getmember("big/blob.bin")
        assert member.size == size
    assert img.write_big_layer(tmp_path / "big.tar.gz", size) == blob  # cached


def test_seed_big_roundtrips_through_cdn(hub: Hub) -> None:
    """seed_big() pushes library/big:latest (~1 GiB layer) that streams back intact via the CDN."""
    t0 = time.monotonic()
    image = hub.seed_big()
    assert time.monotonic() - t0 < 60
    layer = image.layers[0]
    assert layer.size > 1 << 30
    assert hub.images["library/big:latest"] is image
    assert hub.blob_digest("library/big", layer.digest) == layer.digest


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_failed_start_raises_log_tail_and_kills_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a component dies at start-up, start() raises with its log tail and stops the rest."""
    fake = tmp_path / "fake-registry"
    fake.write_text("#!/bin/sh\necho 'fake registry: boom' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr("tests.upstream.hub.REGISTRY_BIN", str(fake))
    workdir = tmp_path / "hub"
    with pytest.raises(hub_module.StartupError, match="fake registry: boom"):
        Hub(workdir).start()
    assert _processes_mentioning(str(workdir)) == []
