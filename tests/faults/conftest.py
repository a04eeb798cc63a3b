"""Fixtures for the fault suite: regproxy as a real subprocess in front of hostile upstreams.

Each *rig* is one proxy process and the upstream(s) it fronts, shared by the tests of
the module that use it.  :meth:`Rig.begin` puts a rig back into its settled state
before a test; :meth:`Rig.after_fault` is the shared "after each fault" check: the
proxy still serves, its file descriptors are back at the warm-up baseline, its RSS is
near it, and its log gained no traceback.

The upstreams close idle keep-alive connections after half a second (as real servers
do), so once nothing is going on the proxy holds no upstream connection at all and its
descriptor count is exact, not "the baseline plus whatever the pool keeps".
"""

from __future__ import annotations

import base64
import datetime
import fcntl
import http.client
import ipaddress
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.faults.hostile import (
    HostileServer,
    bearer,
    blob,
    challenge,
    fd_count,
    rss_kib,
    sha256_digest,
    token_endpoint,
    v2_base,
    wait_until,
)
from tests.proxyproc import ProxyProcess

#: Descriptors the proxy may hold above its warm-up baseline once it has settled.
FD_SLACK = 2
#: Resident memory the proxy may have grown by since warm-up (allocator noise, caches).
RSS_SLACK_KIB = 30 * 1024
#: Timeouts the proxies run with: every fault resolves in about a second.
TIMEOUT_ARGS = [
    "--response-timeout",
    "1",
    "--idle-timeout",
    "1",
    "--client-timeout",
    "2",
    "--connect-timeout",
    "3",
    "--header-timeout",
    "5",
    "--max-redirects",
    "3",
]
#: Keep-alive connections to a hostile upstream are closed by it when idle this long.
UPSTREAM_IDLE = 0.5

#: The blob every "does it still serve?" request fetches from a hostile upstream.
NORMAL = bytes(range(256)) * 1024  # 256 KiB
NORMAL_DIGEST = sha256_digest(NORMAL)
NORMAL_PATH = f"/v2/ok/blobs/{NORMAL_DIGEST}"


@dataclass
class Reply:
    """One answer as the client saw it, and how long it took."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes
    elapsed: float

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> dict[str, object]:
        document = json.loads(self.body)
        assert isinstance(document, dict), document
        return document

    def error(self) -> dict[str, object]:
        """The first entry of an OCI error body (fails the test if the body is not one)."""
        assert (self.header("Content-Type") or "").startswith("application/json"), self.header("Content-Type")
        document = json.loads(self.body)
        assert isinstance(document, dict) and isinstance(document.get("errors"), list), document
        entry = document["errors"][0]
        assert isinstance(entry, dict) and {"code", "message"} <= entry.keys(), entry
        return entry


def call(
    proxy: ProxyProcess,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request to the proxy on a fresh connection, read to the end."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, response.headers, data, time.monotonic() - started)
    finally:
        conn.close()


@dataclass
class Figures:
    """What one after-fault check measured (printed with ``-s``; quoted in reports)."""

    test: str
    fd_baseline: int
    fd_after: int
    rss_baseline_kib: int
    rss_after_kib: int


@dataclass
class Rig:
    """A proxy process, the upstreams it fronts, and its settled-state baselines."""

    name: str
    proxy: ProxyProcess
    upstreams: list[HostileServer]
    #: A request that must succeed whenever the proxy is healthy.
    normal: Callable[[Rig], None]
    #: Restores the upstreams' scripted behaviour to the rig's defaults.
    reset: Callable[[Rig], None] = lambda rig: None
    fd_baseline: int = 0
    rss_baseline_kib: int = 0
    log_mark: int = 0
    figures: list[Figures] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proxy.process is not None and self.proxy.process.poll() is None, "the proxy process died"
        return self.proxy.process.pid

    def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None, timeout: float = 10.0
    ) -> Reply:
        """One request to this rig's proxy (see :func:`call`)."""
        return call(self.proxy, method, path, headers, body, timeout)

    def fds(self) -> int:
        return fd_count(self.pid)

    def rss(self) -> int:
        return rss_kib(self.pid)

    def quiet(self, timeout: float = 10.0) -> None:
        """Wait until no upstream connection is open (the proxy let go, or the upstream timed it out)."""
        wait_until(
            lambda: all(up.open_connections() == 0 for up in self.upstreams), timeout, what="upstream connections to close"
        )

    def warm_up(self, rounds: int = 3) -> None:
        """Run the normal request a few times, settle, and take the fd and RSS baselines."""
        for _ in range(rounds):
            self.normal(self)
        self.quiet()
        # Stable for a moment: the last close has been processed by the proxy.
        previous = -1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            now = self.fds()
            if now == previous:
                break
            previous = now
            time.sleep(0.2)
        self.fd_baseline = self.fds()
        self.rss_baseline_kib = self.rss()

    def begin(self) -> None:
        """Before a test: upstreams at their defaults, nothing in flight, log position noted."""
        self.reset(self)
        self.quiet()
        for up in self.upstreams:
            up.clear()
        self.log_mark = len(self.proxy.log_text())

    def new_log(self) -> str:
        """What the proxy logged since :meth:`begin`."""
        return self.proxy.log_text()[self.log_mark :]

    def after_fault(self, test: str) -> Figures:
        """The shared check after a fault: still serving, no fd leak, RSS near baseline, no traceback."""
        self.reset(self)
        self.normal(self)
        self.quiet()
        # Settle: the descriptors come back once the proxy has processed the last closes.
        deadline = time.monotonic() + 5
        while self.fds() > self.fd_baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        figures = Figures(test, self.fd_baseline, self.fds(), self.rss_baseline_kib, self.rss())
        self.figures.append(figures)
        print(
            f"\n[{self.name}] {test}: fds {figures.fd_after} (baseline {figures.fd_baseline}), "
            f"RSS {figures.rss_after_kib / 1024:.1f} MiB (baseline {figures.rss_baseline_kib / 1024:.1f} MiB)"
        )
        assert figures.fd_after <= self.fd_baseline + FD_SLACK, (
            f"file descriptors leaked: {figures.fd_after} open, baseline {self.fd_baseline}"
        )
        assert figures.rss_after_kib <= self.rss_baseline_kib + RSS_SLACK_KIB, (
            f"RSS {figures.rss_after_kib} KiB, baseline {self.rss_baseline_kib} KiB"
        )
        log = self.new_log()
        assert "Traceback" not in log and "Unhandled" not in log, log[-4000:]
        return figures


