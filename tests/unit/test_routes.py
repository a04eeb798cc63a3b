"""Request paths map to registry endpoints; malformed ones get the right OCI error."""

from __future__ import annotations

import pytest

from regproxy import routes
from regproxy.errors import RegistryError
from regproxy.routes import Kind, Route

SHA = "sha256:" + "b" * 64


@pytest.mark.parametrize(
    "path, route",
    [
        ("/v2/", Route(Kind.PING)),
        ("/v2", Route(Kind.PING)),
        ("/v2/_catalog", Route(Kind.CATALOG)),
        ("/v2/nginx/manifests/latest", Route(Kind.MANIFEST, "nginx", "latest")),
        (f"/v2/a/b/manifests/{SHA}", Route(Kind.MANIFEST, "a/b", SHA)),
        (f"/v2/library/x/blobs/{SHA}", Route(Kind.BLOB, "library/x", SHA)),
        ("/v2/x/blobs/uploads/", Route(Kind.UPLOAD_START, "x")),
        ("/v2/x/blobs/uploads/abc-123", Route(Kind.UPLOAD, "x", "abc-123")),
        ("/v2/x/tags/list", Route(Kind.TAGS, "x")),
        (f"/v2/x/referrers/{SHA}", Route(Kind.REFERRERS, "x", SHA)),
        ("/v2/blobs/manifests/latest", Route(Kind.MANIFEST, "blobs", "latest")),
        ("/v2/a/manifests/b/manifests/c", Route(Kind.MANIFEST, "a/manifests/b", "c")),
    ],
)
def test_parse(path: str, route: Route) -> None:
    """Each API path shape parses to its endpoint, name and reference."""
    assert routes.parse(path) == route


@pytest.mark.parametrize(
    "path, code",
    [
        ("/v2/UPPER/manifests/latest", "NAME_INVALID"),
        ("/v2/a%2Fb/manifests/latest", "NAME_INVALID"),
        ("/v2/../etc/manifests/latest", "NAME_INVALID"),
        ("/v2/x/manifests/-bad", "TAG_INVALID"),
        ("/v2/x/manifests/sha256:123", "DIGEST_INVALID"),
        ("/v2/x/blobs/sha256:xyz", "DIGEST_INVALID"),
        ("/v2/x/blobs/latest", "DIGEST_INVALID"),
        ("/v2/x/tags/other", "UNSUPPORTED"),
        ("/v2/x/unknown/thing", "UNSUPPORTED"),
        ("/v2/x/blobs/uploads/..", "BLOB_UPLOAD_UNKNOWN"),
    ],
)
def test_parse_errors(path: str, code: str) -> None:
    """Malformed paths in a write raise the OCI error code that names the problem."""
    with pytest.raises(RegistryError) as e:
        routes.parse(path, b"PUT")
    assert e.value.code == code
    assert 400 <= e.value.status < 500


def test_upstream_path_uses_upstream_name() -> None:
    """The upstream path is rebuilt from parsed parts with the upstream-side name."""
    assert Route(Kind.MANIFEST, "nginx", "latest").upstream_path("library/nginx") == "/v2/library/nginx/manifests/latest"
    assert Route(Kind.UPLOAD_START, "x").upstream_path("x") == "/v2/x/blobs/uploads/"
    assert Route(Kind.PING).upstream_path(None) == "/v2/"
