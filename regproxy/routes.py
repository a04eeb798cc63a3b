"""Map a request target to a registry API endpoint.

Routing works on the raw (still percent-encoded) path of C{request.uri}: the
upstream URL is rebuilt from the parsed parts, so nothing in the request can pick
the host that is dialled, and a name that needed encoding is simply invalid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from . import errors
from .names import is_valid_digest, is_valid_prefixed_name, is_valid_reference


class Kind(Enum):
    """The registry API endpoints the proxy serves."""

    PING = "ping"
    CATALOG = "catalog"
    MANIFEST = "manifest"
    BLOB = "blob"
    UPLOAD_START = "upload_start"
    UPLOAD = "upload"
    TAGS = "tags"
    REFERRERS = "referrers"


#: Methods each endpoint accepts; anything else is a 405 before any forwarding.
ALLOWED_METHODS: dict[Kind, frozenset[bytes]] = {
    Kind.PING: frozenset({b"GET", b"HEAD"}),
    Kind.CATALOG: frozenset({b"GET", b"HEAD"}),
    Kind.MANIFEST: frozenset({b"GET", b"HEAD", b"PUT", b"DELETE"}),
    Kind.BLOB: frozenset({b"GET", b"HEAD", b"DELETE"}),
    Kind.UPLOAD_START: frozenset({b"POST"}),
    Kind.UPLOAD: frozenset({b"GET", b"HEAD", b"PATCH", b"PUT", b"DELETE"}),
    Kind.TAGS: frozenset({b"GET", b"HEAD"}),
    Kind.REFERRERS: frozenset({b"GET", b"HEAD"}),
}

_UPLOAD = re.compile(r"/v2/(?P<name>.+)/blobs/uploads/(?P<rest>[A-Za-z0-9._~=-]*)")
_ENDPOINT = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs|tags|referrers)/(?P<rest>[^/]+)")
#: Upload session ids are opaque, but they travel in a path: keep them to safe characters.
_UPLOAD_ID = re.compile(r"[A-Za-z0-9._~=-]+")


@dataclass(frozen=True)
class Route:
    """One parsed registry request.

    @ivar name: the repository name as the client sent it (C{None} for ping/catalog).
    @ivar reference: tag or digest for manifests, digest for blobs/referrers,
        upload id for uploads, C{None} otherwise.
    """

    kind: Kind
    name: str | None = None
    reference: str | None = None

    def upstream_path(self, upstream_name: str | None) -> str:
        """The path of this endpoint on the upstream, for the given upstream-side name."""
        if self.kind is Kind.PING:
            return "/v2/"
        if self.kind is Kind.CATALOG:
            return "/v2/_catalog"
        assert upstream_name is not None
        base = f"/v2/{upstream_name}"
        suffix = {
            Kind.MANIFEST: f"/manifests/{self.reference}",
            Kind.BLOB: f"/blobs/{self.reference}",
            Kind.UPLOAD_START: "/blobs/uploads/",
            Kind.UPLOAD: f"/blobs/uploads/{self.reference}",
            Kind.TAGS: "/tags/list",
            Kind.REFERRERS: f"/referrers/{self.reference}",
        }[self.kind]
        return base + suffix


#: Methods that only read: for them a name or reference that can't exist is
#: simply not there (404, what registries answer), not a malformed request.
_READS = frozenset({b"GET", b"HEAD"})


def parse(path: str, method: bytes = b"GET") -> Route:
    """Parse a raw request path (no query) under C{/v2}.

    A syntax check must not change the status a registry gives for content that
    isn't there: reading an impossible name, tag or digest is a 404 with the
    matching C{*_UNKNOWN} code; writing one is a 400 with the precise C{*_INVALID}.

    @raise errors.RegistryError: with the OCI code that names what is wrong.
    """
    reading = method in _READS
    if path in ("/v2", "/v2/"):
        return Route(Kind.PING)
    if path == "/v2/_catalog":
        return Route(Kind.CATALOG)
    upload = _UPLOAD.fullmatch(path)
    if upload is not None:
        name = _checked_name(upload["name"], reading)
        rest = upload["rest"]
        if not rest:
            return Route(Kind.UPLOAD_START, name)
        if _UPLOAD_ID.fullmatch(rest) is None or rest in (".", ".."):
            raise errors.RegistryError(404, "BLOB_UPLOAD_UNKNOWN", "invalid upload id")
        return Route(Kind.UPLOAD, name, rest)
    endpoint = _ENDPOINT.fullmatch(path)
    if endpoint is None:
        raise errors.unsupported(f"no registry API endpoint at {path!r}")
    name = _checked_name(endpoint["name"], reading)
    kind, rest = endpoint["kind"], endpoint["rest"]
    if kind == "manifests":
        if not is_valid_reference(rest):
            if reading:
                raise errors.RegistryError(404, "MANIFEST_UNKNOWN", f"no manifest {rest!r} (not a valid reference)")
            if ":" in rest:
                raise errors.digest_invalid(rest)
            raise errors.tag_invalid(rest)
        return Route(Kind.MANIFEST, name, rest)
    if kind == "tags":
        if rest != "list":
            raise errors.unsupported(f"no registry API endpoint at {path!r}")
        return Route(Kind.TAGS, name)
    if not is_valid_digest(rest):
        if reading:
            code = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
            raise errors.RegistryError(404, code, f"no such content: {rest!r} is not a valid digest")
        raise errors.digest_invalid(rest)
    return Route(Kind.BLOB if kind == "blobs" else Kind.REFERRERS, name, rest)


def _checked_name(name: str, reading: bool) -> str:
    if not is_valid_prefixed_name(name):
        if reading:
            raise errors.RegistryError(404, "NAME_UNKNOWN", f"no repository {name!r} (not a valid name)")
        raise errors.name_invalid(name)
    return name
