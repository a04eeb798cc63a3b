"""A request fuzzer against a real regproxy process.

One proxy (``twist regproxy``, plain HTTP, ``--no-library-prefix``, short timeouts)
fronts a scriptable upstream (:class:`tests.faults.hostile.HostileServer`) that always
answers like a well-behaved registry: 401 challenges naming a realm on itself, a token
endpoint, manifests, 307 redirects of blob GETs to a second server (the "CDN"), upload
sessions.  A :class:`~tests.faults.hostile.Sink` stands for every other host: request
targets, ``Host`` headers, ``?ns=``/``from=`` and forwarding headers name it, and it must
never be dialled.

More than 10,000 requests are generated from a fixed seed (so a failure reproduces:
the report names the script index and the bytes sent) and sent over raw sockets, 32
connections at a time: junk and lower-case methods, valid and invalid registry paths,
absolute-form and authority-form targets, ``*``, percent-encodings, non-ASCII bytes,
very long targets, hostile query strings, ``Host`` variants, hundreds of headers, huge
headers, duplicate and invalid ``Content-Length``, ``Transfer-Encoding`` variants,
``Authorization`` variants, bodies up to 300 KiB, pipelined and keep-alive sequences,
TLS records and incomplete heads.  Meanwhile a few http.client sessions pull real
content through the proxy and check every byte.

Because the upstream never misbehaves, any 5xx is the proxy's own fault.  The campaign
runs once per module (a fixture); each test below checks one consequence of it.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from tests.faults.hostile import (
    Behaviour,
    Handler,
    HostileServer,
    Request,
    Respond,
    Sink,
    bearer,
    blob,
    challenge,
    fd_count,
    not_found,
    oci_error,
    ok,
    redirect,
    rss_kib,
    sha256_digest,
    token_endpoint,
    v2_base,
    wait_until,
)
from tests.proxyproc import ProxyProcess

#: Fixed, so every run sends the same requests; REGPROXY_FUZZ_SEED=N explores others.
SEED = int(os.environ.get("REGPROXY_FUZZ_SEED", "0x5EED2024"), 0)
#: Raw-socket connections; each carries 1-8 requests (about 2 reach the proxy on average: many end early).
CONNECTIONS = 6000
CONCURRENCY = 32
#: http.client sessions running alongside, each doing ROUNDS rounds of 6 checked requests.
SESSIONS = 4
ROUNDS = 40
SOCKET_TIMEOUT = 20.0
#: Descriptors the proxy may hold above its warm-up baseline once everything closed.
FD_SLACK = 3
SERVICE = "fuzz.test"
TOKEN = "fuzz-token"
PROXY_ARGS = [
    "--no-library-prefix",
    "--connect-timeout", "5",
    "--response-timeout", "10",
    "--idle-timeout", "10",
    "--client-timeout", "10",
    "--header-timeout", "3",
    "--max-redirects", "3",
]

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
SMALL = bytes(range(256)) * 4
LARGE = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(6400))  # 200 KiB
SMALL_DIGEST = sha256_digest(SMALL)
LARGE_DIGEST = sha256_digest(LARGE)
BLOBS = {SMALL_DIGEST: SMALL, LARGE_DIGEST: LARGE}
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": SMALL_DIGEST, "size": len(SMALL)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": LARGE_DIGEST, "size": len(LARGE)}],
    }
).encode()
MANIFEST_DIGEST = sha256_digest(MANIFEST)
OTHER_DIGEST = "sha256:" + "0" * 64
#: What the upstream records when the proxy aborts a streamed request body.
ABORTED_BODY_ERRORS = ("bad request: connection closed inside a request body", "bad request: bad chunk line")

_API = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs|tags|referrers)/(?P<rest>[^/]+)")
_UPLOAD = re.compile(r"/v2/(?P<name>.+)/blobs/uploads/(?P<id>[^/]*)")


# -- the well-behaved upstream -------------------------------------------------------


def _json(status: int, document: object, headers: list[tuple[str, str]] | None = None) -> Respond:
    return Respond(status=status, body=json.dumps(document).encode(), headers=[("Content-Type", "application/json"), *(headers or [])])


def upstream_handler(up: HostileServer, cdn: HostileServer) -> Handler:
    """The upstream's answers: a plausible token-auth registry, blobs redirected to ``cdn``."""
    realm = f"{up.url}/token"
    counter = iter(range(1 << 62))
    lock = threading.Lock()

    def handle(r: Request) -> Behaviour:
        path = r.path
        if path == "/token":
            return token_endpoint(TOKEN)
        authorized = r.header("Authorization") == f"Bearer {TOKEN}"
        if path == "/v2/":
            return v2_base() if authorized else challenge(bearer(realm, SERVICE))
        if path == "/v2/_catalog":
            if not authorized:
                return challenge(bearer(realm, SERVICE, "registry:catalog:*"))
            return _json(200, {"repositories": ["fuzz/app", "library/alpine"]})
        upload = _UPLOAD.fullmatch(path)
        api = upload or _API.fullmatch(path)
        if api is None:
            return not_found("UNSUPPORTED", "no such endpoint")
        name = api["name"]
        if not authorized:
            actions = "pull" if r.method in ("GET", "HEAD") else "pull,push"
            return challenge(bearer(realm, SERVICE, f"repository:{name}:{actions}"))
        if upload is not None:
            with lock:
                n = next(counter)
            return _upload(r, name, upload["id"], n, up.url)
        kind, rest = api["kind"], api["rest"]
        if kind == "manifests":
            if r.method in ("GET", "HEAD"):
                if rest.startswith("sha256:") and rest != MANIFEST_DIGEST:
                    return oci_error(404, "MANIFEST_UNKNOWN", "manifest unknown")
                return ok(MANIFEST, headers=[("Content-Type", MANIFEST_TYPE), ("Docker-Content-Digest", MANIFEST_DIGEST)])
            if r.method == "PUT":
                digest = sha256_digest(r.body)
                return Respond(status=201, headers=[("Location", f"/v2/{name}/manifests/{digest}"), ("Docker-Content-Digest", digest)])
            return Respond(status=202)
        if kind == "blobs":
            if r.method in ("GET", "HEAD") and rest in BLOBS:
                return redirect(f"{cdn.url}/cdn/{rest}", headers=[("Docker-Content-Digest", rest)])
            if r.method == "DELETE":
                return Respond(status=202)
            return oci_error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        if kind == "tags":
            link = f'</v2/{name}/tags/list?n=2&last=v1>; rel="next"'
            return _json(200, {"name": name, "tags": ["latest", "v1"]}, [("Link", link)])
        return _json(200, {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []})

    return handle


