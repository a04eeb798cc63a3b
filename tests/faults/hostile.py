"""A scriptable hostile upstream: a raw-socket HTTP/1.1 server for fault-injection tests.

The real upstreams in :mod:`tests.upstream` (distribution, nginx) behave; the faults
regproxy must survive are the ones they never produce: a body cut off after N bytes,
an upstream that stalls before its head or halfway through a layer, wrong bytes under
the right length, rate-limit answers, redirects to places the proxy must not dial,
challenges naming foreign realms, hostile headers.  This server produces them on
purpose, on a real socket, so the proxy's real network code (Twisted's HTTP client,
TLS, connection pooling) is what gets exercised.

It is deliberately not built on :mod:`http.server`: that module normalises exactly the
things a hostile peer gets wrong (framing, header encoding, how a connection ends).
Here every byte on the wire is chosen by the test.

Use::

    with HostileServer() as up, Sink() as cdn:
        up.route("GET", r"/v2/", v2_base())
        up.route("GET", r"/v2/.+/blobs/.+", redirect(cdn.url + "/blob"))
        ...  # point the proxy at up.url, pull through it
        assert not cdn.contacted
        assert all(r.header("Authorization") is None for r in up.requests())

Routes are tried newest first (so a test can override what a fixture set up), then
the optional handler callable, then the default (404 with an OCI error body).
Every request that reached the server is recorded, before its behaviour runs, in
:meth:`HostileServer.requests`.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import http
import json
import os
import re
import socket
import ssl
import struct
import termios
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from tests.upstream.pki import PKIFiles

#: A header name or value: ``str`` is sent UTF-8 encoded, ``bytes`` exactly as given
#: (raw non-ASCII, CR/LF injection, whatever the test needs).
Text = str | bytes
Header = tuple[Text, Text]
Headers = Sequence[Header]
#: How long to stall: seconds, or until a :class:`threading.Event` is set.
Wait = float | threading.Event

T = TypeVar("T")

#: The cloud metadata address, a classic target for a redirect-following SSRF.
LINK_LOCAL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"

#: Docker Hub's rate-limit header values (a 100-pull window of six hours).
HUB_RATELIMIT_LIMIT = "100;w=21600"
HUB_RATELIMIT_EXHAUSTED = "0;w=21600"


class Framing(enum.Enum):
    """How a response body's end is signalled; each one fails differently when cut off."""

    #: ``Content-Length``: a short body is detectable by counting.
    LENGTH = "content-length"
    #: ``Transfer-Encoding: chunked``: a short body lacks the terminating ``0`` chunk.
    CHUNKED = "chunked"
    #: Neither: the body ends when the server closes, so a FIN mid-body looks like a
    #: clean end (only an RST, or TLS without ``close_notify``, gives it away).
    CLOSE = "close-delimited"


class Abort(enum.Enum):
    """How the server ends a connection."""

    #: TCP FIN without a TLS ``close_notify``: an upstream that died or was cut off.
    FIN = "fin"
    #: TCP RST (``SO_LINGER`` 0) after the bytes already written have reached the peer.
    RST = "rst"
    #: TLS ``close_notify`` then FIN (plain TCP: just FIN): a deliberate, clean close.
    CLOSE_NOTIFY = "close-notify"


class _Closing(Exception):
    """The server is shutting down while a behaviour was waiting; end the connection."""


class _BadRequest(Exception):
    """The peer sent something that is not an HTTP/1.1 request."""


def _encode(text: Text) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


@dataclass(frozen=True)
class Request:
    """One request as it reached the server; headers are exact, in order, latin-1 decoded.

    latin-1 keeps every byte recoverable (``value.encode("latin-1")``), so a test can
    assert on raw non-ASCII bytes the proxy forwarded.
    """

    method: str
    #: The request target exactly as sent: path and query.
    target: str
    version: str
    headers: list[tuple[str, str]]
    #: The decoded body (empty when the server was built with ``keep_bodies=False``).
    body: bytes
    body_length: int
    client_port: int
    #: ``time.monotonic()`` when the request (head and body) had been read.
    time: float
    #: Index of the connection it came on, in accept order (same index: same connection).
    connection: int
    tls: bool

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header_values(self, name: str) -> list[str]:
        """All values of a header, case-insensitively, in order."""
        lowered = name.lower()
        return [v for k, v in self.headers if k.lower() == lowered]

    def header(self, name: str) -> str | None:
        """The first value of a header, or ``None`` when it did not reach the server."""
        values = self.header_values(name)
        return values[0] if values else None