# -- the rigs ------------------------------------------------------------------------


def _hostile_defaults(rig: Rig) -> None:
    [up] = rig.upstreams
    up.clear_routes()
    up.route("GET", r"/v2/", v2_base())
    up.route(("GET", "HEAD"), NORMAL_PATH, blob(NORMAL))


def _normal_blob(rig: Rig) -> None:
    reply = call(rig.proxy, "GET", NORMAL_PATH)
    assert (reply.status, reply.body == NORMAL) == (200, True), (reply.status, reply.body[:300])


@pytest.fixture(scope="module")
def hostile_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One proxy in front of a plain-HTTP hostile upstream, short timeouts, shared by the module."""
    with HostileServer(idle_timeout=UPSTREAM_IDLE, max_stall=10) as up:
        workdir = tmp_path_factory.mktemp("proxy-hostile")
        with ProxyProcess(workdir, up.url, ["--no-library-prefix", *TIMEOUT_ARGS], tls=False) as proxy:
            rig = Rig("hostile", proxy, [up], _normal_blob, _hostile_defaults)
            _hostile_defaults(rig)
            rig.warm_up()
            yield rig


@pytest.fixture
def hostile(hostile_rig: Rig) -> Rig:
    """The shared hostile rig, reset for this test."""
    hostile_rig.begin()
    return hostile_rig


#: Credentials a logged-in client sends: the proxy forwards such token requests to the realm.
LOGIN = "Basic " + base64.b64encode(b"fault-user:fault-password").decode()


def teach_realm(rig: Rig, realm: str) -> Reply:
    """Have the upstream challenge with ``realm`` and a logged-in client run into it, so the proxy learns it.

    With credentials the client's ``GET /v2/`` goes upstream as it is and the 401
    comes back (rewritten to the proxy's token endpoint): the proxy has seen the
    challenge, whatever it does for anonymous clients.
    """
    [up] = rig.upstreams
    up.route("GET", r"/v2/", challenge(bearer(realm, "hostile")))
    reply = rig.call("GET", "/v2/", {"Authorization": LOGIN})
    assert reply.status == 401, (reply.status, reply.body[:300])
    assert f"http://127.0.0.1:{rig.proxy.port}/token" in (reply.header("WWW-Authenticate") or "")
    return reply


def _token_defaults(rig: Rig) -> None:
    _hostile_defaults(rig)
    [up] = rig.upstreams
    up.route(("GET", "POST"), r"/good-token", token_endpoint())


def _token_normal(rig: Rig) -> None:
    """A working realm again (a fault test left a broken one learnt), then a pull."""
    [up] = rig.upstreams
    teach_realm(rig, f"{up.url}/good-token")
    _normal_blob(rig)


@pytest.fixture(scope="module")
def token_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A proxy of its own for token faults: the broken realms they teach it must not leak into other tests."""
    with HostileServer(idle_timeout=UPSTREAM_IDLE, max_stall=10) as up:
        workdir = tmp_path_factory.mktemp("proxy-token")
        with ProxyProcess(workdir, up.url, ["--no-library-prefix", *TIMEOUT_ARGS], tls=False) as proxy:
            rig = Rig("token", proxy, [up], _token_normal, _token_defaults)
            _token_defaults(rig)
            rig.warm_up()
            yield rig


@pytest.fixture
def token(token_rig: Rig) -> Rig:
    """The token rig, reset for this test."""
    token_rig.begin()
    return token_rig


def _healthz(rig: Rig) -> None:
    reply = call(rig.proxy, "GET", "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")


@pytest.fixture(scope="module")
def dns_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A proxy whose upstream's host name cannot resolve (``.invalid`` is reserved for that)."""
    workdir = tmp_path_factory.mktemp("proxy-dns")
    args = ["--no-library-prefix", *TIMEOUT_ARGS, "--connect-timeout", "10"]
    with ProxyProcess(workdir, "https://nonexistent.invalid", args, tls=False) as proxy:
        rig = Rig("dns", proxy, [], _healthz)
        rig.warm_up()
        yield rig


@pytest.fixture
def dns(dns_rig: Rig) -> Rig:
    """The DNS rig, reset for this test."""
    dns_rig.begin()
    return dns_rig


# -- TLS: certificates that must each be refused ---------------------------------------


@dataclass(frozen=True)
class TLSMaterial:
    """A CA the proxy trusts, and server contexts with a good and three bad certificates."""

    ca_pem: Path
    good: ssl.SSLContext
    bad: dict[str, ssl.SSLContext]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "regproxy fault tests"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str, now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=400))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    directory: Path,
    label: str,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    names: list[x509.GeneralName],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> ssl.SSLContext:
    ca_key, ca_cert = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"fault test {label}"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = directory / f"{label}.pem"
    key_path = directory / f"{label}.key"
    pem = serialization.Encoding.PEM
    cert_path.write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


