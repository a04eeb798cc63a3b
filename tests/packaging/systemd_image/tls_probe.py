#!/opt/regproxy/bin/python
"""Start the client TLS handshake Twisted starts for every upstream HTTPS connection.

pyOpenSSL's verify callback is a cffi ffi.callback(): under
MemoryDenyWriteExecute=yes this fails with "Cannot allocate write+execute
memory for ffi.callback()".
"""

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

factory = TLSMemoryBIOFactory(optionsForClientTLS("registry-1.docker.io"), True, Factory.forProtocol(Protocol))
protocol = factory.buildProtocol(None)
transport = StringTransport()
protocol.makeConnection(transport)
hello = transport.value()
assert hello[:1] == b"\x16", hello[:16]  # a TLS handshake record: the ClientHello
print(f"client TLS handshake started: {len(hello)} bytes of ClientHello")