@dataclass
class ConnectionInfo:
    """One accepted TCP connection: whether (and when) it is still open, what came on it."""

    index: int
    client_port: int
    opened: float
    closed: float | None = None
    requests: int = 0
    tls_error: str | None = None


Behaviour = Callable[["Exchange"], None]
Handler = Callable[[Request], Behaviour | None]


class Exchange:
    """What a behaviour gets: the request and the means to write raw bytes and end the connection."""

    def __init__(self, server: HostileServer, conn: _Connection, request: Request, keep_alive: bool) -> None:
        self.server = server
        self.request = request
        #: Whether the connection may carry another request after this one; a behaviour
        #: may clear it (the server then closes cleanly after the behaviour returns).
        self.keep_alive = keep_alive
        self._conn = conn

    @property
    def closed(self) -> bool:
        return self._conn.finished

    def send(self, data: bytes) -> None:
        """Write bytes as they are."""
        if data:
            self._conn.sock.sendall(data)

    def send_head(self, status: int, headers: Headers = (), reason: Text | None = None) -> None:
        """Write a status line and headers (no framing headers are added here)."""
        if reason is None:
            try:
                reason = http.HTTPStatus(status).phrase
            except ValueError:
                reason = "Unknown"
        lines = [b"HTTP/1.1 %d %s" % (status, _encode(reason))]
        lines += [_encode(k) + b": " + _encode(v) for k, v in headers]
        self.send(b"\r\n".join(lines) + b"\r\n\r\n")

    def wait(self, how: Wait) -> bool:
        """Stall; ``False`` when the server is closing or an event stall hit ``max_stall``."""
        closing = self.server._closing
        if isinstance(how, threading.Event):
            deadline = time.monotonic() + self.server.max_stall
            while not how.wait(0.02):
                if closing.is_set() or time.monotonic() > deadline:
                    return False
            return True
        return not closing.wait(float(how))

    def end(self, abort: Abort = Abort.CLOSE_NOTIFY) -> None:
        """End the connection the given way; the server stops reading requests from it."""
        self._conn.finish(abort, self.server.linger)


