"""Cache hits on a plain-TCP listener: the kernel copies the file to the socket (C{sendfile(2)}).

A hit is a file, and on plain TCP the fastest way to send a file is not to
read it at all. Twisted has no sendfile, so the answer is sent outside its
write buffer, by a worker thread that owns a duplicate of the socket for the
duration of this one answer: the response head first, then the file with
C{os.sendfile}, waiting for the socket to drain with C{poll} (backpressure
from the kernel: a slow client parks the thread, nothing piles up in memory).
The reactor thread does not write to the connection meanwhile: HTTP/1.1
answers on a connection are sequential, and this one isn't finished until
the thread is done.

Used only for complete blobs on plain-TCP connections (TLS needs the bytes in
user space; a fill's readers follow a growing file), and only while a thread
of the bounded pool is free: otherwise the file producer serves the hit.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Any

from twisted.internet import threads
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Request

log = Logger()

_CHUNK = 16 << 20


class ClientGone(Exception):
    """The client stopped reading or disconnected during a sendfile answer.

    @ivar sent: body bytes that went out before.
    """

    sent = 0


def socket_of(request: Request) -> socket.socket | None:
    """The plain-TCP socket of the request's connection, or C{None} (TLS, in-memory, gone)."""
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if transport is None or ISSLTransport.providedBy(transport):
        return None
    handle = getattr(transport, "getHandle", None)
    sock = handle() if handle is not None else None
    return sock if isinstance(sock, socket.socket) else None


def response_head(request: Request) -> bytes:
    """The status line and headers twisted.web would have written for this answer."""
    lines = [b"%s %d %s\r\n" % (request.clientproto, request.code, request.code_message)]
    for name, values in request.responseHeaders.getAllRawHeaders():
        for value in values:
            lines.append(name + b": " + value + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class Sendfile:
    """A bounded pool of threads that send cache hits with sendfile."""

    def __init__(self, reactor: Any, threads_max: int = 64, stall_timeout: float = 120.0) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads_max, name="regproxy-sendfile")
        self._max = threads_max
        self._busy = 0
        self._timeout = stall_timeout
        self._started = False
        self.metrics: Any = None

    def available(self) -> bool:
        return self._busy < self._max

    def stop(self) -> None:
        if self._started:
            self._pool.stop()
            self._started = False

    async def send(self, request: Request, sock: socket.socket, fd: int, offset: int, count: int) -> None:
        """Send the answer's head and C{count} bytes of C{fd} from C{offset}; finish the request.

        @raise ClientGone: the client went away or stopped reading; the request is not finished.
        """
        if not self._started:
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
            self._started = True
        head = response_head(request)
        request.startedWriting = 1  # the head goes out from the thread, not from twisted.web
        out = os.dup(sock.fileno())
        self._busy += 1
        try:
            sent = await threads.deferToThreadPool(
                self._reactor, self._pool, _send, out, head, fd, offset, count, self._timeout
            )
        except ClientGone as e:
            request.sentLength += e.sent
            raise
        finally:
            self._busy -= 1
            os.close(out)
        request.sentLength += sent
        if self.metrics is not None:
            self.metrics.sendfile.inc()
        if getattr(request, "channel", None) is not None and not request.finished:
            request.finish()


def _wait_writable(poller: select.poll, timeout: float) -> None:
    events = poller.poll(timeout * 1000)
    if not events:
        raise ClientGone(f"client read nothing for {timeout:g}s")
    for _, event in events:
        if event & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            raise ClientGone("connection closed")


def _send(out: int, head: bytes, fd: int, offset: int, count: int, timeout: float) -> int:
    """In a pool thread: the head, then the file, as fast as the socket drains. Returns body bytes sent."""
    poller = select.poll()
    poller.register(out, select.POLLOUT)
    view = memoryview(head)
    sent = 0
    try:
        while view:
            try:
                view = view[os.write(out, view) :]
            except BlockingIOError:
                _wait_writable(poller, timeout)
        while sent < count:
            try:
                n = os.sendfile(out, fd, offset + sent, min(count - sent, _CHUNK))
            except BlockingIOError:
                _wait_writable(poller, timeout)
                continue
            if n == 0:
                raise ClientGone("the cache file ended early")
            sent += n
        return sent
    except (BrokenPipeError, ConnectionResetError) as e:
        gone = ClientGone(str(e))
        gone.sent = sent
        raise gone from e
    except ClientGone as e:
        e.sent = sent
        raise
