"""Serving a blob from the store: an upstream-shaped answer whose body is a file.

L{FileAnswer} looks to the relay like an upstream response (code, headers,
length, C{deliverBody}), so the relay doesn't know who answered. Its body is
read from the file at the client's pace: the L{BodyPipe} pauses and resumes
it like an upstream socket, so memory stays flat for any number of clients.
A body that follows a fill still being written waits for more bytes when it
catches up, and never delivers its last byte before the fill is verified.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ..errors import API_VERSION_HEADER
from ..pipe import ClientLeft
from ..ranges import ByteRange
from .fill import Growing

CHUNK = 256 << 10


@implementer(IPushProducer)
class FileBody:
    """Bytes C{first}..C{last} of a file (complete, or growing under C{source}) to one protocol.

    @param on_close: called once when the body is over (delivered, failed or stopped).
    """

    def __init__(
        self,
        fd: int,
        first: int,
        last: int,
        source: Growing | None,
        on_close: Callable[[], None],
        chunk: int = CHUNK,
    ) -> None:
        self._fd = fd
        self._pos = first
        self._end = last + 1
        self._source = source
        self._on_close = on_close
        self._chunk = chunk
        self._protocol: Protocol | None = None
        self._paused = False
        self._waiting = False
        self._closed = False
        self._in_loop = False
        if source is not None:
            source.attach()

    def deliver(self, protocol: Protocol) -> None:
        self._protocol = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]
        self._pump()

    # IPushProducer, driven by the client side (through the BodyPipe)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._close(Failure(ClientLeft("the client went away")))

    # the reading loop

    def _deliverable(self) -> int:
        """Up to where bytes may go out now (exclusive)."""
        source = self._source
        if source is None or source.verified:
            return self._end
        # Unverified: whatever is written, but never the last byte of this body.
        return min(source.written, self._end - 1)

    def _pump(self) -> None:
        if self._in_loop or self._closed or self._protocol is None:
            return
        self._in_loop = True
        try:
            while not self._paused and not self._closed:
                source = self._source
                if source is not None and source.failure is not None:
                    self._close(source.failure)
                    return
                if self._pos >= self._end:
                    if source is None or source.verified:
                        self._close(Failure(ResponseDone()))
                        return
                limit = self._deliverable()
                if self._pos >= limit:
                    self._wait()
                    return
                data = self._from_tail(source, limit)
                if not data:
                    try:
                        data = os.pread(self._fd, min(self._chunk, limit - self._pos), self._pos)
                    except OSError as e:
                        self._close(Failure(e))
                        return
                if not data:
                    self._close(Failure(EOFError("cache file shorter than its index says")))
                    return
                self._pos += len(data)
                self._protocol.dataReceived(data)
        finally:
            self._in_loop = False

    def _from_tail(self, source: Growing | None, limit: int) -> bytes:
        """Right behind a fill: its last chunk, still in memory, instead of reading the file back."""
        if source is None or not source.tail:
            return b""
        start = self._pos - source.tail_at
        if start < 0 or start >= len(source.tail):
            return b""
        end = min(limit - source.tail_at, len(source.tail))
        if start == 0 and end == len(source.tail):
            return source.tail
        return source.tail[start:end]

    def _wait(self) -> None:
        if not self._waiting and self._source is not None:
            self._waiting = True
            self._source.listen(self._more)

    def _more(self) -> None:
        self._waiting = False
        self._pump()

    def _close(self, reason: Failure | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._source is not None:
            if self._waiting:
                self._source.unlisten(self._more)
            self._source.detach()
        self._on_close()
        protocol = self._protocol
        if protocol is not None and reason is not None:
            protocol.connectionLost(reason)


class FileAnswer:
    """An IResponse-like answer from the cache: the relay streams it like an upstream's."""

    version = (b"HTTP", 1, 1)
    previousResponse = None
    request = None

    def __init__(
        self,
        code: int,
        headers: Headers,
        length: int,
        body: FileBody | None,
        sender: Any = None,
    ) -> None:
        self.code = code
        self.phrase = {200: b"OK", 206: b"Partial Content", 416: b"Range Not Satisfiable"}.get(code, b"OK")
        self.headers = headers
        self.length = length
        self._body = body
        #: The sendfile pool, for a complete blob (None: always through the file producer).
        self._sender = sender

    def send_directly(self, request: Any) -> Deferred[None] | None:
        """Send the body with sendfile(2) if the connection and the pool allow; C{None} if not."""
        body = self._body
        if self._sender is None or body is None or body._source is not None or not self._sender.available():
            return None
        from .sendfile import socket_of

        sock = socket_of(request)
        if sock is None:
            return None

        async def send() -> None:
            try:
                await self._sender.send(request, sock, body._fd, body._pos, body._end - body._pos)
            finally:
                body._close(None)

        return Deferred.fromCoroutine(send())

    def deliverBody(self, protocol: Any) -> None:
        if self._body is None:
            protocol.makeConnection(_NoTransport())
            protocol.connectionLost(Failure(ResponseDone()))
            return
        self._body.deliver(protocol)


class BytesAnswer:
    """An IResponse-like answer with a small body in memory (a manifest)."""

    version = (b"HTTP", 1, 1)
    previousResponse = None
    request = None

    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b""
        self.headers = headers
        self.length = len(body)
        self._body = body
        #: Read by the relay, which writes it at once instead of piping it.
        self.in_memory = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(_NoTransport())
        if self._body:
            protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


@implementer(IPushProducer)
class _NoTransport:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def blob_headers(digest: str, media_type: str, size: int, span: ByteRange | None, status: str) -> Headers:
    """The headers of a blob answered from the cache (the same whether hit or fill)."""
    headers = Headers(
        {
            b"content-type": [media_type.encode("latin-1")],
            b"docker-content-digest": [digest.encode("ascii")],
            b"accept-ranges": [b"bytes"],
            b"etag": [b'"' + digest.encode("ascii") + b'"'],
            b"cache-status": [status.encode("ascii")],
            API_VERSION_HEADER[0]: API_VERSION_HEADER[1],
        }
    )
    if span is not None:
        headers.setRawHeaders(b"content-range", [span.content_range()])
    # The relay frames GET bodies itself; for HEAD it passes this length on.
    headers.setRawHeaders(b"content-length", [b"%d" % (size if span is None else span.length)])
    return headers
