"""The private Twisted hooks the upstream pool relies on, pinned."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

from regproxy.upstream.pool import QuietPool, _TellingClientProtocol, connection_lost_abruptly


class _Parser:
    def __init__(self) -> None:
        self.response = type("R", (), {})()
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


def test_pool_builds_the_telling_protocol() -> None:
    """QuietPool's factory (a private Twisted base) builds our protocol, a real HTTP11ClientProtocol."""
    factory = QuietPool._factory(lambda p: None, None)  # type: ignore[call-arg]
    assert issubclass(QuietPool, HTTPConnectionPool) and isinstance(factory, _HTTP11ClientFactory)
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, _TellingClientProtocol) and isinstance(protocol, HTTP11ClientProtocol)
    assert hasattr(protocol, "_parser")  # the private attribute the protocol reads


def test_reset_is_noted_on_the_response() -> None:
    """A connection lost other than orderly is noted on the response being parsed; an orderly close is not."""
    for reason, abrupt in ((Failure(ConnectionLost()), True), (Failure(ConnectionDone()), False)):
        protocol = _TellingClientProtocol()
        parser = _Parser()
        protocol._parser = parser  # type: ignore[assignment]
        try:
            protocol.connectionLost(reason)
        except Exception:
            pass  # the base class's state machine: not under test here
        assert connection_lost_abruptly(parser.response) is abrupt  # type: ignore[arg-type]
