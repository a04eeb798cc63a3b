"""The HTTP server side: one channel per client connection, one site for them all.

What twisted.web's own channel and site leave open for a server on the internet
is closed here: TLS spoken to the plain port, headers trickled in for ever
(slowloris), a flood of connections, and an answer given before the request
body was read (which the client must still be able to read).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from .errors import error_body
from .upload import StreamingRequest


def _raw_answer(status: bytes, code: str, message: str, extra: bytes = b"") -> bytes:
    body = error_body(code, message)
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nConnection: close\r\n" + extra
        + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class RegistryChannel(HTTPChannel):
    """An HTTP/1.1 channel hardened for a public port.

    * TLS spoken to the plain-HTTP port is turned away at once: dockerd, skopeo
      and podman try C{https://} first on an insecure registry and fall back
      to C{http://} only when that fails; a ClientHello sitting unanswered costs
      them a 10 s handshake timeout per request, an immediate plain-HTTP 400
      makes them fall back straight away, as the distribution registry does.
    * A request's head must be complete within C{header_timeout} seconds of its
      first byte: the channel's idle timeout alone is reset by every trickled byte.
    * When the answer came before the whole request body (a 413, an early 401 on
      an upload), closing at once would make the client's kernel reset the
      connection while it is still sending, and the client would never read the
      answer. The rest of the body is read and dropped for a while first
      (nginx's "lingering close").
    """

    log = Logger()
    _first = True
    _header_timer: IDelayedCall | None = None
    _awaiting_head = True
    _lingering: IDelayedCall | None = None
    #: The rest of the connection's bytes are dropped (after a malformed body).
    _discarding = False
    _linger_deadline = 0.0
    _linger_left: int | None = None

    @property
    def _settings(self) -> ChannelLimits:
        limits: ChannelLimits | None = getattr(getattr(self, "site", None), "limits", None)
        return limits if limits is not None else _DEFAULT_LIMITS

    def _now(self) -> float:
        clock: Any = getattr(getattr(self, "site", None), "reactor", None)
        if clock is None:
            from twisted.internet import reactor as clock
        return float(clock.seconds())

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._lingering is not None:
            self._drop_lingering(data)
            return
        if self._first and data:
            self._first = False
            if data[0] == 0x16:  # TLS record type "handshake"
                self.transport.write(  # type: ignore[union-attr]
                    _raw_answer(b"400 Bad Request", "UNSUPPORTED", "this port speaks plain HTTP, not TLS")
                )
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
        if self._awaiting_head and self._header_timer is None and data and self._settings.header_timeout:
            self._header_timer = self.callLater(self._settings.header_timeout, self._head_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        if self._header_timer is not None:
            if self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None
        super().allHeadersReceived()

    def _head_too_slow(self) -> None:
        self._header_timer = None
        self.log.info(
            "dropping {peer}: request head not complete within {seconds}s",
            peer=str(self.transport.getPeer()),  # type: ignore[union-attr]
            seconds=self._settings.header_timeout,
        )
        self.transport.write(  # type: ignore[union-attr]
            _raw_answer(b"408 Request Timeout", "UNSUPPORTED", "request head took too long")
        )
        self._log_own(408, "request head took too long")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own answer to a malformed request line, header or chunked
        # body (a private hook, the only one there is; tests/unit/test_defects.py
        # pins it). A request the resource already has (dispatched before its
        # body, a streamed upload or a refused body) must not get a second
        # answer: it is told its body is malformed and answers (once) itself;
        # the rest of the connection's bytes are dropped. Otherwise Twisted
        # answers, and the request still gets its log line.
        current = self.requests[-1] if self.requests else None
        if current is not None and getattr(current, "_dispatched", False):
            self._discarding = True
            self.persistent = False
            current.body_malformed()
            return
        self._log_own(400, "malformed request")
        super()._respondToBadRequestAndDisconnect()  # type: ignore[misc]

    def _log_own(self, status: int, note: str) -> None:
        log = getattr(getattr(self, "site", None), "access_log", None)
        if log is not None:
            peer = getattr(self.transport.getPeer(), "host", "-") if self.transport is not None else "-"
            log(str(peer), status, note)

    def requestDone(self, request: Any) -> None:
        if getattr(getattr(self, "site", None), "draining", False):
            self.persistent = False  # draining: this connection ends with this answer
        pending = getattr(request, "body_pending", None)
        if not self.persistent and pending is not None and pending() and not self._discarding:
            upload = getattr(request, "upload", None)
            known = getattr(upload, "length", None)
            if isinstance(known, int) and upload is not None:
                self._linger_left = max(known - upload.received, 0)
            self._start_linger()
        else:
            self._awaiting_head = True
        super().requestDone(request)

    def _start_linger(self) -> None:
        limits = self._settings
        self._linger_deadline = self._now() + limits.linger_time
        self._lingering = self.callLater(limits.linger_idle, self._end_linger)

    def loseConnection(self) -> None:
        if self._lingering is not None:
            # requestDone closes a non-persistent channel: not yet, we are lingering.
            self._networkProducer.unregisterProducer()  # type: ignore[attr-defined]
            return
        super().loseConnection()

    def _drop_lingering(self, data: bytes) -> None:
        if self._linger_left is not None:
            self._linger_left -= len(data)
            if self._linger_left <= 0:
                self._end_linger()
                return
        remaining = self._linger_deadline - self._now()
        if remaining <= 0:
            self._end_linger()
        elif self._lingering is not None and self._lingering.active():
            self._lingering.reset(min(self._settings.linger_idle, remaining))

    def _end_linger(self) -> None:
        timer, self._lingering = self._lingering, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        for timer in (self._header_timer, self._lingering):
            if timer is not None and timer.active():
                timer.cancel()
        self._header_timer = self._lingering = None
        self._release()
        super().connectionLost(reason)
        site = getattr(self, "site", None)
        if isinstance(site, RegistrySite):
            site.channel_closed(self)

    _release_key: str | None = None

    def _release(self) -> None:
        key, self._release_key = self._release_key, None
        if key is not None:
            connections = getattr(getattr(self, "site", None), "connections", None)
            if connections is not None:
                connections.release(key)


def graceful_sigterm(reactor: Any) -> None:
    """Make SIGTERM a drain that ends with exit status 0.

    C{twist} stops the reactor on SIGTERM too, but then re-raises the signal at
    exit (status -15), which process supervisors read as a crash. Installed after
    start-up, over Twisted's own handler; SIGINT keeps Twisted's behaviour.
    """
    import signal

    log = Logger()

    def stop(number: int, frame: object) -> None:
        log.info("SIGTERM: draining, then exiting")
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)


class Drain(Service):
    """On stop (SIGTERM): refuse new work, let transfers in flight finish, then go.

    The listeners stop at the same time (new connections are refused); idle
    keep-alive connections are closed so their clients reconnect elsewhere;
    answers in progress get C{Connection: close}. After C{timeout} seconds
    whatever is left is cut.
    """

    log = Logger()

    def __init__(self, reactor: Any, proxy: Any, site: RegistrySite, timeout: float, pools: Any = ()) -> None:
        self._reactor = reactor
        self._proxy = proxy
        self._site = site
        self._timeout = timeout
        self.pools = list(pools)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        self._proxy.draining = True
        self._site.draining = True
        self._site.close_idle()
        active = self._proxy.active
        if active:
            self.log.info("draining: waiting up to {timeout}s for {active} request(s)", timeout=self._timeout, active=active)
        finished: Deferred[None] = self._proxy.idle()
        # Then every connection closed (its last bytes flushed), and the upstream pools.
        finished.addCallback(lambda _: deferLater(self._reactor, 0, self._site.close_idle))
        finished.addCallback(lambda _: self._site.all_closed())
        if self._timeout > 0:
            finished.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._cut)
        await finished
        for pool in self.pools:
            await pool.closeCachedConnections()

    def _cut(self, result: object, timeout: float) -> None:
        self.log.warn("drain timeout ({timeout}s): cutting {active} request(s)", timeout=timeout, active=self._proxy.active)
        self._site.close_all()


class ChannelLimits:
    """Per-connection limits (seconds, counts); see C{twist regproxy --help}."""

    def __init__(
        self,
        header_timeout: float = 30.0,
        linger_idle: float = 2.0,
        linger_time: float = 30.0,
        max_connections: int = 4096,
        max_connections_per_client: int = 0,
    ) -> None:
        self.header_timeout = header_timeout
        self.linger_idle = linger_idle
        self.linger_time = linger_time
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client


_DEFAULT_LIMITS = ChannelLimits()


class ConnectionCounter:
    """Open connections, in total and per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_client: Counter[str] = Counter()

    def admit(self, key: str, limits: ChannelLimits) -> str | None:
        """Count a new connection in, or say why it is refused."""
        if limits.max_connections and self.total >= limits.max_connections:
            return "the proxy has too many connections open"
        if limits.max_connections_per_client and self.per_client[key] >= limits.max_connections_per_client:
            return "too many connections from your address"
        self.total += 1
        self.per_client[key] += 1
        return None

    def release(self, key: str) -> None:
        self.total -= 1
        self.per_client[key] -= 1
        if self.per_client[key] <= 0:
            del self.per_client[key]


class _Refuse(Protocol):
    """Says 503 with Retry-After and hangs up: for a connection over the limits."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(_raw_answer(b"503 Service Unavailable", "TOOMANYREQUESTS", self._reason, b"Retry-After: 5\r\n"))
        self.transport.loseConnection()


class RegistrySite(Site):
    """A Site that speaks HTTP/1.1 only, logs through the resource, and counts connections.

    HTTP/2 is kept out on purpose: the streaming pipe is built and tested on
    HTTP/1.1 channels. The access log comes from the resource, so twisted.web's
    own combined-log line is switched off.
    """

    requestFactory = StreamingRequest
    protocol = RegistryChannel  # type: ignore[assignment]  # HTTP/1.1 only: no _GenericHTTPChannelProtocol needed
    #: Read by L{StreamingRequest}: the largest upload body accepted, 0 for no limit.
    max_upload_size = 0
    log_refusals = Logger()
    #: Set when the proxy stops: every connection ends with its current answer.
    draining = False

    def __init__(self, resource: Any, *args: Any, limits: ChannelLimits | None = None, **kwargs: Any) -> None:
        super().__init__(resource, *args, **kwargs)
        self.limits = limits or ChannelLimits()
        self.connections = ConnectionCounter()
        self.channels: set[RegistryChannel] = set()
        self._closed_waiters: list[Deferred[None]] = []
        #: Where requests the channel answers itself (400, 408, 503) are logged, like any other.
        self.access_log: Callable[[str, int, str], None] | None = None

    def close_idle(self) -> None:
        """Close keep-alive connections with no request in progress (draining); their writes are flushed first."""
        for channel in list(self.channels):
            if not channel.requests and channel.transport is not None:
                channel.transport.loseConnection()

    def all_closed(self) -> Deferred[None]:
        """Fires once every client connection is closed."""
        if not self.channels:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    def channel_closed(self, channel: RegistryChannel) -> None:
        self.channels.discard(channel)
        if not self.channels and self._closed_waiters:
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def close_all(self) -> None:
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.abortConnection()  # type: ignore[attr-defined]

    def buildProtocol(self, addr: IAddress | None) -> Any:
        key = str(getattr(addr, "host", "?"))
        refused = self.connections.admit(key, self.limits)
        if refused is not None:
            self.log_refusals.warn("refusing a connection from {client}: {reason}", client=key, reason=refused)
            if self.access_log is not None:
                self.access_log(key, 503, refused)
            return _Refuse(refused)
        channel = super().buildProtocol(addr)
        channel._release_key = key
        self.channels.add(channel)
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]

    def log(self, request: object) -> None:
        pass