def _upload(r: Request, name: str, session: str, n: int, base: str) -> Behaviour:
    query = parse_qs(r.query)
    if not session:  # POST: start, mount, or monolithic
        mount, source, digest = query.get("mount"), query.get("from"), query.get("digest")
        if mount and source and mount[0] in BLOBS:
            return Respond(status=201, headers=[("Location", f"/v2/{name}/blobs/{mount[0]}"), ("Docker-Content-Digest", mount[0])])
        if digest:
            return Respond(status=201, headers=[("Location", f"/v2/{name}/blobs/{digest[0]}"), ("Docker-Content-Digest", digest[0])])
        uuid = f"u{n:08d}"
        # Every other session gets an absolute Location at the upstream: the proxy rewrites both kinds.
        where = (base if n % 2 else "") + f"/v2/{name}/blobs/uploads/{uuid}?_state=c3RhdGU%3D{n}"
        return Respond(status=202, headers=[("Location", where), ("Docker-Upload-UUID", uuid), ("Range", "0-0")])
    if r.method == "PATCH":
        end = max(len(r.body) - 1, 0)
        return Respond(status=202, headers=[("Location", f"/v2/{name}/blobs/uploads/{session}?_state=x"), ("Range", f"0-{end}"),
                                            ("Docker-Upload-UUID", session)])
    if r.method == "PUT":
        digest = query.get("digest")
        if not digest:
            return oci_error(400, "DIGEST_INVALID", "digest missing")
        return Respond(status=201, headers=[("Location", f"/v2/{name}/blobs/{digest[0]}"), ("Docker-Content-Digest", digest[0])])
    if r.method == "DELETE":
        return Respond(status=204)
    return Respond(status=204, headers=[("Range", "0-0"), ("Docker-Upload-UUID", session)])


def cdn_handler(r: Request) -> Behaviour | None:
    digest = r.path.removeprefix("/cdn/")
    if r.path.startswith("/cdn/") and digest in BLOBS and r.method in ("GET", "HEAD"):
        return blob(BLOBS[digest])
    return not_found("BLOB_UNKNOWN", "not on the CDN")


# -- generated requests ------------------------------------------------------------


@dataclass
class Unit:
    """One generated request: its bytes, the method the proxy will parse, a label for reports."""

    data: bytes
    method: bytes
    label: str
    #: Nothing may follow it on the connection (it closes, desyncs or answers early).
    terminal: bool = False
    #: The request itself names the upstream or the CDN (Host, target, query): the
    #: proxy may then echo that address back (as its own public URL) without leaking.
    names_upstream: bool = False


@dataclass
class Script:
    index: int
    units: list[Unit]
    #: All requests written at once instead of one after each answer.
    pipelined: bool


NAMES = ["fuzz/app", "library/alpine", "a", "x/y/z", "my-org/my_app.v2", "a" * 200]
BAD_NAMES = ["Fuzz/App", "a//b", "-a", "a/", "..", "a/../b", "a%2Fb", "a%2fb", "%2e%2e", "a:b", "a" * 300, "a/.", "a b"]
TAGS = ["latest", "v1", "1.0_rc-1", "A" * 128]
BAD_REFS = ["", "-x", ".x", "A" * 129, "sha256:abc", "sha256:" + "A" * 64, "sha512:" + "0" * 64, "a:b", "%00", "latest%2F..", "x y"]
METHODS = [b"GET"] * 60 + [b"HEAD"] * 24 + [b"POST"] * 16 + [b"PUT"] * 16 + [b"PATCH"] * 10 + [b"DELETE"] * 10 + [
    b"OPTIONS", b"OPTIONS", b"CONNECT", b"TRACE", b"get", b"head", b"Post", b"FOO", b"M-SEARCH", b"PROPFIND", b"BREW",
    b"G\x00T", b"GE T", b"", b"X" * 300, b"GET\xff", b"\xc3\xa9", b"PRI",
]