def mint_tls(directory: Path) -> TLSMaterial:
    """The trusted CA, a good certificate for 127.0.0.1, and: one from an untrusted CA,
    one that has expired, one for another name (all three otherwise correct)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    trusted = _ca("fault tests trusted CA", now)
    rogue = _ca("fault tests rogue CA", now)
    loopback: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    ca_pem = directory / "trusted-ca.pem"
    ca_pem.write_bytes(trusted[1].public_bytes(serialization.Encoding.PEM))
    return TLSMaterial(
        ca_pem=ca_pem,
        good=_leaf(directory, "good", trusted, loopback, now - day, now + 30 * day),
        bad={
            "untrusted-ca": _leaf(directory, "untrusted-ca", rogue, loopback, now - day, now + 30 * day),
            "expired": _leaf(directory, "expired", trusted, loopback, now - 60 * day, now - 30 * day),
            "wrong-name": _leaf(
                directory, "wrong-name", trusted, [x509.DNSName("registry.wrong-name.example")], now - day, now + 30 * day
            ),
        },
    )


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    """Certificates minted for this module (see :func:`mint_tls`)."""
    return mint_tls(tmp_path_factory.mktemp("fault-pki"))


def _tls_defaults(rig: Rig, good: ssl.SSLContext) -> None:
    [up] = rig.upstreams
    up.tls = good
    _hostile_defaults(rig)


@pytest.fixture(scope="module")
def tls_rig(tmp_path_factory: pytest.TempPathFactory, tls_material: TLSMaterial) -> Iterator[Rig]:
    """A proxy in front of an HTTPS hostile upstream whose certificate a test can swap."""
    with HostileServer(tls_material.good, idle_timeout=UPSTREAM_IDLE, max_stall=10) as up:
        workdir = tmp_path_factory.mktemp("proxy-tls")
        args = ["--no-library-prefix", "--upstream-ca", str(tls_material.ca_pem), *TIMEOUT_ARGS]
        with ProxyProcess(workdir, up.url, args, tls=False) as proxy:
            rig = Rig("tls", proxy, [up], _normal_blob, lambda rig: _tls_defaults(rig, tls_material.good))
            rig.reset(rig)
            rig.warm_up()
            yield rig


@pytest.fixture
def tls(tls_rig: Rig) -> Rig:
    """The TLS rig (good certificate back in place), reset for this test."""
    tls_rig.begin()
    return tls_rig


# -- a trap on an address a Sink cannot listen on ------------------------------------


class Trap:
    """A bare TCP listener that only records whether anything connected to it."""

    def __init__(self, host: str) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self.accepted = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"trap:{host}:{self.port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    @property
    def contacted(self) -> bool:
        return self.accepted > 0

    def close(self) -> None:
        self._closing.set()
        self._thread.join(2)
        self._sock.close()

    def __enter__(self) -> Trap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def private_local_address() -> str | None:
    """A private, non-loopback IPv4 address of one of this machine's interfaces, if any.

    A trap can listen there, so a redirect to it would really be answered: that is
    what makes "the target was never contacted" a real observation.
    """
    siocgifaddr = 0x8915
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        address = ipaddress.ip_address(socket.inet_ntoa(packed[20:24]))
        if address.is_private and not address.is_loopback and not address.is_link_local:
            return str(address)
    return None