def _outq(sock: socket.socket) -> int:
    """Bytes written but not yet acknowledged by the peer (Linux ``SIOCOUTQ``)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


class _Connection:
    """Server side of one accepted connection; owned by its thread, killable by close()."""

    def __init__(self, sock: socket.socket, info: ConnectionInfo) -> None:
        self.sock = sock
        self.info = info
        self.finished = False
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def kill(self) -> None:
        """Unblock the owning thread (whatever it is reading or writing) from another thread."""
        with self.lock:
            try:
                # The C-level shutdown, bypassing SSLSocket's (which drops its TLS state).
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def finish(self, abort: Abort, linger: float) -> None:
        if self.finished:
            return
        self.finished = True
        sock = self.sock
        try:
            if abort is Abort.RST:
                # Let what was written reach the peer first: an RST discards unsent data,
                # and "broke off after N bytes" should mean N bytes arrived.
                deadline = time.monotonic() + 2.0
                while _outq(sock) > 0 and time.monotonic() < deadline:
                    time.sleep(0.005)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if abort is Abort.CLOSE_NOTIFY and isinstance(sock, ssl.SSLSocket):
                # Non-blocking unwrap sends our close_notify without waiting for the peer's.
                sock.settimeout(0)
                try:
                    sock.unwrap()
                except (OSError, ValueError):
                    pass
            sock.settimeout(linger)
            socket.socket.shutdown(sock, socket.SHUT_WR)
            # Lingering close: read (raw, discarding) until the peer closes, so unread
            # input cannot turn our FIN into an RST.
            while socket.socket.recv(sock, 65536):
                pass
        except OSError:
            pass
        finally:
            sock.close()


class _Reader:
    """Buffered reads of an HTTP/1.1 request stream (heads, exact lengths, chunked bodies)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def head(self, limit: int) -> bytes | None:
        """The next request head; ``None`` on a clean EOF between requests."""
        while True:
            while self.buf.startswith(b"\r\n"):
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > limit:
                raise _BadRequest("request head too large")
            if not self._fill():
                if self.buf:
                    raise _BadRequest("connection closed inside a request head")
                return None

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise _BadRequest("connection closed inside a request body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > 65536 or not self._fill():
                raise _BadRequest("bad chunk line")
        data = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return data

    def chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.line().split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.line():  # trailers
                    pass
                return bytes(out)
            out += self.exact(size)
            if self.exact(2) != b"\r\n":
                raise _BadRequest("chunk not followed by CRLF")


@dataclass
class Route:
    """One routing rule; ``hits`` counts the requests it answered."""

    method: str | tuple[str, ...] | None
    path: re.Pattern[str]
    behaviour: Behaviour
    times: int | None = None
    hits: int = 0

    def matches(self, request: Request) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method != "*":
            methods = (self.method,) if isinstance(self.method, str) else self.method
            if request.method not in methods:
                return False
        return self.path.fullmatch(request.path) is not None


class HostileServer:
    """A loopback HTTP/1.1 server whose every answer is scripted by the test.

    Listens on ``127.0.0.1`` (an ephemeral port) as soon as it is constructed; one
    thread per connection, so a stalled exchange never holds up the others.  With
    ``tls`` (a server :class:`ssl.SSLContext`, see :func:`server_tls_context`) it speaks
    HTTPS.  ``keep_alive=False`` answers every request with ``Connection: close``;
    ``idle_timeout`` silently closes keep-alive connections idle that long, as real
    servers and load balancers do (the proxy's pool must cope with the stale socket).
    Event stalls give up after ``max_stall`` seconds so a forgotten event cannot hang a
    thread forever.
    """

    def __init__(
        self,
        tls: ssl.SSLContext | None = None,
        *,
        default: Behaviour | None = None,
        handler: Handler | None = None,
        keep_alive: bool = True,
        idle_timeout: float | None = None,
        expect_continue: bool = True,
        keep_bodies: bool = True,
        max_head: int = 1 << 20,
        max_stall: float = 60.0,
        linger: float = 1.0,
    ) -> None:
        self.tls = tls
        self.default: Behaviour = default if default is not None else not_found()
        self.handler = handler
        self.keep_alive = keep_alive
        self.idle_timeout = idle_timeout
        self.expect_continue = expect_continue
        self.keep_bodies = keep_bodies
        self.max_head = max_head
        self.max_stall = max_stall
        self.linger = linger
        self._lock = threading.Lock()
        self._routes: list[Route] = []
        self._requests: list[Request] = []
        self._connections: list[ConnectionInfo] = []
        self._open: set[_Connection] = set()
        self._errors: list[str] = []
        self._closing = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        # A timeout on accept so close() never depends on a blocked accept() waking up.
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"hostile:{self.port}", daemon=True)
        self._acceptor.start()

    # -- addresses ---------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:port``, as a ``Host`` header or an upstream authority."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    # -- scripting ---------------------------------------------------------------

    def route(
        self, method: str | tuple[str, ...] | None, path: str, behaviour: Behaviour, times: int | None = None
    ) -> Route:
        """Answer requests whose path (no query) fully matches the regex ``path``.

        ``method`` ``None`` or ``"*"`` matches any method.  Newer routes win over older
        ones; with ``times`` the route stops matching after that many hits (so "fail
        once, then succeed" is an old route for success plus a new ``times=1`` route).
        """
        rule = Route(method, re.compile(path), behaviour, times)
        with self._lock:
            self._routes.append(rule)
        return rule

    def clear_routes(self) -> None:
        with self._lock:
            self._routes.clear()

    def _select(self, request: Request) -> Behaviour:
        with self._lock:
            for rule in reversed(self._routes):
                if rule.matches(request):
                    rule.hits += 1
                    return rule.behaviour
        if self.handler is not None:
            chosen = self.handler(request)
            if chosen is not None:
                return chosen
        return self.default

    # -- observation -------------------------------------------------------------

    def requests(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """Requests received so far, in arrival order; optionally by method / path regex (fullmatch)."""
        with self._lock:
            found = list(self._requests)
        if method is not None:
            found = [r for r in found if r.method == method]
        if path is not None:
            pattern = re.compile(path)
            found = [r for r in found if pattern.fullmatch(r.path)]
        return found

    def clear(self) -> None:
        """Forget recorded requests, connections and errors (open connections stay open)."""
        with self._lock:
            self._requests.clear()
            self._connections = [c.info for c in self._open]
            self._errors.clear()

    def connections(self) -> list[ConnectionInfo]:
        """Every connection accepted (since the last :meth:`clear`), open or closed."""
        with self._lock:
            return list(self._connections)

    def connections_accepted(self) -> int:
        with self._lock:
            return len(self._connections)

    def open_connections(self) -> int:
        """Connections not yet closed by either side: did the proxy let go of us?"""
        with self._lock:
            return len(self._open)

    def errors(self) -> list[str]:
        """Tracebacks of behaviours that raised (a bug in the test, not an injected fault), and malformed requests."""
        with self._lock:
            return list(self._errors)

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, wake stalled behaviours and close every open connection."""
        if self._closing.is_set():
            return
        self._closing.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
        except OSError:
            pass
        self._acceptor.join(2)
        self._listener.close()
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            conn.kill()
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(2)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- serving -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self._lock:
                info = ConnectionInfo(len(self._connections), addr[1], time.monotonic())
                self._connections.append(info)
                conn = _Connection(sock, info)
                self._open.add(conn)
            conn.thread = threading.Thread(
                target=self._serve, args=(conn,), name=f"hostile:{self.port}:{addr[1]}", daemon=True
            )
            conn.thread.start()

    def _serve(self, conn: _Connection) -> None:
        try:
            if self.tls is not None and not self._handshake(conn):
                return
            reader = _Reader(conn.sock)
            while not conn.finished and not self._closing.is_set():
                request, keep_alive = self._read_request(conn, reader)
                if request is None:
                    break
                exchange = Exchange(self, conn, request, keep_alive)
                try:
                    self._select(request)(exchange)
                except _Closing:
                    exchange.end(Abort.FIN)
                if not exchange.keep_alive:
                    exchange.end()
        except _BadRequest as e:
            self._bad_request(conn, str(e))
        except OSError:
            pass  # the peer went away; that is its right
        except Exception:
            with self._lock:
                self._errors.append(traceback.format_exc())
        finally:
            conn.finish(Abort.FIN, 0)
            with self._lock:
                conn.info.closed = time.monotonic()
                self._open.discard(conn)

    def _handshake(self, conn: _Connection) -> bool:
        assert self.tls is not None
        try:
            wrapped = self.tls.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
            with conn.lock:
                conn.sock = wrapped
            wrapped.settimeout(10)
            wrapped.do_handshake()
            wrapped.settimeout(None)
            return True
        except (OSError, ValueError) as e:
            conn.info.tls_error = repr(e)
            return False

    def _read_request(self, conn: _Connection, reader: _Reader) -> tuple[Request | None, bool]:
        if self.idle_timeout is not None:
            conn.sock.settimeout(self.idle_timeout)
        try:
            head = reader.head(self.max_head)
        except TimeoutError:
            return None, False  # idle: close without a word, like a server's keep-alive timeout
        conn.sock.settimeout(None)
        if head is None:
            return None, False
        lines = head.split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest(f"bad request line {lines[0]!r}")
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise _BadRequest(f"bad header line {line!r}")
            headers.append((name, value.strip(" \t")))
        lowered = [(k.lower(), v) for k, v in headers]
        chunked = any(k == "transfer-encoding" and "chunked" in v.lower() for k, v in lowered)
        lengths = [v for k, v in lowered if k == "content-length"]
        expects_body = chunked or (bool(lengths) and lengths[0].strip() != "0")
        if (
            expects_body
            and self.expect_continue
            and any(k == "expect" and v.lower() == "100-continue" for k, v in lowered)
        ):
            conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if chunked:
            body = reader.chunked()
        elif lengths:
            try:
                body = reader.exact(int(lengths[0]))
            except ValueError as e:
                raise _BadRequest(f"bad Content-Length {lengths[0]!r}") from e
        else:
            body = b""
        tokens = {t.strip().lower() for k, v in lowered if k == "connection" for t in v.split(",")}
        keep_alive = self.keep_alive and version == "HTTP/1.1" and "close" not in tokens
        request = Request(
            method=method,
            target=target,
            version=version,
            headers=headers,
            body=body if self.keep_bodies else b"",
            body_length=len(body),
            client_port=conn.info.client_port,
            time=time.monotonic(),
            connection=conn.info.index,
            tls=self.tls is not None,
        )
        with self._lock:
            self._requests.append(request)
            conn.info.requests += 1
        return request, keep_alive

    def _bad_request(self, conn: _Connection, why: str) -> None:
        with self._lock:
            self._errors.append(f"bad request: {why}")
        try:
            conn.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass


class Sink(HostileServer):
    """A second host that must never be dialled: a forbidden redirect target or realm.

    It answers (so a proxy that wrongly follows gets a distinctive ``X-Sink`` answer
    rather than a connection error that might be retried elsewhere), and records
    everything; :attr:`contacted` is true as soon as any TCP connection was accepted,
    even one that never got as far as a request.
    """

    def __init__(self, tls: ssl.SSLContext | None = None, body: bytes = b"hostile sink reached\n") -> None:
        super().__init__(tls, default=ok(body, headers=[("Content-Type", "text/plain"), ("X-Sink", "1")]))

    @property
    def contacted(self) -> bool:
        return self.connections_accepted() > 0

    def assert_untouched(self) -> None:
        """Fail with what reached the sink, if anything did."""
        if self.contacted:
            seen = [f"{r.method} {r.target} {r.headers}" for r in self.requests()]
            raise AssertionError(f"{self.url} was contacted ({self.connections_accepted()} connections): {seen}")


# -- behaviours ----------------------------------------------------------------


class _BodyWriter:
    """Writes body bytes, pausing once at ``stall_after`` and stopping at ``break_after``."""

    def __init__(self, x: Exchange, break_after: int | None, stall_after: int | None, stall: Wait | None) -> None:
        self.x = x
        self.break_after = break_after
        self.stall_after = stall_after if stall is not None else None
        self.stall = stall
        self.sent = 0
        self.stalled = False

    def checkpoint(self) -> None:
        if not self.stalled and self.stall_after is not None and self.sent >= self.stall_after:
            self.stalled = True
            assert self.stall is not None
            if not self.x.wait(self.stall):
                raise _Closing

    def broken(self) -> bool:
        return self.break_after is not None and self.sent >= self.break_after

    def write(self, data: bytes) -> bool:
        """Send ``data``; ``False`` when the break point was reached (stop and abort)."""
        while data:
            self.checkpoint()
            if self.broken():
                return False
            n = len(data)
            if self.stall_after is not None and not self.stalled:
                n = min(n, self.stall_after - self.sent)
            if self.break_after is not None:
                n = min(n, self.break_after - self.sent)
            self.x.send(data[:n])
            self.sent += n
            data = data[n:]
        self.checkpoint()
        return not self.broken()


@dataclass(frozen=True)
class Respond:
    """The general answer: status, headers and body, with framing and faults to taste.

    * ``framing`` picks how the body's end is signalled (the framing header is added
      here; ``content_length`` overrides the declared length, to lie).
    * ``break_after``: after that many body bytes, end the connection with ``abort``
      (for ``CHUNKED`` a multiple of ``chunk_size`` breaks between chunks, anything else
      inside one; the terminating chunk is never sent).
    * ``stall_head``: wait before the status line; ``stall_after`` + ``stall``: wait once
      after that many body bytes (then carry on, or break if ``break_after`` says so).
    * ``close``: close cleanly after the answer, announcing it with ``Connection:
      close`` unless ``announce_close`` is false (an upstream that drops a keep-alive
      connection without notice).

    HEAD requests (and 1xx/204/304) get the head only, framing headers included.
    :meth:`but` derives a variant: ``ok(b"x").but(break_after=1, abort=Abort.RST)``.
    """

    status: int = 200
    body: bytes = b""
    headers: Headers = ()
    framing: Framing = Framing.LENGTH
    reason: Text | None = None
    chunk_size: int = 16384
    content_length: int | None = None
    break_after: int | None = None
    abort: Abort = Abort.FIN
    stall_head: Wait | None = None
    stall_after: int | None = None
    stall: Wait | None = None
    close: bool = False
    announce_close: bool = True

    def but(self, **changes: Any) -> Respond:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def with_headers(self, *headers: Header) -> Respond:
        """A copy with more headers (after the existing ones)."""
        return replace(self, headers=[*self.headers, *headers])

    def __call__(self, x: Exchange) -> None:
        if self.stall_head is not None and not x.wait(self.stall_head):
            raise _Closing
        head_only = x.request.method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200
        close_after = self.close or not x.keep_alive or self.framing is Framing.CLOSE
        headers = list(self.headers)
        if self.framing is Framing.LENGTH:
            declared = len(self.body) if self.content_length is None else self.content_length
            headers.append(("Content-Length", str(declared)))
        elif self.framing is Framing.CHUNKED:
            headers.append(("Transfer-Encoding", "chunked"))
        if close_after and self.announce_close:
            headers.append(("Connection", "close"))
        x.send_head(self.status, headers, self.reason)
        if not head_only and not self._body(x):
            x.end(self.abort)
            return
        if close_after:
            x.end(Abort.CLOSE_NOTIFY)

    def _body(self, x: Exchange) -> bool:
        """Send the body in its framing; ``False`` when it broke off."""
        w = _BodyWriter(x, self.break_after, self.stall_after, self.stall)
        if self.framing is not Framing.CHUNKED:
            return w.write(self.body)
        size = max(1, self.chunk_size)
        for start in range(0, len(self.body), size):
            w.checkpoint()
            if w.broken():
                return False
            piece = self.body[start : start + size]
            x.send(b"%x\r\n" % len(piece))
            if not w.write(piece):
                return False
            x.send(b"\r\n")
        w.checkpoint()
        if w.broken():
            return False
        x.send(b"0\r\n\r\n")
        return True


def ok(body: bytes = b"", headers: Headers = (), framing: Framing = Framing.LENGTH, status: int = 200) -> Respond:
    """A normal answer in the given framing."""
    return Respond(status=status, body=body, headers=headers, framing=framing)


def break_off(
    body: bytes,
    after: int,
    framing: Framing = Framing.LENGTH,
    abort: Abort = Abort.FIN,
    headers: Headers = (),
    status: int = 200,
) -> Respond:
    """Promise ``body`` (by its framing), send its first ``after`` bytes, then end the connection."""
    return Respond(status=status, body=body, headers=headers, framing=framing, break_after=after, abort=abort)


def stall(how: Wait, then: Behaviour | None = None) -> Behaviour:
    """Wait before answering at all (seconds, or until the event is set), then run ``then``.

    Without ``then`` the connection is closed after the wait without an answer.
    """

    def behaviour(x: Exchange) -> None:
        if not x.wait(how):
            raise _Closing
        if then is None:
            x.end(Abort.FIN)
        else:
            then(x)

    return behaviour


def stall_body(body: bytes, after: int, how: Wait, framing: Framing = Framing.LENGTH, headers: Headers = ()) -> Respond:
    """Send the head and ``after`` body bytes, wait (seconds or event), then send the rest."""
    return Respond(body=body, headers=headers, framing=framing, stall_after=after, stall=how)


def corrupt(data: bytes, positions: Sequence[int] | None = None) -> bytes:
    """The same number of bytes with the ones at ``positions`` flipped (default: the middle one)."""
    if not data:
        return data
    out = bytearray(data)
    for p in positions if positions is not None else [len(data) // 2]:
        out[p] ^= 0xFF
    return bytes(out)


def wrong_bytes(
    body: bytes, headers: Headers = (), framing: Framing = Framing.LENGTH, positions: Sequence[int] | None = None
) -> Respond:
    """Right length, right headers (pass the true digest in them), wrong content."""
    return Respond(body=corrupt(body, positions), headers=headers, framing=framing)


def raw(data: bytes, abort: Abort = Abort.FIN) -> Behaviour:
    """Send arbitrary bytes (not necessarily HTTP) and end the connection."""

    def behaviour(x: Exchange) -> None:
        x.send(data)
        x.end(abort)

    return behaviour


def hang_up(abort: Abort = Abort.FIN) -> Behaviour:
    """Read the request, answer nothing, end the connection."""
    return raw(b"", abort)


def oci_error(status: int, code: str, message: str, headers: Headers = (), detail: object = None) -> Respond:
    """A registry error answer: ``{"errors": [{"code", "message", "detail"}]}``."""
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]}).encode()
    return Respond(status=status, body=body, headers=[("Content-Type", "application/json"), *headers])


def not_found(code: str = "NAME_UNKNOWN", message: str = "hostile upstream: no route for this request") -> Respond:
    """The default answer."""
    return oci_error(404, code, message)


def v2_base(headers: Headers = ()) -> Respond:
    """``GET /v2/`` of an anonymous registry: 200 ``{}`` with the API version header."""
    return Respond(
        body=b"{}",
        headers=[("Content-Type", "application/json"), ("Docker-Distribution-API-Version", "registry/2.0"), *headers],
    )


def server_error(status: int = 503, retry_after: str | None = None, headers: Headers = ()) -> Respond:
    """A 5xx with an OCI ``UNAVAILABLE`` body, optionally with ``Retry-After``."""
    extra: list[Header] = [("Retry-After", retry_after)] if retry_after is not None else []
    return oci_error(status, "UNAVAILABLE", "hostile upstream: unavailable", [*extra, *headers])


def rate_limited(
    retry_after: str | None = "60",
    limit: str = HUB_RATELIMIT_LIMIT,
    remaining: str = HUB_RATELIMIT_EXHAUSTED,
    source: str = "1.2.3.4",
    headers: Headers = (),
) -> Respond:
    """Docker Hub's 429: ``TOOMANYREQUESTS`` with its ``ratelimit-*`` headers."""
    extra: list[Header] = [("Retry-After", retry_after)] if retry_after is not None else []
    extra += [("ratelimit-limit", limit), ("ratelimit-remaining", remaining), ("docker-ratelimit-source", source)]
    return oci_error(
        429,
        "TOOMANYREQUESTS",
        "You have reached your pull rate limit. You may increase the limit by authenticating and upgrading",
        [*extra, *headers],
    )