class Generator:
    """Builds scripts from a seeded random generator; every choice is reproducible."""

    def __init__(self, seed: int, proxy_host: str, up: HostileServer, cdn: HostileServer, sink: Sink) -> None:
        self.r = random.Random(seed)
        self.proxy_host = proxy_host
        self.up_host = up.host
        self.cdn_host = cdn.host
        self.sink_host = sink.host

    # pieces

    def digest(self) -> str:
        return self.r.choice([SMALL_DIGEST, LARGE_DIGEST, MANIFEST_DIGEST, OTHER_DIGEST, "sha512:" + "1" * 128,
                              "multihash+base58:QmRZxt2b1FVZPNq"])

    def api_path(self, method: bytes) -> str:
        r = self.r
        name = r.choice(NAMES)
        kind = r.choice(["ping", "catalog", "manifest", "manifest", "manifest", "blob", "blob", "blob", "upload-start",
                         "upload", "tags", "referrers"])
        if kind == "ping":
            return r.choice(["/v2/", "/v2"])
        if kind == "catalog":
            return "/v2/_catalog"
        if kind == "manifest":
            return f"/v2/{name}/manifests/{r.choice(TAGS + [MANIFEST_DIGEST, OTHER_DIGEST])}"
        if kind == "blob":
            return f"/v2/{name}/blobs/{self.digest()}"
        if kind == "upload-start":
            return f"/v2/{name}/blobs/uploads/"
        if kind == "upload":
            return f"/v2/{name}/blobs/uploads/{r.choice(['u1', 'abc-DEF_1.2~x=', 'x' * 100])}"
        if kind == "tags":
            return f"/v2/{name}/tags/list"
        return f"/v2/{name}/referrers/{self.digest()}"

    def bad_api_path(self) -> str:
        r = self.r
        name, ref = r.choice(BAD_NAMES + NAMES), r.choice(BAD_REFS + TAGS)
        return r.choice([
            f"/v2/{name}/manifests/{ref}", f"/v2/{name}/blobs/{ref}", f"/v2/{name}/blobs/uploads/{ref}/x",
            f"/v2/{name}/blobs/uploads/..", f"/v2/{name}/tags/lists", f"/v2/{name}/manifests/", f"/v2/{name}",
            f"/v2/{name}/", "/v2/_catalog/x", "//v2/", "/v2//manifests/latest", f"/v2/{name}/referrers/{ref}",
            f"/v2/{name}/manifests/{ref}/", "/v2/../token", "/v2/%2e%2e/token", "/V2/", "/v2x/",
        ])

    def percent_path(self) -> str:
        r = self.r
        pieces = [r.choice(["%00", "%2F", "%2f", "%2e", "%2E%2E", "%zz", "%", "%%", "%C3%A9", "%FF", "%20", "%0D%0A",
                            "a", "manifests", "blobs", "/", "latest"]) for _ in range(r.randint(1, 8))]
        return "/v2/" + "".join(pieces)

    def query(self) -> str:
        r = self.r
        name, digest = r.choice(NAMES), self.digest()
        options = [
            "ns=docker.io", f"ns={self.sink_host}", f"ns={self.up_host}", "ns=", "ns=%00", f"ns={self.up_host}&ns=evil.example",
            f"mount={digest}&from={name}", f"mount={digest}&from={self.sink_host}", f"mount={digest}&from=../../x",
            f"from=http://{self.sink_host}/v2/", f"digest={digest}", "_state=c3RhdGU%3D", "n=2&last=v1", "n=-1",
            "n=99999999999999999999", "a=%ZZ", "=&&=", "?", "a=b#frag", "scope=repository:x:pull", f"service={SERVICE}",
            "%C3%A9=%C3%A9", "x=" + "y" * r.choice([10, 1000, 5000]), f"url=http://{self.sink_host}/",
        ]
        return "&".join(r.choice(options) for _ in range(r.randint(1, 3)))

    def target(self, method: bytes) -> bytes:
        r = self.r
        roll = r.random()
        if roll < 0.45:
            path = self.api_path(method)
        elif roll < 0.60:
            path = self.bad_api_path()
        elif roll < 0.68:
            path = r.choice(["/", "/healthz", "/token", f"/token?service={SERVICE}&scope=repository:fuzz/app:pull",
                             "/favicon.ico", "/v1/_ping", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/token/",
                             "/healthz?x=1", "/index.html"])
        elif roll < 0.76:
            host = r.choice([self.sink_host, self.up_host, self.cdn_host, "evil.example", "127.0.0.1:1", "[::1]:80",
                             "localhost", self.proxy_host])
            scheme = r.choice(["http", "https", "HTTP", "ftp"])
            prefix = r.choice([f"{scheme}://{host}", f"//{host}", f"{scheme}://user:pass@{host}"])
            return (prefix + r.choice(["/v2/", self.api_path(method), "/", "/token"])).encode()
        elif roll < 0.78:
            return b"*"
        elif roll < 0.81:
            return r.choice([self.sink_host, "evil.example:443", self.up_host, "127.0.0.1:22"]).encode()
        elif roll < 0.87:
            path = self.percent_path()
        elif roll < 0.90:
            raw = bytes(r.randint(0x80, 0xFF) for _ in range(r.randint(1, 6)))
            return r.choice([b"/v2/", b"/v2/fuzz/app/manifests/", b"/token?scope="]) + raw + r.choice([b"", b"/manifests/latest"])
        elif roll < 0.94:
            size = r.choice([300, 2000, 8000, 15000, 17000, 40000])
            path = r.choice(["/v2/" + "a/" * (size // 2) + "manifests/latest", "/v2/a/manifests/" + "b" * size,
                             "/" + "x" * size, "/v2/a/blobs/uploads/" + "u" * size])
        else:
            path = "/" + "".join(chr(r.randint(0x21, 0x7E)) for _ in range(r.randint(0, 40)))
        if r.random() < 0.3:
            path += "?" + self.query()
        return path.encode("latin-1")

    def host_headers(self) -> list[bytes]:
        r = self.r
        host = r.choice([self.proxy_host] * 8 + [
            "localhost", "localhost:5000", self.sink_host, self.up_host, "evil.example", "", "evil.example:99999",
            "[::1]:5000", "a b", "caf\u00e9.test", "x" * 300, "127.0.0.1:1@evil.example", "%00", "proxy.test/v2/",
        ]).encode("utf-8")
        roll = r.random()
        if roll < 0.80:
            return [b"Host: " + host]
        if roll < 0.88:
            return []
        if roll < 0.94:
            return [b"Host: " + self.proxy_host.encode(), b"Host: " + self.sink_host.encode()]
        return [b"hOsT: " + host]

    def auth_headers(self) -> list[bytes]:
        r = self.r
        basic = base64.b64encode(b"user:pass")
        choice = r.choice(["none"] * 4 + ["valid"] * 4 + ["wrong", "long", "basic", "bad-basic", "empty", "negotiate",
                                                          "binary", "twice"])
        return {
            "none": [],
            "valid": [b"Authorization: Bearer " + TOKEN.encode()],
            "wrong": [b"Authorization: Bearer wrong"],
            "long": [b"Authorization: Bearer " + b"a" * 8000],
            "basic": [b"Authorization: Basic " + basic],
            "bad-basic": [b"Authorization: Basic !!!"],
            "empty": [b"Authorization:"],
            "negotiate": [b"Authorization: Negotiate YIIGhgYJKoZIhvcSAQICAQBuggZ1"],
            "binary": [b"Authorization: Bearer \xff\xfe\x01"],
            "twice": [b"Authorization: Bearer " + TOKEN.encode(), b"Authorization: Basic " + basic],
        }[choice]

    def misc_headers(self) -> list[bytes]:
        r = self.r
        pool = [
            b"Accept: application/vnd.oci.image.manifest.v1+json", b"Accept: */*",
            b"Accept: application/vnd.docker.distribution.manifest.v2+json", b"Range: bytes=0-0", b"Range: bytes=-1",
            b"Range: bytes=abc", b"Range: bytes=0-1,3-4", b"Range: items=1-2", b"User-Agent: fuzz/1.0 (\xc3\xa9)",
            b"Expect: 100-continue", b"Connection: upgrade", b"Connection: Authorization", b"Connection: keep-alive, Host",
            b"Upgrade: h2c", b"Upgrade: websocket", b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            b"Proxy-Authorization: Basic dTpw", b"Proxy-Connection: keep-alive", b"X-Forwarded-Host: " + self.sink_host.encode(),
            b"X-Forwarded-For: 10.0.0.1", b"X-Forwarded-Proto: https", b"Forwarded: host=" + self.sink_host.encode(),
            b"Origin: http://evil.example", b"Cookie: session=1", b"If-None-Match: \"" + MANIFEST_DIGEST.encode() + b"\"",
            b"Docker-Content-Digest: " + SMALL_DIGEST.encode(), b"Content-Type: application/octet-stream",
            b"Content-Type: application/x-www-form-urlencoded", b"Keep-Alive: timeout=5", b"TE: trailers",
            b"Trailer: X-Foo", b"Via: 1.1 evil", b"Max-Forwards: 0", b"X-Latin1: caf\xe9", b"X-Control: a\x01b\x7f",
            b"X-Folded: a\r\n  continued", b"X-Empty:", b"X-Spaces:    ", b"Content-Encoding: gzip",
            b"Accept-Encoding: gzip, br", b"Content-Range: bytes 0-0/1", b"Docker-Distribution-API-Version: registry/2.0",
        ]
        headers = [r.choice(pool) for _ in range(r.choice([0, 0, 1, 2, 3, 6]))]
        if r.random() < 0.03:
            # Malformed: Twisted answers 400 and closes.
            headers.append(r.choice([b"Bad Header: x", b"X\x01: y", b": no-name", b"JustText", b"X-Nul: a\x00b"]))
        return headers

    def body(self, method: bytes, target: bytes) -> bytes:
        r = self.r
        if method not in (b"POST", b"PUT", b"PATCH") and r.random() > 0.08:
            return b""
        if target.startswith(b"/token") and r.random() < 0.6:
            return (f"grant_type=password&username=u&password=p&service={SERVICE}&scope=repository:fuzz/app:pull"
                    f"&client_id=fuzz").encode()
        if b"/manifests/" in target and r.random() < 0.5:
            return MANIFEST
        size = r.choice([0, 1, 17, 100, 1000, 10000, 65000, 70000, 300000] if b"/blobs/uploads/" in target
                        else [0, 1, 17, 100, 1000, 10000, 65000, 70000])
        return r.randbytes(size)

    def framing(self, body: bytes, upload: bool) -> tuple[list[bytes], bytes, bool]:
        """The length headers and the body bytes as sent; True when the request desyncs the stream."""
        r = self.r
        if not body:
            return r.choice([([], b"", False)] * 6 + [([b"Content-Length: 0"], b"", False),
                                                      ([b"Transfer-Encoding: chunked"], b"0\r\n\r\n", False)])
        roll = r.random()
        length = str(len(body)).encode()
        if roll < 0.70:
            return [b"Content-Length: " + length], body, len(body) > 64 << 10 and not upload
        if roll < 0.85:
            return [b"Transfer-Encoding: chunked"], _chunked(body, r), len(body) > 64 << 10 and not upload
        variant = r.choice([
            ([b"Content-Length: " + str(max(len(body) // 2, 0)).encode()], body),
            ([b"Content-Length: " + length, b"Content-Length: " + length], body),
            ([b"Content-Length: " + length, b"Content-Length: 1"], body),
            ([b"Content-Length: -1"], body),
            ([b"Content-Length: +" + length], body),
            ([b"Content-Length: 0x10"], body),
            ([b"Content-Length: " + length + b", " + length], body),
            # More than is sent: refused before reading, except on a streamed upload, where
            # the proxy rightly waits for the rest (that is a slow client, not a fuzz case).
            ([b"Content-Length: 99999999999999999999999"] if not upload else [b"Content-Length: 1"], body),
            ([b"Transfer-Encoding: Chunked"], _chunked(body, r)),
            ([b"Transfer-Encoding: gzip, chunked"], _chunked(body, r)),
            ([b"Transfer-Encoding: chunked, gzip"], _chunked(body, r)),
            ([b"Transfer-Encoding: identity"], body),
            ([b"Transfer-Encoding: chunked", b"Content-Length: " + length], _chunked(body, r)),
            ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], _chunked(body, r)),
            ([b"Transfer-Encoding: chunked"], b"zz\r\n" + body + b"\r\n0\r\n\r\n"),
            ([b"Transfer-Encoding: chunked"], b"%x\r\n" % len(body) + body + b"XX0\r\n\r\n"),
            ([b"Transfer-Encoding:  chunked "], _chunked(body, r)),
        ])
        return variant[0], variant[1], True

    # whole requests

    def unit(self) -> Unit:
        r = self.r
        method = r.choice(METHODS)
        target = self.target(method)
        version = r.choice([b"HTTP/1.1"] * 60 + [b"HTTP/1.0", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1",
                                                  b"HTTP/1.1 extra", b""])
        line = method + b" " + target + (b" " + version if version else b"")
        headers = self.host_headers() + self.auth_headers() + self.misc_headers()
        roll = r.random()
        if roll < 0.02:
            headers += [b"X-Many-%d: %d" % (i, i) for i in range(r.choice([100, 450, 501, 700]))]
        elif roll < 0.04:
            headers += [b"X-Huge: " + b"h" * r.choice([4000, 12000, 16000, 17000, 100000])]
        body = self.body(method, target)
        upload = b"/blobs/uploads/" in target
        length_headers, sent_body, desync = self.framing(body, upload)
        headers += length_headers
        position = r.randint(0, len(headers))
        close = r.random() < 0.08
        if close:
            headers.insert(position, b"Connection: close")
        data = line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + sent_body
        terminal = desync or close or version != b"HTTP/1.1" or len(data) > 16 << 10 or any(
            h.startswith((b"Bad", b"X\x01", b":", b"JustText", b"X-Nul", b"Connection: upgrade", b"Upgrade"))
            for h in headers
        )
        label = f"{data[:300]!r}{'...' if len(data) > 300 else ''} ({len(data)} bytes)"
        names_upstream = self.up_host.encode() in data or self.cdn_host.encode() in data
        return Unit(data, method, label, terminal, names_upstream)

    def odd_unit(self) -> Unit:
        """Not HTTP at all, or not finished: answered with 400/408, or the connection is closed."""
        r = self.r
        kind = r.choice(["junk", "junk", "tls", "binary", "http09", "incomplete", "crlf-only", "bare-lf"])
        if kind == "junk":
            data = bytes(r.randint(0x20, 0x7E) for _ in range(r.randint(1, 200))) + b"\r\n\r\n"
        elif kind == "tls":
            data = bytes.fromhex("16030100a5010000a10303") + r.randbytes(160)
        elif kind == "binary":
            data = r.randbytes(r.randint(1, 2000)) + b"\r\n\r\n"
        elif kind == "http09":
            data = b"GET /v2/\r\n\r\n"
        elif kind == "incomplete":
            data = b"GET /v2/ HTTP/1.1\r\nHost: " + self.proxy_host.encode() + b"\r\n"
        elif kind == "crlf-only":
            data = b"\r\n\r\n\r\n"
        else:
            data = b"GET /v2/ HTTP/1.1\nHost: " + self.proxy_host.encode() + b"\n\n"
        return Unit(data, b"", f"odd:{kind} {data[:100]!r}", terminal=True)

    def script(self, index: int) -> Script:
        r = self.r
        if r.random() < 0.04:
            return Script(index, [self.odd_unit()], pipelined=False)
        units: list[Unit] = []
        for _ in range(r.choice([1, 2, 2, 3, 3, 4, 4, 6, 8])):
            unit = self.unit()
            units.append(unit)
            if unit.terminal:
                break
        small = sum(len(u.data) for u in units) < 48 << 10
        return Script(index, units, pipelined=small and r.random() < 0.3)


def _chunked(body: bytes, r: random.Random) -> bytes:
    out = b""
    pos = 0
    while pos < len(body):
        size = r.choice([1, 7, 100, 4096, 65536])
        piece = body[pos : pos + size]
        ext = r.choice([b"", b"", b";ext=1"])
        out += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
        pos += size
    return out + r.choice([b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n"])


# -- reading answers -------------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Malformed(Exception):
    """The proxy sent something that is not an HTTP/1.x response."""


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


def parse_answer(buf: bytes, head_only: bool, eof: bool) -> tuple[Answer, int] | None:
    """One HTTP/1.x response at the start of ``buf`` and the bytes it took; ``None`` if more are needed."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if eof and buf:
            raise Malformed(f"connection closed inside a response head: {buf[:100]!r}")
        if len(buf) > 1 << 16:
            raise Malformed("response head over 64 KiB")
        return None
    lines = buf[:end].split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise Malformed(f"bad status line {lines[0][:100]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise Malformed(f"bad header line {line[:100]!r}")
        headers.append((name.lower(), value.strip(b" \t")))
    status = int(status_line[1])
    start = end + 4
    if head_only or 100 <= status < 200 or status in (204, 304):
        return Answer(status, headers, b""), start
    te = [v for k, v in headers if k == b"transfer-encoding"]
    cl = [v for k, v in headers if k == b"content-length"]
    if te:
        if te != [b"chunked"] or cl:
            raise Malformed(f"framing headers {te!r} {cl!r}")
        chunked = _dechunk(buf, start, eof)
        if chunked is None:
            return None
        return Answer(status, headers, chunked[0]), chunked[1]
    if cl:
        if len(set(cl)) != 1 or not cl[0].isdigit():
            raise Malformed(f"Content-Length {cl!r}")
        n = int(cl[0])
        if len(buf) - start < n:
            if eof:
                raise Malformed(f"connection closed after {len(buf) - start} of {n} body bytes")
            return None
        return Answer(status, headers, buf[start : start + n]), start + n
    if not eof:
        return None  # close-delimited: complete once the proxy closes
    return Answer(status, headers, buf[start:]), len(buf)


def _dechunk(buf: bytes, pos: int, eof: bool) -> tuple[bytes, int] | None:
    body = b""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            break
        size_text = buf[pos:eol].split(b";", 1)[0].strip()
        if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise Malformed(f"bad chunk size {buf[pos:eol][:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)  # after the trailers, if any
            if end < 0:
                break
            return body, end + 4
        if len(buf) < eol + 2 + size + 2:
            break
        if buf[eol + 2 + size : eol + 4 + size] != b"\r\n":
            raise Malformed("chunk not followed by CRLF")
        body += buf[eol + 2 : eol + 2 + size]
        pos = eol + 4 + size
    if eof:
        raise Malformed("connection closed inside a chunked body")
    return None


@dataclass(frozen=True)
class Seen:
    """What one answer was, as far as the assertions care."""

    status: int
    label: str
    #: "empty", "oci" (an OCI error document), "other", or "second-answer": Twisted's
    #: bare, close-delimited 400 whose "body" is another HTTP response (the known defect
    #: pinned by test_malformed_chunked_body_gets_one_answer).
    body: str
    #: The answer's headers name the upstream's or the CDN's address.
    leaks_upstream: bool


@dataclass
class ConnResult:
    index: int
    outcome: str = "complete"
    answers: list[Seen] = field(default_factory=list)
    sent: int = 0
    detail: str = ""


def _body_kind(body: bytes) -> str:
    if not body:
        return "empty"
    try:
        document = json.loads(body)
        errors = document["errors"]
        if isinstance(errors, list) and errors and all(isinstance(e["code"], str) for e in errors):
            return "oci"
    except (ValueError, TypeError, KeyError):
        pass
    return "other"


def run_script(script: Script, port: int, hidden: tuple[bytes, ...]) -> ConnResult:
    """Send a script's requests on one connection and read every answer the proxy gives.

    ``hidden`` are the addresses (upstream, CDN) no answer header should mention.
    """
    result = ConnResult(script.index)
    buf = b""
    eof = False

    def read_answer(sock: socket.socket, head_only: bool) -> Answer | None:
        nonlocal buf, eof
        while True:
            parsed = parse_answer(buf, head_only, eof)
            if parsed is not None:
                answer, used = parsed
                buf = buf[used:]
                if 100 <= answer.status < 200 and answer.status != 101:
                    continue  # interim (100 Continue)
                return answer
            if eof:
                return None
            data = sock.recv(1 << 16)
            eof = not data
            buf += data

    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    except OSError as e:
        return ConnResult(script.index, "connect-failed", detail=repr(e))
    with sock:
        try:
            if script.pipelined:
                sock.sendall(b"".join(u.data for u in script.units))
                result.sent = len(script.units)
            for unit in script.units:
                if not script.pipelined:
                    try:
                        sock.sendall(unit.data)
                    except (BrokenPipeError, ConnectionResetError):
                        result.outcome = "closed-before-send"
                        break
                    result.sent += 1
                answer = read_answer(sock, unit.method == b"HEAD")
                if answer is None:
                    result.outcome = "closed-without-answer" if not result.answers else "closed-early"
                    result.detail = unit.label
                    break
                leaks = any(h in v for _, v in answer.headers for h in hidden) and not unit.names_upstream
                twice = answer.status == 400 and not answer.headers and answer.body.startswith(b"HTTP/1.")
                kind = "second-answer" if twice else _body_kind(answer.body)
                result.answers.append(Seen(answer.status, unit.label, kind, leaks))
        except Malformed as e:
            result.outcome, result.detail = "malformed", str(e)
        except TimeoutError:
            result.outcome = "timeout"
            result.detail = script.units[min(len(result.answers), len(script.units) - 1)].label
        except ConnectionResetError:
            result.outcome = "reset"
    return result


# -- well-formed clients, checked byte for byte --------------------------------------


def client_session(port: int, rounds: int) -> tuple[int, list[str]]:
    """Pull real content through the proxy with http.client; return (requests, problems)."""
    problems: list[str] = []
    sent = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT)

    def get(method: str, path: str, headers: dict[str, str]) -> tuple[int, http.client.HTTPMessage, bytes]:
        nonlocal sent
        sent += 1
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()

    try:
        status, _, body = get("GET", f"/token?service={SERVICE}&scope=repository:fuzz/app:pull", {})
        if status != 200:
            return sent, [f"token: {status} {body[:200]!r}"]
        auth = {"Authorization": "Bearer " + json.loads(body)["token"]}
        for _ in range(rounds):
            status, headers, body = get("GET", "/v2/fuzz/app/manifests/latest", {**auth, "Accept": MANIFEST_TYPE})
            if (status, body, headers.get("Docker-Content-Digest")) != (200, MANIFEST, MANIFEST_DIGEST):
                problems.append(f"manifest GET: {status} {headers.get('Docker-Content-Digest')}")
            status, headers, body = get("HEAD", f"/v2/fuzz/app/manifests/{MANIFEST_DIGEST}", auth)
            if (status, body, headers.get("Content-Length")) != (200, b"", str(len(MANIFEST))):
                problems.append(f"manifest HEAD: {status} {headers.get('Content-Length')}")
            status, _, body = get("GET", f"/v2/fuzz/app/blobs/{LARGE_DIGEST}", auth)
            if status != 200 or sha256_digest(body) != LARGE_DIGEST:
                problems.append(f"blob GET: {status}, {len(body)} bytes, {sha256_digest(body)}")
            status, headers, body = get("GET", f"/v2/fuzz/app/blobs/{SMALL_DIGEST}", {**auth, "Range": "bytes=10-19"})
            if (status, body, headers.get("Content-Range")) != (206, SMALL[10:20], f"bytes 10-19/{len(SMALL)}"):
                problems.append(f"blob range: {status} {headers.get('Content-Range')}")
            # Without credentials: a challenge naming the proxy's own realm, or (the proxy
            # fetches anonymous upstream tokens of its own) the right manifest.
            status, headers, body = get("GET", "/v2/fuzz/app/manifests/latest", {"Accept": MANIFEST_TYPE})
            challenged = status == 401 and f'realm="http://127.0.0.1:{port}/token"' in (headers.get("WWW-Authenticate") or "")
            served = status == 200 and body == MANIFEST and headers.get("Docker-Content-Digest") == MANIFEST_DIGEST
            if not (challenged or served):
                problems.append(f"anonymous: {status} {headers.get('WWW-Authenticate')} {body[:100]!r}")
            status, _, body = get("GET", "/v2/Fuzz/App/manifests/latest", auth)
            if status != 404:
                problems.append(f"invalid name: {status} {body[:100]!r}")
    except (OSError, http.client.HTTPException) as e:
        problems.append(f"session broke: {e!r}")
    finally:
        conn.close()
    return sent, problems


# -- the campaign -------------------------------------------------------------------


@dataclass
class Campaign:
    results: list[ConnResult]
    scripts: list[Script]
    client_requests: int
    client_problems: list[str]
    statuses: Counter[int]
    outcomes: Counter[str]
    seconds: float
    log: str
    up_requests: list[Request]
    cdn_requests: list[Request]
    up_errors: list[str]
    cdn_errors: list[str]
    sink_contacted: bool
    sink_seen: list[str]
    fd_baseline: int
    fd_after: int
    rss_before: int
    rss_after: int
    healthz_after: int
    manifest_after: tuple[int, str | None]

    @property
    def raw_requests(self) -> int:
        return sum(r.sent for r in self.results)


def _request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def _settled_fds(pid: int, target: int) -> int:
    """The proxy's descriptor count once it is at most ``target``, or what it is after 20 s."""
    try:
        return wait_until(lambda: (n := fd_count(pid)) <= target and n, timeout=20, what="proxy descriptors to settle")
    except AssertionError:
        return fd_count(pid)


@dataclass
class Rig:
    """The proxy and the servers around it, shared by the module."""

    up: HostileServer
    cdn: HostileServer
    sink: Sink
    proxy: ProxyProcess


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    # keep_alive=False: the proxy pools no upstream connection, so its descriptor count
    # returns exactly to the baseline once the clients are gone.
    with HostileServer(keep_alive=False) as cdn, HostileServer(keep_alive=False) as up, Sink() as sink:
        cdn.handler = cdn_handler
        up.handler = upstream_handler(up, cdn)
        with ProxyProcess(workdir, up.url, PROXY_ARGS, tls=False) as proxy:
            yield Rig(up, cdn, sink, proxy)


@pytest.fixture(scope="module")
def campaign(rig: Rig, pytestconfig: pytest.Config) -> Campaign:
    up, cdn, sink, proxy = rig.up, rig.cdn, rig.sink, rig.proxy
    assert proxy.process is not None
    pid = proxy.process.pid
    # Warm up: the realm is learnt, a token fetched, a blob pulled via the CDN.
    _, warmup_problems = client_session(proxy.port, 1)
    wait_until(lambda: up.open_connections() == 0 and cdn.open_connections() == 0, what="upstream idle")
    time.sleep(0.5)
    fd_baseline, rss_before = fd_count(pid), rss_kib(pid)
    up.clear()
    cdn.clear()

    gen = Generator(SEED, proxy.host, up, cdn, sink)
    scripts = [gen.script(i) for i in range(CONNECTIONS)]
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY + SESSIONS) as pool:
        sessions = [pool.submit(client_session, proxy.port, ROUNDS) for _ in range(SESSIONS)]
        hidden = (up.host.encode(), cdn.host.encode())
        results = list(pool.map(lambda s: run_script(s, proxy.port, hidden), scripts))
        session_results = [s.result() for s in sessions]
    seconds = time.monotonic() - started

    wait_until(lambda: up.open_connections() == 0 and cdn.open_connections() == 0, timeout=20, what="upstream idle")
    fd_after = _settled_fds(pid, fd_baseline + FD_SLACK)
    rss_after = rss_kib(pid)
    healthz = _request(proxy.port, "GET", "/healthz")[0]
    _, _, body = _request(proxy.port, "GET", f"/token?service={SERVICE}&scope=repository:fuzz/app:pull")
    status, headers, _ = _request(
        proxy.port, "GET", "/v2/fuzz/app/manifests/latest", {"Authorization": "Bearer " + json.loads(body)["token"]}
    )
    campaign = Campaign(
        results=results,
        scripts=scripts,
        client_requests=sum(n for n, _ in session_results),
        client_problems=[p for _, ps in session_results for p in ps] + warmup_problems,
        statuses=Counter(seen.status for r in results for seen in r.answers),
        outcomes=Counter(r.outcome for r in results),
        seconds=seconds,
        log=proxy.log_text(),
        up_requests=up.requests(),
        cdn_requests=cdn.requests(),
        up_errors=up.errors(),
        cdn_errors=cdn.errors(),
        sink_contacted=sink.contacted,
        sink_seen=[f"{r.method} {r.target}" for r in sink.requests()],
        fd_baseline=fd_baseline,
        fd_after=fd_after,
        rss_before=rss_before,
        rss_after=rss_after,
        healthz_after=healthz,
        manifest_after=(status, headers.get("Docker-Content-Digest")),
    )
    _report(pytestconfig, campaign)
    return campaign


def _report(config: pytest.Config, c: Campaign) -> None:
    lines = [
        f"fuzz: seed {SEED:#x}, {len(c.scripts)} connections ({CONCURRENCY} at a time), "
        f"{c.raw_requests} raw requests + {c.client_requests} http.client requests in {c.seconds:.1f} s "
        f"({(c.raw_requests + c.client_requests) / c.seconds:.0f} req/s)",
        f"fuzz: statuses {dict(sorted(c.statuses.items()))}",
        f"fuzz: connections {dict(c.outcomes.most_common())}; "
        f"requests left unanswered: {sum(r.sent - len(r.answers) for r in c.results)}; answered twice (known "
        f"defect): {sum(seen.body == 'second-answer' for r in c.results for seen in r.answers)}",
        f"fuzz: upstream saw {len(c.up_requests)} requests, CDN {len(c.cdn_requests)}, sink "
        f"{'CONTACTED' if c.sink_contacted else 'untouched'}, upstream saw {len(c.up_errors)} aborted request "
        f"bodies; proxy fds {c.fd_baseline} -> {c.fd_after}, "
        f"RSS {c.rss_before // 1024} -> {c.rss_after // 1024} MiB",
    ]
    _print(config, lines)


def _print(config: pytest.Config, lines: list[str]) -> None:
    """Print past pytest's output capture, so the figures show in a normal (-q) run."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


def _offenders(
    c: Campaign, bad: set[int] | None = None, outcomes: set[str] | None = None, which: Callable[[Seen], bool] | None = None
) -> list[str]:
    found = []
    for r in c.results:
        for seen in r.answers:
            if (bad is not None and seen.status in bad) or (which is not None and which(seen)):
                found.append(f"script {r.index}: {seen.status} ({seen.body} body) for {seen.label}")
        if outcomes is not None and r.outcome in outcomes:
            found.append(f"script {r.index}: {r.outcome}: {r.detail}")
    return found[:20]


def test_enough_requests_were_sent(campaign: Campaign) -> None:
    """The campaign really sent at least 10,000 generated requests over raw sockets."""
    assert campaign.raw_requests >= 10_000


def test_no_5xx_answers(campaign: Campaign) -> None:
    """The upstream never misbehaves, so the proxy answers no generated request with a 5xx."""
    bad = {s for s in campaign.statuses if s >= 500}
    assert not bad, _offenders(campaign, bad)


def test_every_answer_is_http1(campaign: Campaign) -> None:
    """Every answer parses as HTTP/1.x with sane framing, and no connection hangs without an answer."""
    assert campaign.outcomes["malformed"] == 0, _offenders(campaign, outcomes={"malformed"})
    assert campaign.outcomes["timeout"] == 0, _offenders(campaign, outcomes={"timeout"})
    assert campaign.outcomes["connect-failed"] == 0, _offenders(campaign, outcomes={"connect-failed"})
    assert 101 not in campaign.statuses, "the proxy must never switch protocols"


def test_error_answers_are_oci_documents(campaign: Campaign) -> None:
    """Every 4xx answer with a body carries an OCI error document (clients print its message), never HTML or text.

    Twisted's own bare 400 (malformed request) has no body; the one case where it
    seems to have one is the double answer pinned separately below.
    """

    def bad(seen: Seen) -> bool:
        return 400 <= seen.status < 500 and seen.body == "other"

    assert not _offenders(campaign, which=bad), _offenders(campaign, which=bad)


def test_answers_never_name_the_upstream_or_cdn(campaign: Campaign) -> None:
    """No answer header (realm, Location, Link...) names the upstream's or the CDN's address, unless the request did."""

    def leaks(seen: Seen) -> bool:
        return seen.leaks_upstream

    assert not _offenders(campaign, which=leaks), _offenders(campaign, which=leaks)


def test_proxy_log_has_no_tracebacks(campaign: Campaign) -> None:
    """The proxy logged no traceback, unhandled error or critical event while being fuzzed."""
    for marker in ("Traceback", "Unhandled", "CRITICAL"):
        assert marker not in campaign.log, campaign.log[campaign.log.find(marker) - 2000 :][:4000]


def test_well_formed_clients_were_served_exactly(campaign: Campaign) -> None:
    """Concurrent http.client pulls got the right status, digest and bytes for every request."""
    assert campaign.client_requests >= SESSIONS * ROUNDS * 6
    assert campaign.client_problems == []


def test_sink_never_contacted(campaign: Campaign) -> None:
    """No target, Host, ns=, from= or forwarding header made the proxy dial another host."""
    assert not campaign.sink_contacted, campaign.sink_seen[:20]


def test_upstream_saw_only_registry_requests_for_itself(campaign: Campaign) -> None:
    """The upstream got only /v2/ and /token paths, each with its own Host, all of them well-formed HTTP."""
    up = campaign.up_requests
    assert up, "nothing was forwarded at all"
    host = up[0].header("Host")
    assert host is not None and host.startswith("127.0.0.1:")
    strays = [f"{r.method} {r.target[:200]} Host={r.header_values('Host')}" for r in up
              if not (r.path.startswith("/v2/") or r.path == "/token") or r.header_values("Host") != [host]]
    assert strays == [], strays[:20]
    # A client body that turns out malformed mid-upload makes the proxy abort the
    # streamed upstream request (a short body is never presented as complete); the
    # upstream records that. Anything else it records is a malformed request from the proxy.
    unexpected = [e for e in campaign.up_errors if e not in ABORTED_BODY_ERRORS]
    assert unexpected == [], unexpected[:5]


def test_cdn_saw_only_blob_requests_without_credentials(campaign: Campaign) -> None:
    """The redirect target got only the blob paths it redirected to, for its own Host, never with Authorization."""
    cdn = campaign.cdn_requests
    assert cdn, "no blob went through the CDN redirect"
    strays = [f"{r.method} {r.target[:200]} {r.headers}" for r in cdn
              if not r.path.startswith("/cdn/sha256:") or r.header("Authorization") is not None
              or r.header("Cookie") is not None or len(r.header_values("Host")) != 1]
    assert strays == [], strays[:20]
    assert campaign.cdn_errors == []


def test_proxy_still_serves_with_descriptors_back_at_baseline(campaign: Campaign) -> None:
    """After the campaign the proxy answers /healthz and a proxied pull, and holds no leaked descriptors."""
    assert campaign.healthz_after == 200
    assert campaign.manifest_after == (200, MANIFEST_DIGEST)
    assert campaign.fd_after <= campaign.fd_baseline + FD_SLACK, (campaign.fd_baseline, campaign.fd_after)


@pytest.mark.parametrize(
    "data",
    [
        b"POST /v2/Bad/blobs/uploads/ HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        b"POST /token HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n11170\r\n" + b"a" * 70000 + b"XX0\r\n\r\n",
    ],
    ids=["upload-bad-chunk-size", "oversized-chunk-then-garbage"],
)
def test_malformed_chunked_body_gets_one_answer(rig: Rig, data: bytes) -> None:
    """A request whose chunked body is malformed gets exactly one HTTP response, then the connection closes."""
    with socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
    parsed = parse_answer(received, head_only=False, eof=True)
    assert parsed is not None
    answer, _ = parsed
    assert answer.status == 400
    assert b"HTTP/1." not in answer.body, received
