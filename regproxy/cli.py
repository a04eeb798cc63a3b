"""``python -m regproxy``: warm the cache ahead of a rollout, and see what it holds.

``warm`` pulls images through a running proxy, like a client would (so the
proxy's rules, credentials and rights apply), and reads every blob to the end:
afterwards a fleet's pulls are hits. ``cache`` lists a cache directory's
content and size without a running proxy.

    python -m regproxy warm --proxy http://127.0.0.1:5000 docker.io/library/alpine:3.20 ghcr.io/owner/img:1
    python -m regproxy cache --cache-dir /var/cache/regproxy
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from .auth import parse_challenge

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_INDEXES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")


def split_reference(reference: str) -> tuple[str, str]:
    """C{docker.io/library/alpine:3.20} -> (C{docker.io/library/alpine}, C{3.20}); a digest wins over a tag."""
    name, at, digest = reference.partition("@")
    if at:
        return name, digest
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, "latest"


@dataclass
class Client:
    """A tiny registry client that authenticates the way docker does (challenge, token, bearer)."""

    base: str
    user: str | None = None
    password: str | None = None
    _tokens: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _connection(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.base)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return cls(parts.hostname or "localhost", parts.port, timeout=600)

    def _token(self, challenge: str, scope: str) -> str | None:
        parsed = parse_challenge(challenge)
        if parsed is None or parsed.scheme.lower() != "bearer" or not parsed.get("realm"):
            return None
        query = {"scope": scope}
        if parsed.get("service"):
            query["service"] = parsed.get("service") or ""
        realm = parsed.get("realm") or ""
        parts = urlsplit(realm)
        conn = self._connection() if parts.netloc == urlsplit(self.base).netloc else _connect(realm)
        headers = {}
        if self.user is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{self.user}:{self.password or ''}".encode()).decode()
        conn.request("GET", f"{parts.path}?{urlencode(query)}", headers=headers)
        reply = conn.getresponse()
        body = reply.read()
        conn.close()
        if reply.status != 200:
            return None
        document = json.loads(body)
        return str(document.get("token") or document.get("access_token") or "") or None

    def get(self, path: str, repository: str, accept: str | None = None, sink: bool = False) -> tuple[int, dict[str, str], bytes, int]:
        """GET with auth; with C{sink} the body is read and counted, not kept."""
        scope = f"repository:{repository}:pull"
        for attempt in range(2):
            headers = {}
            if accept:
                headers["Accept"] = accept
            with self._lock:
                token = self._tokens.get(scope)
            if token:
                headers["Authorization"] = f"Bearer {token}"
            conn = self._connection()
            conn.request("GET", path, headers=headers)
            reply = conn.getresponse()
            if reply.status == 401 and attempt == 0:
                reply.read()
                conn.close()
                token = self._token(reply.getheader("WWW-Authenticate") or "", scope)
                if token is None:
                    return 401, dict(reply.getheaders()), b"", 0
                with self._lock:
                    self._tokens[scope] = token
                continue
            size = 0
            body = b""
            if sink:
                while chunk := reply.read(1 << 20):
                    size += len(chunk)
            else:
                body = reply.read()
                size = len(body)
            conn.close()
            return reply.status, {k.lower(): v for k, v in reply.getheaders()}, body, size
        raise AssertionError("unreachable")


def _connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return cls(parts.hostname or "localhost", parts.port, timeout=600)


def warm(arguments: argparse.Namespace) -> int:
    client = Client(arguments.proxy.rstrip("/"), arguments.user, arguments.password)
    started = time.monotonic()
    total_bytes = failures = 0
    for reference in arguments.images:
        size, failed = warm_image(client, reference, arguments)
        total_bytes += size
        failures += failed
    seconds = time.monotonic() - started
    print(f"warmed {total_bytes / (1 << 20):.1f} MiB in {seconds:.1f}s; {failures} failure(s)")
    return 1 if failures else 0


def warm_image(client: Client, reference: str, arguments: argparse.Namespace) -> tuple[int, int]:
    """Pull one image's manifests (every platform of an index, or those asked) and blobs; (bytes, failures)."""
    name, ref = split_reference(reference)
    status, headers, body, _ = client.get(f"/v2/{name}/manifests/{ref}", name, MANIFEST_TYPES)
    if status != 200:
        print(f"{reference}: {status} {body[:200]!r}", file=sys.stderr)
        return 0, 1
    manifests = [(headers.get("content-type", ""), body)]
    if headers.get("content-type") in _INDEXES:
        for entry in json.loads(body).get("manifests", []):
            platform = entry.get("platform") or {}
            wanted = f"{platform.get('os')}/{platform.get('architecture')}"
            if arguments.platform and wanted not in arguments.platform:
                continue
            status, child_headers, child, _ = client.get(f"/v2/{name}/manifests/{entry['digest']}", name, MANIFEST_TYPES)
            if status == 200:
                manifests.append((child_headers.get("content-type", ""), child))
    blobs: dict[str, int] = {}
    for media, document in manifests:
        if media in _INDEXES:
            continue
        parsed = json.loads(document)
        for item in [parsed.get("config"), *parsed.get("layers", [])]:
            if isinstance(item, dict) and "digest" in item:
                blobs[item["digest"]] = int(item.get("size", 0))
    print(f"{reference}: {len(manifests)} manifest(s), {len(blobs)} blob(s), {sum(blobs.values()) / (1 << 20):.1f} MiB")

    def fetch(digest: str) -> tuple[str, int, int, str]:
        status, blob_headers, _, size = client.get(f"/v2/{name}/blobs/{digest}", name, sink=True)
        return digest, status, size, blob_headers.get("cache-status", "")

    total = failures = 0
    with ThreadPoolExecutor(max_workers=arguments.parallel) as pool:
        for done, (digest, status, size, cache_status) in enumerate(pool.map(fetch, blobs), 1):
            total += size
            ok = status == 200 and size == blobs[digest]
            failures += 0 if ok else 1
            if not arguments.quiet or not ok:
                print(f"  [{done}/{len(blobs)}] {digest[:19]} {size / (1 << 20):8.1f} MiB  {status}  {cache_status}", flush=True)
    return total, failures