def redirect(location: Text | Callable[[Request], Text], status: int = 307, headers: Headers = ()) -> Behaviour:
    """A redirect to ``location`` (``bytes`` go out raw; a callable computes it per request)."""

    def behaviour(x: Exchange) -> None:
        target = location(x.request) if callable(location) else location
        Respond(status=status, headers=[("Location", target), *headers])(x)

    return behaviour


def redirect_loop(status: int = 307) -> Behaviour:
    """Redirect every request to itself (absolute URL of this very server and target)."""

    def behaviour(x: Exchange) -> None:
        redirect(x.server.url + x.request.target, status)(x)

    return behaviour


def bearer(realm: Text, service: str | None = None, scope: str | None = None) -> bytes:
    """A ``Bearer`` challenge value; a ``str`` realm is UTF-8 encoded, ``bytes`` used as is."""
    value = b'Bearer realm="' + _encode(realm) + b'"'
    if service is not None:
        value += b',service="' + service.encode() + b'"'
    if scope is not None:
        value += b',scope="' + scope.encode() + b'"'
    return value


def challenge(www_authenticate: Text, status: int = 401, headers: Headers = ()) -> Respond:
    """A 401 (``UNAUTHORIZED`` body) with exactly the given ``WWW-Authenticate`` value."""
    return oci_error(
        status, "UNAUTHORIZED", "authentication required", [("WWW-Authenticate", www_authenticate), *headers]
    )


