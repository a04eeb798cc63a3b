"""An in-memory Docker-Hub-like upstream for the proxy's logic tests.

One twisted.web resource answers for three hosts, told apart by C{Host}: the
registry, its token realm and a CDN that (like S3) refuses C{Authorization}.
Real-server tests live in tests/integration; these pin edge cases cheaply.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from regproxy.channel import RegistrySite
from regproxy.outbound import OutboundPolicy
from regproxy.resource import RegistryProxy, Settings
from regproxy.upstream import Upstream

BLOB = bytes(range(256)) * 40
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json"}).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
REALM = "https://auth.example/token"


@dataclass
class Seen:
    method: bytes
    host: bytes
    uri: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes


@dataclass
class FakeRegistry(Resource):
    """Registry + realm + CDN in one resource."""

    isLeaf = True
    seen: list[Seen] = field(default_factory=list)
    require_auth: bool = True

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        body = request.content.read() if request.content else b""
        host = request.getHeader(b"host") or b""
        self.seen.append(Seen(request.method, host, request.uri,
                              {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()}, body))
        if host.startswith(b"auth.example"):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"token": "T", "query": request.uri.decode()}).encode()
        if host.startswith(b"cdn.example"):
            if request.getHeader(b"authorization"):
                request.setResponseCode(400)
                return b"<Error>Only one auth mechanism allowed</Error>"
            return self._ranged(request, BLOB)
        path = request.path.decode()
        if self.require_auth and request.getHeader(b"authorization") != b"Bearer T":
            request.setResponseCode(401)
            scope = ""
            if path.startswith("/v2/") and path != "/v2/":
                scope = f',scope="repository:{path[4:].rsplit("/", 2)[0]}:pull"'
            request.setHeader(b"www-authenticate", f'Bearer realm="{REALM}",service="fake"{scope}'.encode())
            request.setHeader(b"content-type", b"application/json")
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"auth"}]}'
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        if path == "/v2/":
            return b"{}"
        if path.endswith("/manifests/latest") or path.endswith(f"/manifests/{MANIFEST_DIGEST}"):
            request.setHeader(b"content-type", b"application/vnd.docker.distribution.manifest.v2+json")
            request.setHeader(b"docker-content-digest", MANIFEST_DIGEST.encode())
            request.setHeader(b"content-length", b"%d" % len(MANIFEST))
            return MANIFEST if request.method != b"HEAD" else b""
        if path.endswith(f"/blobs/{BLOB_DIGEST}"):
            request.setResponseCode(307)
            request.setHeader(b"location", b"https://cdn.example/data/" + BLOB_DIGEST.encode() + b"?sig=1")
            return b""
        if path.endswith("/blobs/uploads/"):
            request.setResponseCode(202)
            name = path[4 : -len("/blobs/uploads/")]
            request.setHeader(b"location", f"https://{host.decode()}/v2/{name}/blobs/uploads/u1?_state=a%2Bb%3D%3D".encode())
            request.setHeader(b"docker-upload-uuid", b"u1")
            request.setHeader(b"range", b"0-0")
            return b""
        if "/blobs/uploads/" in path:
            request.setResponseCode(202 if request.method == b"PATCH" else 201)
            request.setHeader(b"location", b"/v2/library/x/blobs/uploads/u1?_state=next")
            request.setHeader(b"range", b"0-%d" % max(len(body) - 1, 0))
            return b""
        if path.endswith("/tags/list"):
            request.setHeader(b"link", b'</v2/library/x/tags/list?last=a&n=1>; rel="next"')
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"name": "library/x", "tags": ["a"]}).encode()
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return b'{"errors":[{"code":"NAME_UNKNOWN","message":"unknown"}]}'

    def _ranged(self, request: Request, data: bytes) -> bytes:
        rng = request.getHeader(b"range")
        request.setHeader(b"content-type", b"application/octet-stream")
        if rng and rng.startswith(b"bytes="):
            start_s, _, end_s = rng[6:].decode().partition("-")
            start = int(start_s)
            end = int(end_s) if end_s else len(data) - 1
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{end}/{len(data)}".encode())
            return data[start : end + 1]
        return data


def make_proxy(
    registry: FakeRegistry, library_prefix: bool = True, settings: Settings | None = None
) -> tuple[HTTPClient, RequestTraversalAgent, RequestTraversalAgent, Clock]:
    """A client wired to the proxy wired to the fake upstream, all in memory."""
    clock = Clock()
    upstream_agent = RequestTraversalAgent(registry)
    policy = OutboundPolicy("https://registry.example", realm_hosts=("auth.example",))
    upstream = Upstream.configured("https://registry.example", library_prefix, upstream_agent, clock, policy=policy)
    proxy = RegistryProxy(upstream, clock, settings or Settings(public_url=None))
    client_agent = RequestTraversalAgent(proxy)
    site = RegistrySite(proxy, reactor=clock)
    client_agent._serverFactory = site  # serve through the proxy's own Site/Request classes
    return HTTPClient(client_agent, data_to_body_producer=_SynchronousProducer), client_agent, upstream_agent, clock
