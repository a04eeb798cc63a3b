"""The blob cache as a source: answer from disk, join a fill in flight, or start one.

Who may read a cached blob is decided per request, never by knowing its
digest: the blob must be linked to the repository the client asked through
(the upstream said so: a 200 for that repository), and the client must be
allowed to read that repository, known from its own recent 200s or checked
with a cheap upstream C{HEAD} with its own credentials (or the proxy's own
token, for clients that brought none), remembered per (credential, upstream,
repository) for a few minutes at most. Anyone else gets exactly what the
upstream answers: the request is passed through.

Every answer carries C{Cache-Status} (RFC 9211): C{regproxy; hit},
C{regproxy; fwd=miss; stored} (this request started the fill),
C{regproxy; fwd=miss; collapsed} (it joined a fill in flight), or
C{regproxy; fwd=miss; fwd-status=N} / C{regproxy; fwd=request} when passed
through uncached.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from ..metrics import cache_label
from ..policy import Credentials
from ..ranges import Unsatisfiable, parse_range
from ..source import from_upstream
from ..upstream import Upstream, discard
from ..upstream.tokens import UpstreamTokens
from .fill import Fill, Growing, RemoteFill
from .reader import FileAnswer, FileBody, blob_headers
from .rights import Rights
from .store import Blob, Store, split_digest

HIT = "regproxy; hit"
STORED = "regproxy; fwd=miss; stored"
COLLAPSED = "regproxy; fwd=miss; collapsed"
#: Headers that would make the upstream answer something other than the whole blob.
_CONDITIONAL = (b"range", b"if-range", b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since")


@dataclass(frozen=True)
class Origin:
    """Where a blob request goes upstream, and as whom."""

    upstream: Upstream
    tokens: UpstreamTokens
    repository: str
    url: str
    headers: Headers
    credentials: Credentials
    scope: str

    async def fetch(self, method: bytes, headers: Headers | None = None) -> tuple[IResponse, str]:
        return await from_upstream(
            self.upstream,
            self.tokens,
            method,
            self.url,
            headers if headers is not None else self.headers.copy(),
            None,
            self.credentials,
            self.scope,
        )


def identity(credentials: Credentials, headers: Headers) -> tuple[str, float]:
    """Who is asking, for the rights memory: the proxy's own identity, or a hash of the client's credential.

    @return: the key and how long a "may read" learnt for it is believed (at
        most the token's lifetime when it says, a minute otherwise).
    """
    if credentials is not Credentials.CLIENT:
        return "proxy", 300.0
    value = (headers.getRawHeaders(b"authorization") or [b""])[0]
    key = "client:" + hashlib.sha256(value).hexdigest()[:32]
    return key, _token_lifetime(value)


def _token_lifetime(authorization: bytes, now: float | None = None) -> float:
    import time

    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or token.count(b".") != 2:
        return 60.0
    try:
        claims = json.loads(base64.urlsafe_b64decode(token.split(b".")[1] + b"=="))
        left = float(claims["exp"]) - (time.time() if now is None else now)
    except (ValueError, KeyError, TypeError):
        return 60.0
    return max(0.0, min(left, 300.0))


class BlobCache:
    """Blobs from the store, shared fills, auth-aware hits."""

    log = Logger()

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        idle_timeout: float = 120.0,
        sync: Callable[[int], Awaitable[None]] | None = None,
        response_timeout: float = 60.0,
        rights: Rights | None = None,
        sender: Any = None,
    ) -> None:
        self.store = store
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._sync = sync
        self._response_timeout = response_timeout
        #: Fills running here, by digest.
        self._fills: dict[str, Growing] = {}
        #: Fills being started here (waiting for the upstream's head), by digest.
        self._starting: dict[str, list[Deferred[Growing | None]]] = {}
        self.rights = rights or Rights(clock)
        #: sendfile(2) for complete blobs on plain TCP (None: the file producer always).
        self.sender = sender
        self.counts: dict[str, int] = {"hit": 0, "stored": 0, "collapsed": 0, "passed": 0, "resumed": 0}
        self.metrics: Any = None

    # rights

    def note_readable(self, who: str, ttl: float, upstream: str, repository: str) -> None:
        """The upstream just let C{who} read C{repository} (a 200 for it)."""
        self.rights.note(who, ttl, upstream, repository)

    async def _may_read(self, origin: Origin, digest: str) -> bool:
        who, ttl = identity(origin.credentials, origin.headers)
        name = origin.upstream.name
        if self.rights.known(who, name, origin.repository) and self.store.linked(name, origin.repository, digest):
            return True
        # Ask the upstream, as this client: does this repository hold this blob, for you?
        headers = origin.headers.copy()
        for header in _CONDITIONAL:
            headers.removeHeader(header)
        response, _ = await origin.fetch(b"HEAD", headers)
        discard(response)
        if response.code != 200:
            return False
        self.store.link(name, origin.repository, digest)
        self.note_readable(who, ttl, name, origin.repository)
        return True

    # serving

    async def serve(self, origin: Origin, digest: str, method: bytes) -> tuple[IResponse, str]:
        """The answer to a blob GET or HEAD, and its C{Cache-Status}."""
        answer, status = await self._serve(origin, digest, method)
        if self.metrics is not None:
            self.metrics.cache.labels(origin.upstream.name, "blob", cache_label(status)).inc()
        return answer, status

    async def _serve(self, origin: Origin, digest: str, method: bytes) -> tuple[IResponse, str]:
        if split_digest(digest) is None:
            return await self._pass(origin, method, "regproxy; fwd=uri-miss")
        blob = self.store.complete(digest)
        if blob is not None:
            if await self._may_read(origin, digest):
                self.counts["hit"] += 1
                return self._answer(blob, None, origin, method, HIT), HIT
            return await self._pass(origin, method, "regproxy; fwd=request")
        growing, tried = await self._running(digest)
        if growing is not None:
            if await self._may_read(origin, digest):
                self.counts["collapsed"] += 1
                return self._answer(None, growing, origin, method, COLLAPSED), COLLAPSED
            return await self._pass(origin, method, "regproxy; fwd=request")
        if method != b"GET" or tried:
            return await self._pass(origin, method, "regproxy; fwd=miss")
        return await self._start(origin, digest)

    async def _pass(self, origin: Origin, method: bytes, status: str) -> tuple[IResponse, str]:
        response, _ = await origin.fetch(method)
        self.counts["passed"] += 1
        if response.code != 200:
            status += f"; fwd-status={response.code}"
        response.headers.setRawHeaders(b"cache-status", [status.encode("ascii")])
        return response, status

    async def _running(self, digest: str) -> tuple[Growing | None, bool]:
        """A fill of C{digest} in flight here or in another worker, if any.

        @return: the fill, and whether a fill was just tried here and didn't
            start (the upstream refused that request: ask again uncached).
        """
        waiting = self._starting.get(digest)
        if waiting is not None:
            waiter: Deferred[Growing | None] = Deferred()
            waiting.append(waiter)
            found = await waiter
            return found, found is None
        local = self._fills.get(digest)
        if isinstance(local, RemoteFill) and (local.verified or local.failure is not None):
            del self._fills[digest]  # over: look again
            local = None
        if local is not None and local.failure is None:
            return local, False
        return self._remote(digest), False

    def _remote(self, digest: str) -> Growing | None:
        """A fill running in another worker process (its partial is locked and sized)."""
        path = self.store.partial_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            info = self.store.fill_info(digest)
            if info is not None:
                remote = RemoteFill(self.store, digest, info[0], info[1], self._clock)
                self._fills[digest] = remote
                self.log.info("cache: following the fill of {digest} in another worker", digest=digest)
                return remote
        finally:
            os.close(fd)
        return None

    async def prefetch(self, origin: Origin, digest: str) -> None:
        """Start the fill of a blob no client asked for yet (an image's layers, on its manifest's miss)."""
        if split_digest(digest) is None or self.store.complete(digest) is not None:
            return
        if digest in self._starting or digest in self._fills:
            return
        response, status = await self._start(origin, digest, reader=False)
        if response is not None:
            discard(response)
        elif status == STORED and self.metrics is not None:
            self.metrics.cache.labels(origin.upstream.name, "blob", "prefetched").inc()

    async def _start(self, origin: Origin, digest: str, reader: bool = True) -> tuple[IResponse, str]:
        """This request is the first for a cold blob: fetch it into a fill and read that.

        Without C{reader} (a prefetch) nobody reads: the answer is C{None} once
        the fill runs, or the upstream's refusal to discard.
        """
        waiters: list[Deferred[Growing | None]] = []
        self._starting[digest] = waiters
        fill: Fill | None = None
        try:
            fd = self._claim(digest)
            if fd is None and not reader:
                self._release(waiters, None)
                return None, "regproxy; fwd=miss"  # type: ignore[return-value]
            if fd is None:
                remote = await self._await_remote(digest)
                if remote is not None and await self._may_read(origin, digest):
                    self._release(waiters, remote)
                    return self._answer(None, remote, origin, method=b"GET", status=COLLAPSED), COLLAPSED
                self._release(waiters, None)
                return await self._pass(origin, b"GET", "regproxy; fwd=miss")
            headers = origin.headers.copy()
            for header in _CONDITIONAL:
                headers.removeHeader(header)
            try:
                response, _ = await origin.fetch(b"GET", headers)
            except BaseException:
                self._unclaim(digest, fd)
                raise
            size = response.length
            if response.code != 200 or size is UNKNOWN_LENGTH or not self.store.room_for(size):
                self._unclaim(digest, fd)
                self._release(waiters, None)
                if response.code == 200 and any(origin.headers.hasHeader(h) for h in _CONDITIONAL):
                    # Not cacheable after all (too big, no length): the client's own request,
                    # Range and all, goes upstream, so a range never gets the whole blob.
                    discard(response)
                    return await self._pass(origin, b"GET", "regproxy; fwd=miss")
                status = "regproxy; fwd=miss" + (f"; fwd-status={response.code}" if response.code != 200 else "")
                response.headers.setRawHeaders(b"cache-status", [status.encode("ascii")])
                self.counts["passed"] += 1
                return response, status

            async def resume(offset: int) -> IResponse:
                self.counts["resumed"] += 1
                again = headers.copy()
                again.setRawHeaders(b"range", [b"bytes=%d-" % offset])
                resumed, _ = await origin.fetch(b"GET", again)
                return resumed

            media = (response.headers.getRawHeaders(b"content-type") or [b"application/octet-stream"])[0]
            fill = Fill(self.store, digest, fd, self._clock, resume, self._idle_timeout, sync=self._sync)
            fill.upstream = origin.upstream.name
            fill.start(response, size, media.decode("latin-1"))
            self._fills[digest] = fill
            fill.done.addBoth(self._fill_over, digest, fill)
            who, ttl = identity(origin.credentials, origin.headers)
            self.store.link(origin.upstream.name, origin.repository, digest)
            self.note_readable(who, ttl, origin.upstream.name, origin.repository)
            self._release(waiters, fill)
            self.counts["stored"] += 1
            if not reader:
                return None, STORED  # type: ignore[return-value]
            return self._answer(None, fill, origin, b"GET", STORED), STORED
        finally:
            if self._starting.get(digest) is waiters:
                del self._starting[digest]
                self._release(waiters, None)

    def _claim(self, digest: str) -> int | None:
        """Open and lock the partial file: this process fills. C{None}: another worker does."""
        path = self.store.partial_path(digest)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)  # a dead fill's leftovers, if any
                return fd
            os.close(fd)  # it was replaced meanwhile; try again

    def _unclaim(self, digest: str, fd: int) -> None:
        self.store.discard_partial(digest)
        os.close(fd)

    async def _await_remote(self, digest: str) -> Growing | None:
        """Another worker holds the partial: wait (bounded) until it knows the blob's size."""
        waited = 0.0
        while waited < self._response_timeout:
            remote = self._remote(digest)
            if remote is not None:
                return remote
            if not self.store.partial_path(digest).exists():
                return None
            d: Deferred[None] = Deferred()
            self._clock.callLater(0.02, d.callback, None)
            await d
            waited += 0.02
        return None

    @staticmethod
    def _release(waiters: list[Deferred[Growing | None]], result: Growing | None) -> None:
        pending = list(waiters)
        waiters.clear()
        for waiter in pending:
            if not waiter.called:
                waiter.callback(result)

    def _fill_over(self, result: Any, digest: str, fill: Fill) -> Any:
        if self._fills.get(digest) is fill:
            del self._fills[digest]
        if self.metrics is not None:
            self.metrics.upstream_bytes.labels(fill.upstream, "blob").inc(fill.written)
            if fill.resumes:
                self.metrics.resumes.inc(fill.resumes)
        if isinstance(result, Failure):
            self.log.failure("cache: fill of {digest} ended badly", result, digest=digest)
        return None

    def _answer(
        self, blob: Blob | None, growing: Growing | None, origin: Origin, method: bytes, status: str
    ) -> IResponse:
        """A FileAnswer for the whole blob or the client's range, from the store or a fill."""
        size = blob.size if blob is not None else growing.size  # type: ignore[union-attr]
        media_type = blob.media_type if blob is not None else growing.media_type  # type: ignore[union-attr]
        digest = blob.digest if blob is not None else growing.digest  # type: ignore[union-attr]
        try:
            ranges = origin.headers.getRawHeaders(b"range")
            span = parse_range(ranges[0] if ranges else None, size)
        except Unsatisfiable:
            headers = Headers({b"content-range": [b"bytes */%d" % size], b"cache-status": [status.encode()]})
            headers.setRawHeaders(b"content-length", [b"0"])
            return FileAnswer(416, headers, 0, None)  # type: ignore[return-value]
        headers = blob_headers(digest, media_type, size, span, status)
        length = size if span is None else span.length
        code = 200 if span is None else 206
        if method == b"HEAD":
            return FileAnswer(code, headers, length, None)  # type: ignore[return-value]
        first, last = (0, size - 1) if span is None else (span.first, span.last)
        fd, on_close = self._open(blob, growing, digest)
        source = None if blob is not None or (growing is not None and growing.verified) else growing
        body = FileBody(fd, first, last, source, on_close)
        return FileAnswer(code, headers, length, body, self.sender if source is None else None)  # type: ignore[return-value]

    def _open(self, blob: Blob | None, growing: Growing | None, digest: str) -> tuple[int, Callable[[], None]]:
        if blob is None:
            try:
                fd = os.open(self.store.partial_path(digest), os.O_RDONLY)
                return fd, lambda: os.close(fd)
            except FileNotFoundError:
                found = self.store.complete(digest)  # verified and renamed meanwhile
                if found is None:
                    raise
                blob = found
        fd = self.store.open_for_reading(blob)
        return fd, lambda: self.store.done_reading(digest, fd)
