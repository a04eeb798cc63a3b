"""The "twisted naive" peer: the smallest reverse proxy Twisted offers.

    python benchmarks/naive_proxy.py UPSTREAM_HOST UPSTREAM_PORT LISTEN_PORT

twisted.web.proxy.ReverseProxyResource in a Site, nothing else: one new
HTTP/1.0 upstream connection per request, the upstream's answer written to
the client as it arrives with no flow control (whatever the client hasn't
taken yet piles up in the transport's write buffer), Twisted's default access
logging. It shows what Twisted costs before any of regproxy's own work, and
what a proxy without backpressure does with a slow client.
"""

from __future__ import annotations

import sys

from twisted.internet import endpoints, reactor
from twisted.web import proxy, server


def main() -> None:
    host, port, listen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    site = server.Site(proxy.ReverseProxyResource(host, port, b""))
    endpoints.serverFromString(reactor, f"tcp:{listen}:interface=127.0.0.1").listen(site)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
