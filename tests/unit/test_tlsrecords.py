"""BatchedTLS: the private Twisted names it overrides, and byte-exact TLS in both directions."""

from __future__ import annotations

import os

import pytest
from OpenSSL._util import ffi, lib
from OpenSSL.SSL import Error
from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols import tls
from twisted.python.failure import Failure
from twisted.test import iosim

from regproxy import tlsrecords

# Twisted's self-signed certificate helpers use pyOpenSSL calls now deprecated; fine for a test key.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Collect(Protocol):
    """Keeps what arrives and how the connection ended."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.deliveries = 0
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.deliveries += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = reason


def pair() -> tuple[Collect, Collect, iosim.IOPump]:
    """A TLS server and client, both L{BatchedTLS}, over an in-memory transport."""
    key = ssl.KeyPair.generate(size=2048)
    cert = key.selfSignedCert(1, CN="regproxy.test")
    server_options = ssl.CertificateOptions(privateKey=key.original, certificate=cert.original)
    client_options = ssl.CertificateOptions(verify=False)
    server_app, client_app = Collect(), Collect()
    server_factory = tls.TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(lambda: server_app))
    client_factory = tls.TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(lambda: client_app))
    server_factory.protocol = client_factory.protocol = tlsrecords.BatchedTLS
    _, _, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
    )
    pump.flush()
    return server_app, client_app, pump


def test_the_private_names_batched_tls_relies_on_exist() -> None:
    """Twisted still has the methods and attributes BatchedTLS overrides or calls (regproxy/tlsrecords.py)."""
    for name in (
        "_write",
        "_flushSendBIO",
        "_flushReceiveBIO",
        "_bufferedWrite",
        "_shutdownTLS",
        "_tlsShutdownFinished",
    ):
        assert callable(getattr(tls.TLSMemoryBIOProtocol, name)), name
    assert issubclass(tlsrecords.BatchedTLS, tls.BufferingTLSTransport)
    assert tls.TLSMemoryBIOFactory.protocol in (tls.BufferingTLSTransport, tlsrecords.BatchedTLS)
    server, _, _ = pair()
    wrapper = server.transport
    for attribute in ("_tlsConnection", "_lostTLSConnection", "_aborted"):
        assert hasattr(wrapper, attribute), attribute
    # pyOpenSSL's private handle and its bindings, to clear the partial-write mode.
    connection = wrapper._tlsConnection  # type: ignore[union-attr]
    assert hasattr(connection, "_ssl")
    assert callable(lib.SSL_clear_mode) and callable(lib.SSL_set_mode) and lib.SSL_MODE_ENABLE_PARTIAL_WRITE
    assert callable(lib.SSL_read) and ffi.buffer and ffi.new("char[]", 16)


def test_whole_writes_each_connection_has_partial_writes_off() -> None:
    """Both ends encrypt a write in one SSL_write: the partial-write mode pyOpenSSL sets is cleared."""
    server, client, _ = pair()
    for end in (server, client):
        mode = lib.SSL_set_mode(end.transport._tlsConnection._ssl, 0)  # type: ignore[union-attr]
        assert not mode & lib.SSL_MODE_ENABLE_PARTIAL_WRITE
        assert mode & lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER  # what a retried write of data[sent:] needs


def test_large_writes_arrive_byte_exact_in_both_directions() -> None:
    """Writes of many records each way come out identical, in order, whole."""
    server, client, pump = pair()
    up = [os.urandom(n) for n in (1, 16383, 16384, 16385, 256 << 10, 1 << 20)]
    down = os.urandom(3 << 20)
    for piece in up:
        assert client.transport is not None
        client.transport.write(piece)
    assert server.transport is not None
    server.transport.write(down)
    pump.flush()
    assert bytes(server.data) == b"".join(up)
    assert bytes(client.data) == down


def test_one_read_of_many_records_is_delivered_once() -> None:
    """The records one socket read completes reach the protocol as one delivery, not one per 16 KiB record."""
    server, client, pump = pair()
    assert server.transport is not None
    server.transport.write(os.urandom(256 << 10))
    pump.pump()  # the server's aggregated write goes out
    pump.pump()  # and arrives at the client in one read
    pump.flush()
    assert len(client.data) == 256 << 10
    assert client.deliveries < 4


def test_close_notify_ends_the_connection_after_the_data_before_it() -> None:
    """A peer that writes then closes: every byte is delivered before a clean connectionLost."""
    server, client, pump = pair()
    body = os.urandom(100_000)
    assert server.transport is not None
    server.transport.write(body)
    server.transport.loseConnection()
    pump.flush()
    assert bytes(client.data) == body
    assert client.ended is not None and server.ended is not None


def test_install_makes_it_the_protocol_of_every_tls_connection() -> None:
    """install() swaps the class TLSMemoryBIOFactory builds, which the ssl: endpoint and wrapClientTLS use."""
    saved = tls.TLSMemoryBIOFactory.protocol
    try:
        tlsrecords.install()
        assert tls.TLSMemoryBIOFactory.protocol is tlsrecords.BatchedTLS
    finally:
        tls.TLSMemoryBIOFactory.protocol = saved


def test_a_corrupt_record_after_data_delivers_the_data_then_fails_the_connection() -> None:
    """Bytes that aren't TLS after good records: the records' data arrives, then the connection ends with an error."""
    server, client, pump = pair()
    assert server.transport is not None
    server.transport.write(os.urandom(200_000))  # above the small-write aggregation: sent at once
    pump.flush()
    assert len(client.data) == 200_000
    tls_client = client.transport
    tls_client.dataReceived(b"\x17\x03\x03\x00\x20" + os.urandom(32))  # type: ignore[attr-defined]
    pump.flush()
    assert client.ended is not None and client.ended.check(Error) and len(client.data) == 200_000


def test_more_plaintext_than_the_shared_buffer_in_one_read() -> None:
    """One socket read carrying more than the 1 MiB decryption buffer comes out whole and in order."""
    server, client, pump = pair()
    assert server.transport is not None
    body = os.urandom(tlsrecords._PLAIN_SIZE * 2 + 12345)
    server.transport.write(body)
    pump.pump()
    pump.pump()
    pump.flush()
    assert bytes(client.data) == body