def token_endpoint(
    token: str = "hostile-token", expires_in: int = 300, delay: Wait | None = None, headers: Headers = ()
) -> Respond:
    """A token realm: ``{"token", "access_token", "expires_in", "issued_at"}``, optionally slow."""
    body = json.dumps(
        {
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    ).encode()
    return Respond(body=body, headers=[("Content-Type", "application/json"), *headers], stall_head=delay)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _parse_range(value: str, size: int) -> tuple[int, int] | None | bool:
    """``(first, last)`` inclusive; ``None`` to ignore the header; ``False`` if unsatisfiable."""
    m = _RANGE.fullmatch(value.strip())
    if m is None or (not m[1] and not m[2]):
        return None  # malformed or multi-range: a server may answer 200 with everything
    if not m[1]:
        suffix = int(m[2])
        if suffix == 0 or size == 0:
            return False
        return max(0, size - suffix), size - 1
    first = int(m[1])
    last = int(m[2]) if m[2] else size - 1
    if first >= size or last < first:
        return False
    return first, min(last, size - 1)


@dataclass(frozen=True)
class Blob:
    """A blob served from bytes, honouring ``Range: bytes=a-b`` / ``a-`` / ``-n`` with 206.

    ``Docker-Content-Digest`` is the true digest of ``data`` (or ``digest``); with
    ``corrupt`` the bytes served are :func:`corrupt`-ed under that same digest and
    length.  ``faults`` is the :class:`Respond` template for the answer (framing,
    ``break_after``, stalls...), so "break off a resumed range" is one expression.
    """

    data: bytes
    digest: str | None = None
    content_type: str = "application/octet-stream"
    ranges: bool = True
    corrupt: bool = False
    headers: Headers = ()
    faults: Respond = field(default_factory=Respond)

    def __call__(self, x: Exchange) -> None:
        size = len(self.data)
        served = corrupt(self.data) if self.corrupt else self.data
        digest = self.digest or sha256_digest(self.data)
        headers: list[Header] = [
            ("Content-Type", self.content_type),
            ("Docker-Content-Digest", digest),
            ("ETag", f'"{digest}"'),
            ("Accept-Ranges", "bytes"),
            *self.headers,
            *self.faults.headers,
        ]
        wanted = x.request.header("Range") if self.ranges else None
        span = _parse_range(wanted, size) if wanted is not None else None
        if span is False:
            Respond(status=416, headers=[*headers, ("Content-Range", f"bytes */{size}")])(x)
            return
        if isinstance(span, tuple):
            first, last = span
            headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
            replace(self.faults, status=206, body=served[first : last + 1], headers=headers)(x)
            return
        replace(self.faults, status=200, body=served, headers=headers)(x)


def blob(data: bytes, digest: str | None = None, faults: Respond | None = None, corrupted: bool = False) -> Blob:
    """:class:`Blob` with the usual arguments."""
    return Blob(data, digest=digest, corrupt=corrupted, faults=faults if faults is not None else Respond())


class InTurn:
    """The n-th request it answers gets the n-th behaviour; the last one repeats.

    ``InTurn(break_off(b, 10), blob(b))``: the first attempt breaks, every retry works.
    """

    def __init__(self, *behaviours: Behaviour) -> None:
        if not behaviours:
            raise ValueError("InTurn needs at least one behaviour")
        self.behaviours = behaviours
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, x: Exchange) -> None:
        with self._lock:
            chosen = self.behaviours[min(self.calls, len(self.behaviours) - 1)]
            self.calls += 1
        chosen(x)


