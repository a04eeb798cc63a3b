"""Backpressure between an upstream response body and a client request.

The pipe is the upstream body's protocol and the client request's push producer
at once: when the client's socket is full twisted.web pauses us and we pause the
upstream socket, so memory stays flat whatever the blob size. A client that goes
away stops the upstream read; an upstream that fails mid-body fails C{done}, and
the caller drops the client connection instead of finishing a short body.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer


class BodyIdleTimeout(Exception):
    """The upstream sent nothing for too long while we were waiting for body bytes."""


@implementer(IPushProducer)
class BodyPipe(Protocol):
    """Upstream body -> client request, with pause/resume/stop forwarded upstream.

    @ivar done: fires once the upstream body is complete; fails if it broke
        off; cancelling it stops the upstream.
    """

    def __init__(self, request: Request, clock: IReactorTime, idle_timeout: float) -> None:
        self._request = request
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall | None = None
        self._client_gone = False
        #: The upstream response's transport (a TransportProxyProducer): what we pause.
        self._upstream: IPushProducer | None = None
        self.done: Deferred[None] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[None]) -> None:
        self._stop_timer()
        if self._upstream is not None:
            self._upstream.stopProducing()

    # Protocol: driven by the upstream response.

    def connectionMade(self) -> None:
        self._upstream = cast(IPushProducer, self.transport)
        self._request.registerProducer(self, True)
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.reset(self._idle_timeout)
        self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if not self._client_gone:
            self._request.unregisterProducer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    # IPushProducer: driven by the client connection.

    def pauseProducing(self) -> None:
        # A client that is not reading is not the upstream's fault.
        self._stop_timer()
        cast(IPushProducer, self._upstream).pauseProducing()

    def resumeProducing(self) -> None:
        self._arm_timer()
        cast(IPushProducer, self._upstream).resumeProducing()

    def stopProducing(self) -> None:
        self._client_gone = True
        self._stop_timer()
        cast(IPushProducer, self._upstream).stopProducing()

    # Idle timer: a stalled upstream must not hold the client forever.

    def _arm_timer(self) -> None:
        if self._timer is None and self._idle_timeout > 0 and not self.done.called:
            self._timer = self._clock.callLater(self._idle_timeout, self._idle)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _idle(self) -> None:
        self._timer = None
        if not self.done.called:
            self.done.errback(BodyIdleTimeout(f"upstream body idle for {self._idle_timeout}s"))
        cast(IPushProducer, self._upstream).stopProducing()
