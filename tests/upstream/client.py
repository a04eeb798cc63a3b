"""A tiny blocking HTTPS client for talking to the test upstream directly.

Used for seeding and by tests that verify upstream state while bypassing the proxy,
so it must not share any code with regproxy itself.  Large bodies are streamed from
files; responses can be streamed into a hash.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import ssl
from collections.abc import Callable, Mapping
from email.message import Message
from pathlib import Path
from typing import BinaryIO, NamedTuple
from urllib.parse import urljoin, urlsplit

from tests.upstream.images import ALL_MANIFEST_TYPES, Blob

_REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)(?:/|$)")

IO_BLOCK = 1 << 20


class Response(NamedTuple):
    """``(status, headers, body)``; ``headers`` is case-insensitive (``headers["Location"]``)."""

    status: int
    headers: Message
    body: bytes


def scopes_for_path(path: str) -> list[str]:
    """The scopes an all-powerful client needs for ``path`` (admin gets ``*``)."""
    path = urlsplit(path).path
    if path.startswith("/v2/_catalog"):
        return ["registry:catalog:*"]
    m = _REPO_PATH.match(path)
    return [f"repository:{m.group('name')}:*"] if m else []


def ssl_context(ca_pem: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_pem))


class UpstreamClient:
    """Blocking client for the registry (with admin tokens minted by ``token_for``) and the CDN.

    ``token_for`` None is for a registry without auth: no Authorization is ever added.
    """

    def __init__(
        self,
        registry_url: str,
        ca_pem: Path,
        token_for: Callable[[list[str]], str] | None,
    ) -> None:
        self.registry_url = registry_url
        self.context = ssl_context(ca_pem)
        self._token_for = token_for

    def _connect(self, url: str, timeout: float) -> http.client.HTTPSConnection:
        parts = urlsplit(url)
        assert parts.scheme == "https" and parts.hostname, url
        return http.client.HTTPSConnection(
            parts.hostname,
            parts.port or 443,
            context=self.context,
            timeout=timeout,
            blocksize=IO_BLOCK,
        )

    def open(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | BinaryIO | None = None,
        *,
        auth: bool = True,
        scopes: list[str] | None = None,
        timeout: float = 60,
    ) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
        """Send a request and return the open connection and unread response.

        ``path`` may be a registry path or an absolute URL (upload Locations, CDN
        redirects).  With ``auth`` an admin token for ``scopes`` (default: derived
        from the path) is added unless ``headers`` already carry Authorization.
        Manifest requests get the full Accept list unless ``headers`` set one.
        """
        url = urljoin(self.registry_url, path)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        hdrs = dict(headers or {})
        lower = {k.lower() for k in hdrs}
        if auth and self._token_for is not None and "authorization" not in lower:
            wanted = scopes if scopes is not None else scopes_for_path(parts.path)
            hdrs["Authorization"] = "Bearer " + self._token_for(wanted)
        if "/manifests/" in parts.path and "accept" not in lower:
            hdrs["Accept"] = ALL_MANIFEST_TYPES
        conn = self._connect(url, timeout)
        try:
            conn.request(method, target, body=body, headers=hdrs)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | BinaryIO | None = None,
        *,
        auth: bool = True,
        scopes: list[str] | None = None,
        timeout: float = 60,
    ) -> Response:
        """Like :meth:`open` but reads the whole body (do not use for big blobs)."""
        conn, resp = self.open(
            method, path, headers, body, auth=auth, scopes=scopes, timeout=timeout
        )
        try:
            data = resp.read()
            return Response(resp.status, resp.headers, data)
        finally:
            conn.close()

    def blob_digest(self, repository: str, digest: str, *, auth: bool = True) -> str:
        """Stream a blob (following a 307 *without* Authorization) and return its sha256."""
        url = urljoin(self.registry_url, f"/v2/{repository}/blobs/{digest}")
        registry = urlsplit(self.registry_url).netloc
        for _ in range(3):
            # Credentials go to the registry only, never to the redirect target.
            conn, resp = self.open(
                "GET", url, auth=auth and urlsplit(url).netloc == registry
            )
            try:
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.headers["Location"]
                    assert location, "redirect without Location"
                    resp.read()
                    url = urljoin(url, location)
                    continue
                if resp.status != 200:
                    raise AssertionError(
                        f"GET {url} -> {resp.status}: {resp.read()[:500]!r}"
                    )
                h = hashlib.sha256()
                while chunk := resp.read(IO_BLOCK):
                    h.update(chunk)
                return "sha256:" + h.hexdigest()
            finally:
                conn.close()
        raise AssertionError(f"too many redirects fetching {repository}@{digest}")

    # -- seeding -------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        # HEAD is redirected to the CDN too (distribution's redirect middleware does
        # not special-case HEAD), so a 307 also means "exists".
        status = self.request("HEAD", f"/v2/{repository}/blobs/{digest}").status
        return status in (200, 307)

    def push_blob(
        self, repository: str, blob: Blob, *, check_exists: bool | None = None
    ) -> None:
        """Monolithic upload (POST then PUT ?digest=), streaming ``blob.path`` if set.

        File-backed (big) blobs are skipped when already present; small ones are just
        re-uploaded, which is cheaper than a HEAD that leaves a 404 error in the
        registry log.
        """
        if check_exists is None:
            check_exists = blob.path is not None
        if check_exists and self.blob_exists(repository, blob.digest):
            return
        resp = self.request(
            "POST", f"/v2/{repository}/blobs/uploads/", {"Content-Length": "0"}, b""
        )
        if resp.status != 202:
            raise RuntimeError(
                f"upload start for {repository} -> {resp.status}: {resp.body[:500]!r}"
            )
        location = resp.headers["Location"]
        sep = "&" if "?" in location else "?"
        put_url = f"{location}{sep}digest={blob.digest}"
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(blob.size),
        }
        scopes = [f"repository:{repository}:*"]
        if blob.path is not None:
            with blob.path.open("rb") as f:
                resp = self.request(
                    "PUT", put_url, headers, f, scopes=scopes, timeout=600
                )
        else:
            resp = self.request("PUT", put_url, headers, blob.data, scopes=scopes)
        if resp.status != 201:
            raise RuntimeError(
                f"upload of {blob.digest} to {repository} -> {resp.status}: {resp.body[:500]!r}"
            )

    def put_manifest(
        self, repository: str, reference: str, media_type: str, manifest: bytes
    ) -> str:
        resp = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            {"Content-Type": media_type},
            manifest,
        )
        if resp.status != 201:
            raise RuntimeError(
                f"manifest PUT {repository}:{reference} -> {resp.status}: {resp.body[:500]!r}"
            )
        return resp.headers.get("Docker-Content-Digest", "")
