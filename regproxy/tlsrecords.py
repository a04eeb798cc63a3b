"""TLS with one trip through Python per chunk relayed, not one per 16 KiB record.

Twisted's L{TLSMemoryBIOProtocol} hands OpenSSL at most one record (16 KiB)
per C{send}, reads the encrypted bytes back and writes them to the socket after
each one; and on the way in it delivers every record's plaintext separately,
so a 256 KiB read from an upstream runs the HTTP parser, the relay and the
client's write 16 times. Profiled on a TLS listener (benchmarks/README.md),
that Python around pyOpenSSL cost more than the cipher.

L{BatchedTLS} keeps Twisted's logic and changes only how much goes at once:
a whole write is encrypted in one C{SSL_write} (pyOpenSSL turns on partial
writes, which return after each 16 KiB record: 16 calls from Python per
chunk; this connection turns them off again) before one C{bio_read} and one
transport write; every record a socket read completes is decrypted, with
C{SSL_read} into one buffer rather than pyOpenSSL's C{recv} (a new buffer, an
error check and a copy per record), before one delivery.

It replaces the protocol class of L{TLSMemoryBIOFactory}, which every TLS
connection in the process uses (C{--listen ssl:...} through C{startTLS},
upstream connections through C{wrapClientTLS}); no public API chooses that
class for the C{ssl:} endpoint. It overrides the private C{_write},
C{_flushSendBIO} and C{_flushReceiveBIO}, and uses pyOpenSSL's private
C{Connection._ssl} and C{OpenSSL._util} bindings to clear the mode (pyOpenSSL
has set_mode but no way to clear one) and to call C{SSL_read};
tests/unit/test_tlsrecords.py pins the names and the behaviour it relies on.

Without partial writes, OpenSSL wants a write it could not finish (C{WANT_READ}
during a renegotiation) retried from the same first byte, with at least as many
bytes, possibly moved (pyOpenSSL sets C{SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER}):
which is what Twisted's buffering of C{data[sent:]} does.
"""

from __future__ import annotations

from typing import Any

from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _openssl
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

#: Plaintext handed to OpenSSL per C{send} (a relayed chunk is 256 KiB): it
#: bounds what the send BIO holds at once.
_SLICE = 1 << 18
#: Largest read from the send BIO: a 256 KiB chunk plus its record overhead in one.
_BIO_READ = 1 << 19
#: Plaintext per C{recv}: one record's worth (OpenSSL returns no more per call).
_RECV = 1 << 15
#: Where the records of one socket read are decrypted to, one after the other
#: (a read is at most C{--read-size}, 16 MiB; larger plaintext goes out in
#: pieces). Shared: only the reactor thread touches TLS connections.
_PLAIN_SIZE = 1 << 20
_PLAIN = _ffi.new("char[]", _PLAIN_SIZE)


class BatchedTLS(BufferingTLSTransport):
    """L{BufferingTLSTransport}, encrypting a whole write and decrypting a whole read per Python round."""

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        if self._tlsConnection is not None:
            _openssl.SSL_clear_mode(self._tlsConnection._ssl, _openssl.SSL_MODE_ENABLE_PARTIAL_WRITE)

    def _write(self, data: bytes) -> None:  # type: ignore[override]
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        sent = 0
        try:
            while sent < len(data):
                try:
                    sent += self._tlsConnection.send(view[sent : sent + _SLICE])
                except WantReadError:
                    # Renegotiation or key update in the way: Twisted's buffering takes over.
                    self._bufferedWrite(data[sent:])
                    break
                except Error:
                    self._tlsShutdownFinished(Failure())
                    return
        finally:
            view.release()
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        transport = self.transport
        assert transport is not None  # only called while connected
        while True:
            try:
                encrypted = self._tlsConnection.bio_read(_BIO_READ)
            except WantReadError:
                return  # the BIO is empty
            transport.write(encrypted)
            if len(encrypted) < _BIO_READ:
                return

    def _flushReceiveBIO(self) -> None:
        # Records are decrypted with SSL_read straight into one buffer; only
        # when it returns nothing is pyOpenSSL's recv asked, to turn the
        # condition (want more bytes, close_notify, an error) into its
        # exception: SSL_read in that state gives the same answer again.
        plain: list[bytes] = []
        failure: Failure | None = None
        closed = False
        ssl = self._tlsConnection._ssl
        got = 0
        while not self._lostTLSConnection:
            n = _openssl.SSL_read(ssl, _PLAIN + got, _PLAIN_SIZE - got)
            if n > 0:
                got += n
                if _PLAIN_SIZE - got < _RECV:
                    plain.append(_ffi.buffer(_PLAIN, got)[:])
                    got = 0
                continue
            if got:
                plain.append(_ffi.buffer(_PLAIN, got)[:])
                got = 0
            try:
                plain.append(self._tlsConnection.recv(_RECV))
            except WantReadError:
                break
            except ZeroReturnError:
                closed = True
                break
            except Error:
                failure = Failure()
                break
        if got:
            plain.append(_ffi.buffer(_PLAIN, got)[:])
        if plain and not self._aborted:
            ProtocolWrapper.dataReceived(self, plain[0] if len(plain) == 1 else b"".join(plain))
        if closed and not self._lostTLSConnection:
            # The peer's close_notify, after the data before it was delivered.
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
        elif failure is not None and not self._lostTLSConnection:
            self._tlsShutdownFinished(failure)
        self._flushSendBIO()


def install() -> None:
    """Make every TLS connection of this process a L{BatchedTLS}."""
    TLSMemoryBIOFactory.protocol = BatchedTLS