# -- header tricks ---------------------------------------------------------------

#: Headers a proxy should not pass on blindly: they would pin the client's view of the
#: proxy's origin to the upstream's choices (cookies, HSTS, HTTP/3 endpoints).
STICKY_HEADERS: tuple[Header, ...] = (
    ("Set-Cookie", "session=hostile-upstream; Path=/; HttpOnly; Secure"),
    ("Set-Cookie", "tracker=1; Domain=.example.com; Max-Age=31536000"),
    ("Strict-Transport-Security", "max-age=63072000; includeSubDomains; preload"),
    ("Alt-Svc", 'h3=":443"; ma=86400, h2="evil.example.com:443"; ma=86400'),
)


def huge_header(size: int = 64 * 1024, name: str = "X-Huge") -> list[Header]:
    """One header whose value is ``size`` bytes long."""
    return [(name, "h" * size)]


def many_headers(count: int = 1000, prefix: str = "X-Many-") -> list[Header]:
    """``count`` distinct small headers."""
    return [(f"{prefix}{i}", str(i)) for i in range(count)]


# -- TLS and process helpers -------------------------------------------------------


def server_tls_context(pki: PKIFiles) -> ssl.SSLContext:
    """A server context with the test PKI's certificate (valid for 127.0.0.1 and localhost)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    return context


def client_tls_context(pki: PKIFiles) -> ssl.SSLContext:
    """A client context trusting only the test CA."""
    return ssl.create_default_context(cafile=str(pki.ca_cert))


def fd_count(pid: int) -> int:
    """Open file descriptors of a process: the leak check for sockets the proxy forgot."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll until ``predicate()`` is truthy and return it; fail the test after ``timeout`` seconds.

    Tests assert outcomes, not timings: the timeout is a generous ceiling for things that
    happen asynchronously (a connection closing, a log line landing), never a measurement.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)
