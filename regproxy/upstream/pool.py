"""The connection pools of the upstream agents.

Two things Twisted's own client factory doesn't do: stay quiet (no log line per
upstream connection), and remember how a connection ended. A body without
framing (no length, not chunked) ends when the upstream closes; Twisted reports
that as C{PotentialDataLoss} whether the close was orderly (FIN: the body is
complete) or a reset (RST: it was cut). The relay must tell the two apart, so
the protocol notes a non-orderly end on the response before Twisted's parser
sees it. That needs the private C{HTTP11ClientProtocol._parser} and the
factory's private base class; C{tests/unit/test_pool.py} pins both.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IResponse

#: Set on a response whose connection ended other than orderly.
_LOST = "regproxy_connection_lost"


def connection_lost_abruptly(response: IResponse) -> bool:
    """Whether the connection that carried C{response} ended with a reset or an error."""
    return getattr(response, _LOST, None) is not None


class _TellingClientProtocol(HTTP11ClientProtocol):
    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if not reason.check(ConnectionDone):
            response: Any = getattr(getattr(self, "_parser", None), "response", None)
            if response is not None:
                setattr(response, _LOST, reason)
        super().connectionLost(reason)


class _QuietFactory(_HTTP11ClientFactory):
    """The pool's per-connection factory: no log line per connection, and the telling protocol."""

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _TellingClientProtocol(self._quiescentCallback)


class QuietPool(HTTPConnectionPool):
    _factory = _QuietFactory
