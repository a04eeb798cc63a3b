"""A registry served from memory on a :class:`~tests.faults.hostile.HostileServer`, with switches.

The distribution registry behaves; the manifest cache's interesting cases are the
upstream misbehaving at a chosen moment. :class:`MemoryRegistry` answers
manifests (by tag and by digest, GET and HEAD, with ``Content-Type``,
``Docker-Content-Digest`` and Docker Hub's ``ratelimit-*`` headers when
``remaining`` is set) and blobs from dicts, and :attr:`MemoryRegistry.mode` turns
its manifest answers into trouble:

* ``"up"``: normal answers;
* ``"hang-up"``: the connection is closed without an answer;
* ``"error"``: ``503 UNAVAILABLE``;
* ``"stall"``: no answer until the server closes (a proxy's response timeout);
* ``"limited"``: Docker Hub's ``429 TOOMANYREQUESTS`` with ``Retry-After`` and the
  exhausted ``ratelimit-*`` headers.

:attr:`MemoryRegistry.hold` (an event) holds every manifest ``HEAD`` until it is
set, so a test can see what a proxy does while a revalidation is in flight.
Every request is recorded before it is answered (:meth:`manifest_requests`): no
log to wait for. :meth:`close` stops it (then connections are refused).
"""

from __future__ import annotations

import re
import threading
from types import TracebackType
from typing import Self

from tests.faults.hostile import (
    HUB_RATELIMIT_EXHAUSTED,
    Behaviour,
    Blob,
    HostileServer,
    Request,
    Respond,
    hang_up,
    oci_error,
    rate_limited,
    server_error,
    stall,
    v2_base,
)
from tests.upstream.images import SeededImage

_PATH = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)")
#: Docker Hub's window, in its own header syntax.
WINDOW = 21600


class MemoryRegistry:
    """``with MemoryRegistry() as up: up.add(image); ...`` then point a proxy at :attr:`url`."""

    def __init__(self, *, retry_after: str = "30", source: str = "1.2.3.4") -> None:
        self.server = HostileServer(handler=self._answer)
        self.server.route(("GET", "HEAD"), r"/v2/", v2_base())
        self.manifests: dict[tuple[str, str], tuple[str, bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.mode = "up"
        self.hold: threading.Event | None = None
        #: The ``ratelimit-limit`` sent with manifest answers; ``remaining`` None sends none.
        self.limit = 100
        self.remaining: int | None = None
        self.retry_after = retry_after
        self.source = source
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def host(self) -> str:
        return self.server.host

    def add(self, image: SeededImage, *, tag: bool = True) -> SeededImage:
        """Serve an image (an index with its children): by digest, by its tag unless ``tag`` is false, and its blobs."""
        with self._lock:
            for one in [image, *image.platforms.values()]:
                self.manifests[(one.repository, one.digest)] = (one.media_type, one.manifest, one.digest)
                if one.config_digest and one.config is not None:
                    self.blobs[one.config_digest] = one.config
                for layer in one.layers:
                    if layer.data is not None:
                        self.blobs[layer.digest] = layer.data
            if tag:
                self.manifests[(image.repository, image.tag)] = (image.media_type, image.manifest, image.digest)
        return image

    def manifest_requests(self, since: int = 0) -> list[tuple[str, str]]:
        """``(method, path)`` of every manifest request from index ``since`` of all requests."""
        return [(r.method, r.path) for r in self.server.requests()[since:] if "/manifests/" in r.path]

    def mark(self) -> int:
        return len(self.server.requests())

    def _ratelimit(self, method: str) -> list[tuple[str, str]]:
        with self._lock:
            if self.remaining is None:
                return []
            if method == "GET" and self.remaining > 0:
                self.remaining -= 1  # a GET is a pull; a HEAD is free
            left = self.remaining
        return [
            ("ratelimit-limit", f"{self.limit};w={WINDOW}"),
            ("ratelimit-remaining", f"{left};w={WINDOW}"),
            ("docker-ratelimit-source", self.source),
        ]

    def _answer(self, request: Request) -> Behaviour | None:
        match = _PATH.fullmatch(request.path)
        if match is None:
            return None
        name, kind, reference = match["name"], match["kind"], match["reference"]
        if kind == "blobs":
            data = self.blobs.get(reference)
            return Blob(data) if data is not None else oci_error(404, "BLOB_UNKNOWN", "no such blob")
        if self.mode == "hang-up":
            return hang_up()
        if self.mode == "error":
            return server_error(503)
        if self.mode == "stall":
            return stall(threading.Event())
        if self.mode == "limited":
            return rate_limited(self.retry_after, f"{self.limit};w={WINDOW}", HUB_RATELIMIT_EXHAUSTED, self.source)
        headers = self._ratelimit(request.method)
        with self._lock:
            found = self.manifests.get((name, reference))
        if found is None:
            return oci_error(404, "MANIFEST_UNKNOWN", f"no manifest {reference} in {name}", headers)
        media, body, digest = found
        answer = Respond(
            body=body,
            headers=[("Content-Type", media), ("Docker-Content-Digest", digest), ("ETag", f'"{digest}"'), *headers],
        )
        hold = self.hold
        if request.method == "HEAD" and hold is not None:
            return stall(hold, answer)
        return answer

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
