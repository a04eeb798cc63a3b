"""Backpressure between an upstream response body and a client request.

The pipe is the upstream body's protocol and the client request's push producer
at once: when the client's socket is full twisted.web pauses us and we pause the
upstream socket, so memory stays flat whatever the blob size. A client that goes
away stops the upstream read; an upstream that fails mid-body fails C{done}, and
the caller drops the client connection instead of finishing a short body.

An upstream body without framing (no length, not chunked) ends the same way
whether it was complete or cut (Twisted reports C{PotentialDataLoss} for both):
it counts as complete only when the client's answer is close-delimited too, so
that the client can tell no more than the proxy could.
"""

from __future__ import annotations

from collections.abc import Callable
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


class ClientStalled(Exception):
    """The client left its download unread for too long."""


class ClientLeft(Exception):
    """The client's connection closed while its body was being sent: nobody to answer, nothing to warn about."""


@implementer(IPushProducer)
class BodyPipe(Protocol):
    """Upstream body -> client request, with pause/resume/stop forwarded upstream.

    @ivar done: fires once the upstream body is complete; fails if it broke
        off; cancelling it stops the upstream.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        idle_timeout: float,
        close_delimited: bool = False,
        client_timeout: float = 0.0,
        ended_abruptly: Callable[[], bool] | None = None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._close_delimited = close_delimited
        self._ended_abruptly = ended_abruptly
        self._client_timeout = client_timeout
        self._timer: IDelayedCall | None = None
        #: Runs while the client has us paused: a client that never reads must
        #: not hold its request and an upstream connection for ever.
        self._stall: IDelayedCall | None = None
        self._registered = False
        #: The upstream response's transport (a TransportProxyProducer): what we pause.
        self._upstream: IPushProducer | None = None
        self.done: Deferred[None] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[None]) -> None:
        self._stop_timer()
        self._stop_stall()
        if self._upstream is not None:
            self._upstream.stopProducing()

    # Protocol: driven by the upstream response.

    def connectionMade(self) -> None:
        self._upstream = cast(IPushProducer, self.transport)
        self._request.registerProducer(self, True)
        self._registered = True
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.reset(self._idle_timeout)
        self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        self._stop_stall()
        self._unregister()
        if self.done.called:
            return
        if reason.check(ResponseDone) or (self._close_delimited and reason.check(PotentialDataLoss) and not self._abrupt()):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _abrupt(self) -> bool:
        return self._ended_abruptly is not None and self._ended_abruptly()

    def _unregister(self) -> None:
        """Stop being the request's producer (before it is finished or answered otherwise)."""
        if self._registered:
            self._registered = False
            if getattr(self._request, "channel", None) is not None:
                self._request.unregisterProducer()

    # IPushProducer: driven by the client connection.

    def pauseProducing(self) -> None:
        # A client that is not reading is not the upstream's fault...
        self._stop_timer()
        cast(IPushProducer, self._upstream).pauseProducing()
        # ...but it may not stop reading for ever.
        if self._client_timeout > 0 and self._stall is None and not self.done.called:
            self._stall = self._clock.callLater(self._client_timeout, self._client_stalled)

    def resumeProducing(self) -> None:
        self._stop_stall()
        self._arm_timer()
        cast(IPushProducer, self._upstream).resumeProducing()

    def stopProducing(self) -> None:
        self._registered = False  # the client is gone: there is no channel to unregister from
        self._stop_stall()
        self._stop_timer()
        cast(IPushProducer, self._upstream).stopProducing()

    # Idle timer: a stalled upstream must not hold the client forever.

    def _arm_timer(self) -> None:
        if self._timer is None and self._idle_timeout > 0 and not self.done.called:
            self._timer = self._clock.callLater(self._idle_timeout, self._idle)

    def _stop_stall(self) -> None:
        _cancel(self._stall)
        self._stall = None

    def _stop_timer(self) -> None:
        _cancel(self._timer)
        self._timer = None

    def _client_stalled(self) -> None:
        self._stall = None
        self._abandon(ClientStalled(f"client read nothing for {self._client_timeout}s"))

    def _idle(self) -> None:
        self._timer = None
        self._abandon(BodyIdleTimeout(f"upstream body idle for {self._idle_timeout}s"))

    def _abandon(self, why: Exception) -> None:
        """Give up on this body: stop the upstream and fail C{done} with C{why}."""
        # Unregister first: the caller may answer (a 504) before the upstream's
        # connectionLost arrives, and a request can't finish with a producer on it.
        self._unregister()
        self._stop_timer()
        self._stop_stall()
        cast(IPushProducer, self._upstream).stopProducing()
        if not self.done.called:
            self.done.errback(why)


def _cancel(call: IDelayedCall | None) -> None:
    """Cancel a pending call, if any."""
    if call is not None and call.active():
        call.cancel()
