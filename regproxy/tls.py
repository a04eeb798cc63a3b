"""Outbound TLS: system roots plus the operator's extra CAs (C{--upstream-ca}).

An internal registry, its token realm and its blob store are often signed by a
company CA; trusting it must not mean distrusting the public roots, so both go
into the same verification store.
"""

from __future__ import annotations

import re
from pathlib import Path

from OpenSSL import SSL, crypto
from twisted.internet._sslverify import IOpenSSLTrustRoot  # the trust-root hook optionsForClientTLS takes
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_certificates(paths: list[str]) -> list[crypto.X509]:
    """Every certificate in the given PEM files.

    @raise ValueError: a file holds no certificate (a likely misconfiguration).
    """
    certs: list[crypto.X509] = []
    for path in paths:
        blocks = _PEM_CERT.findall(Path(path).read_bytes())
        if not blocks:
            raise ValueError(f"{path}: no PEM certificate found")
        certs.extend(crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks)
    return certs


@implementer(IOpenSSLTrustRoot)
class SystemAndExtraRoots:
    """Trust OpenSSL's default roots and some extra CA certificates."""

    def __init__(self, extra: list[crypto.X509]) -> None:
        self._extra = extra

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        assert store is not None
        for cert in self._extra:
            store.add_cert(cert)


@implementer(IPolicyForHTTPS)
class ExtraCAPolicy:
    """Browser-like verification (hostname/IP checked) against L{SystemAndExtraRoots}."""

    def __init__(self, extra: list[crypto.X509]) -> None:
        self._root = SystemAndExtraRoots(extra)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


def policy_for(ca_files: list[str]) -> IPolicyForHTTPS:
    """The TLS policy for every outbound connection."""
    if not ca_files:
        return BrowserLikePolicyForHTTPS()
    return ExtraCAPolicy(load_certificates(ca_files))
