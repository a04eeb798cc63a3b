"""A fill: the one upstream fetch of a blob into its partial file.

Every client that wants the blob meanwhile reads the partial file at its own
pace (L{regproxy.cache.reader}); the fill only writes, at the upstream's pace,
so a slow client slows neither the fill nor the others, and nothing is held in
memory. The bytes are hashed as they are written; the blob is renamed into the
store only when digest and length match. Until then no reader may finish (each
holds back its last byte), so a wrong blob reaches every client as a failed
transfer, never as a complete one.

If the upstream breaks off, the fill resumes with a C{Range} request from the
byte it reached (a bounded number of times; the caller supplies the request,
with a fresh token and redirect). Readers notice only a pause.

Readers in other worker processes follow the same partial file: its exclusive
C{flock} says a fill is alive, the rename into the store says it is verified.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from .store import Store


class FillFailed(Exception):
    """The blob could not be fetched whole and right; readers must drop their clients."""


class Growing:
    """What a reader follows: bytes written so far, and whether they are verified.

    @ivar tail: the last chunk written, at offset C{tail_at}: a reader that is
        right behind the fill takes its bytes from here rather than reading the
        file back (it is in memory anyway, until the next chunk replaces it).
    """

    size: int
    media_type: str
    written: int = 0
    verified: bool = False
    failure: Failure | None = None
    tail: bytes = b""
    tail_at: int = 0

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []

    def listen(self, callback: Callable[[], None]) -> None:
        """Call C{callback} once, at the next change (more bytes, verified, failed)."""
        self._listeners.append(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        try:
            self._listeners.remove(callback)
        except ValueError:
            pass

    def _changed(self) -> None:
        listeners, self._listeners = self._listeners, []
        for callback in listeners:
            callback()

    def attach(self) -> None:
        """A reader starts following."""

    def detach(self) -> None:
        """A reader stopped following."""


class Fill(Growing):
    """The local fill of one digest: writes the partial file, verifies, commits.

    @ivar done: fires when the fill is over (verified and committed, or failed).
    @ivar resumes: how many times the upstream body was resumed with a Range.
    """

    log = Logger()

    def __init__(
        self,
        store: Store,
        digest: str,
        fd: int,
        clock: IReactorTime,
        resume: Callable[[int], Awaitable[IResponse]],
        idle_timeout: float = 120.0,
        max_resumes: int = 3,
        sync: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.digest = digest
        self.algorithm = digest.partition(":")[0]
        self._expected = digest.partition(":")[2]
        self._hash = hashlib.new(self.algorithm)
        self._fd = fd
        self._clock = clock
        self._resume = resume
        self._idle_timeout = idle_timeout
        self._max_resumes = max_resumes
        self._sync = sync
        self.resumes = 0
        self.readers = 0
        #: The upstream it is fetched from (for metrics).
        self.upstream = "-"
        self.size = 0
        self.media_type = "application/octet-stream"
        self.done: Deferred[None] = Deferred()
        self._protocol: _FillProtocol | None = None
        self._abandoned = False

    # the upstream side

    def start(self, response: IResponse, size: int, media_type: str) -> None:
        """Begin writing the upstream's 200 body of C{size} bytes."""
        self.size = size
        self.media_type = media_type
        self.store.write_fill_info(self.digest, size, media_type)
        self._take(response, 0)

    def _take(self, response: IResponse, skip: int) -> None:
        self._protocol = _FillProtocol(self, skip)
        response.deliverBody(self._protocol)

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.size:
            self._fail(FillFailed(f"upstream sent more than the {self.size} bytes it announced"))
            return
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            self.store.degraded(e)
            self._fail(FillFailed(f"cannot write the cache: {e.strerror}"))
            return
        self._hash.update(data)
        self.tail, self.tail_at = data, self.written
        self.written += len(data)
        self._changed()

    def body_ended(self, reason: Failure) -> None:
        """The upstream body ended: complete, cut (resume), or refused."""
        self._protocol = None
        if self.failure is not None or self._abandoned:
            return
        if self.written == self.size:
            Deferred.fromCoroutine(self._verify()).addErrback(self._fail_failure)
            return
        if self.resumes >= self._max_resumes:
            self._fail(FillFailed(f"upstream broke off at {self.written} of {self.size} bytes: {reason.getErrorMessage()}"))
            return
        self.resumes += 1
        self.log.info(
            "cache: {digest} broke off at {written}/{size} ({why}); resuming",
            digest=self.digest,
            written=self.written,
            size=self.size,
            why=reason.getErrorMessage(),
        )
        Deferred.fromCoroutine(self._resumed()).addErrback(self._fail_failure)

    async def _resumed(self) -> None:
        offset = self.written
        response = await self._resume(offset)
        if self.failure is not None or self._abandoned:
            response.deliverBody(_Discard())
            return
        if response.code == 206:
            expected = b"bytes %d-%d/%d" % (offset, self.size - 1, self.size)
            if response.headers.getRawHeaders(b"content-range", [b""])[0].strip() != expected:
                response.deliverBody(_Discard())
                raise FillFailed("upstream answered the resume with another range")
            self._take(response, 0)
        elif response.code == 200 and response.length == self.size:
            self._take(response, offset)  # it ignored Range: skip what we have
        else:
            response.deliverBody(_Discard())
            raise FillFailed(f"upstream refused to resume ({response.code})")

    async def _verify(self) -> None:
        if self._hash.hexdigest() != self._expected:
            raise FillFailed(f"upstream sent bytes whose {self.algorithm} is not {self.digest}")
        if self._sync is not None:
            await self._sync(self._fd)
        self.store.commit(self.digest, self.size, self.media_type)
        self._close()
        self.verified = True
        self.log.info("cache: stored {digest} ({size} bytes)", digest=self.digest, size=self.size)
        self._changed()
        self.done.callback(None)

    def _fail_failure(self, failure: Failure) -> None:
        self._fail(failure.value if isinstance(failure.value, Exception) else FillFailed(str(failure.value)))

    def _fail(self, error: Exception) -> None:
        if self.failure is not None or self.verified:
            return
        self.log.warn("cache: not storing {digest}: {error}", digest=self.digest, error=error)
        self.failure = Failure(error)
        if self._protocol is not None:
            self._protocol.stop()
        self.store.discard_partial(self.digest)
        self._close()
        self._changed()
        self.done.callback(None)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock: other workers see the fill is over
            self._fd = -1

    # readers

    def attach(self) -> None:
        self.readers += 1

    def detach(self) -> None:
        """A reader left; with none left, a fill far from done is abandoned."""
        self.readers -= 1
        if self.readers > 0 or self.verified or self.failure is not None:
            return
        remaining = self.size - self.written
        if self.written * 2 < self.size and remaining > 64 << 20:
            self._abandoned = True
            self._fail(FillFailed("every client left a fill far from done"))

    # the idle timer (the fill's own: readers have theirs)

    def _arm(self) -> IDelayedCall | None:
        if self._idle_timeout <= 0:
            return None
        return self._clock.callLater(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        if self._protocol is not None:
            self._protocol.timed_out(self._idle_timeout)


class _FillProtocol(Protocol):
    """Receives one upstream body for a fill (skipping C{skip} bytes a Range-ignoring upstream resends)."""

    def __init__(self, fill: Fill, skip: int) -> None:
        self._fill = fill
        self._skip = skip
        self._timer: IDelayedCall | None = None
        self._stopped = False

    def connectionMade(self) -> None:
        self._timer = self._fill._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._fill._idle_timeout)
        if self._skip:
            cut = min(self._skip, len(data))
            self._skip -= cut
            data = data[cut:]
            if not data:
                return
        self._fill.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._stopped:
            self._stopped = True
            self._fill.body_ended(reason)

    def timed_out(self, seconds: float) -> None:
        """The upstream went silent: give up on this body (the fill resumes)."""
        self._timer = None
        transport: Any = self.transport
        self._stopped = True
        if transport is not None:
            transport.stopProducing()
        self._fill.body_ended(Failure(FillFailed(f"upstream silent for {seconds}s")))

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        transport: Any = self.transport
        if transport is not None:
            producer: IPushProducer = transport
            producer.stopProducing()


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class RemoteFill(Growing):
    """A fill running in another worker process, followed by polling its partial file.

    It holds no file of its own: each poll looks at the partial's size, at
    whether the blob has been committed, and (when nothing moved) at whether
    the filler still holds the partial's lock.
    """

    POLL = 0.02

    def __init__(self, store: Store, digest: str, size: int, media_type: str, clock: IReactorTime) -> None:
        super().__init__()
        self.store = store
        self.digest = digest
        self.size = size
        self.media_type = media_type
        self._clock = clock
        self._timer: IDelayedCall | None = None
        self.readers = 0

    def listen(self, callback: Callable[[], None]) -> None:
        super().listen(callback)
        if self._timer is None:
            self._timer = self._clock.callLater(self.POLL, self._poll)

    def _poll(self) -> None:
        self._timer = None
        if self.failure is not None or self.verified:
            return
        if self.store.complete(self.digest) is not None:
            self.written = self.size
            self.verified = True
        else:
            try:
                written = os.stat(self.store.partial_path(self.digest)).st_size
            except FileNotFoundError:
                written = -1
            if written > self.written:
                self.written = min(written, self.size)
            elif not self._alive():
                self.failure = Failure(FillFailed("the worker filling this blob stopped"))
            else:
                if self._listeners:
                    self._timer = self._clock.callLater(self.POLL, self._poll)
                return
        self._changed()

    def _alive(self) -> bool:
        """Whether a filling process still holds its lock on the partial (or has just committed)."""
        try:
            fd = os.open(self.store.partial_path(self.digest), os.O_RDONLY)
        except FileNotFoundError:
            return self.store.complete(self.digest) is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return self.store.complete(self.digest) is not None

    def attach(self) -> None:
        self.readers += 1

    def detach(self) -> None:
        self.readers -= 1
        if self.readers <= 0 and self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None