def cache(arguments: argparse.Namespace) -> int:
    from .cache.store import Store

    store = Store(arguments.cache_dir)
    rows = list(store.digests())
    db = store._db  # read-only listing of the index this module owns
    media = dict(db.execute("SELECT digest, media_type FROM blobs").fetchall())
    tags = db.execute("SELECT upstream, repository, tag, digest, validated FROM tags ORDER BY upstream, repository, tag").fetchall()
    if arguments.json:
        print(json.dumps({
            "blobs": [{"digest": d, "size": s, "media_type": media.get(d), "last_access": a} for d, s, a in rows],
            "tags": [{"upstream": u, "repository": r, "tag": t, "digest": d, "validated": v} for u, r, t, d, v in tags],
            "total_size": store.total_size(),
        }, indent=2))
        return 0
    for digest, size, last in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last))
        print(f"{digest}  {size:>14,d}  {when}  {media.get(digest, '')}")
    for upstream, repository, tag, digest in sorted({(u, r, t, d) for u, r, t, d, _ in tags}):
        print(f"{upstream}/{repository}:{tag} -> {digest}")
    print(f"{len(rows)} blob(s), {store.total_size() / (1 << 30):.2f} GiB" + (
        f" of {store.max_size / (1 << 30):.2f} GiB" if store.max_size else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regproxy", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("warm", help="pull images through a running proxy so that its cache holds them")
    w.add_argument("images", nargs="+", help="e.g. docker.io/library/alpine:3.20, ghcr.io/owner/img@sha256:...")
    w.add_argument("--proxy", default="http://127.0.0.1:5000", help="the proxy's URL (default: %(default)s)")
    w.add_argument("--platform", action="append", help="only these platforms of an index, e.g. linux/amd64 (repeatable)")
    w.add_argument("--user", help="registry credentials to pull with (default: anonymous)")
    w.add_argument("--password")
    w.add_argument("--parallel", type=int, default=4, help="blobs fetched at once (default: %(default)s)")
    w.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    w.set_defaults(run=warm)
    c = commands.add_parser("cache", help="list what a cache directory holds and its size")
    c.add_argument("--cache-dir", required=True)
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(run=cache)
    arguments = parser.parse_args(argv)
    return int(arguments.run(arguments))
