"""Fixtures for real-client tests against a running regproxy (``proxy``) and the Hub stand-in (``hub``).

Session scope: one dockerd (``registry-mirrors = [proxy.url]``) and one containerd
for the whole run, each stopped at the end.  Function-scoped wrappers
(``docker_client``, ``ctr_client``) remove every image after a test so the next
pull really goes through the proxy again, and ``proxy_log`` gives the proxy's
access-log lines written during the test.

Note: ``test_harness.py`` defines its own function-scoped ``dockerd`` and
``containerd`` fixtures at module level; those override these (module beats
conftest), so the harness self-tests are unaffected.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxyproc import ProxyProcess

from .daemons import Containerd, Dockerd, Podman

TIMINGS: dict[str, float] = {}


def record_timing(name: str, seconds: float) -> None:
    """Keep a timing for the session summary (printed, and written to ``<basetemp>/pull-client-timings.json``)."""
    TIMINGS[name] = round(seconds, 3)
    print(f"[timing] {name}: {seconds:.2f}s")


@pytest.fixture(scope="session", autouse=True)
def _pull_client_timing_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    if TIMINGS:
        out = tmp_path_factory.getbasetemp() / "pull-client-timings.json"
        out.write_text(json.dumps(TIMINGS, indent=2))
        print("\n[timing] pull-client summary:", json.dumps(TIMINGS, indent=2))


# -- daemons ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dockerd(proxy: ProxyProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A private dockerd with ``registry-mirrors = [proxy.url]`` (Hub names blackholed)."""
    d = Dockerd(tmp_path_factory.mktemp("dockerd"))
    d.start(mirrors=[proxy.url])
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A private containerd (overlayfs snapshotter, CRI off); ``ctr`` fetches in the Hub-blackholed namespace."""
    c = Containerd(tmp_path_factory.mktemp("containerd"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _docker_wipe(d: Dockerd) -> None:
    ids = d.docker("images", "-aq", check=False, timeout=60).stdout.split()
    if ids:
        d.docker("rmi", "--force", *sorted(set(ids)), check=False, timeout=300)


@pytest.fixture
def docker_client(dockerd: Dockerd) -> Iterator[Dockerd]:
    """The session dockerd with no local images before and after the test (and no login state after)."""
    _docker_wipe(dockerd)
    try:
        yield dockerd
    finally:
        _docker_wipe(dockerd)
        cfg = dockerd.docker_config / "config.json"
        if cfg.exists():
            cfg.write_text('{"auths": {}}\n')


def _ctr_wipe(c: Containerd) -> None:
    refs = list(c.images())
    if refs:
        c.rmi(*refs, check=False)


@pytest.fixture
def ctr_client(containerd: Containerd) -> Iterator[Containerd]:
    """The session containerd with no images before and after the test."""
    _ctr_wipe(containerd)
    try:
        yield containerd
    finally:
        _ctr_wipe(containerd)


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    """A daemonless rootful podman with private vfs storage for one test."""
    p = Podman(tmp_path / "podman")
    try:
        yield p
    finally:
        p.close()


# -- proxy observation ----------------------------------------------------------------

ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<uri>\S+)" (?P<status>\d{3}) (?P<bytes>\d+) (?P<secs>[\d.]+)s '
    r"upstream=(?P<upstream>\S+)(?: \((?P<note>[^)]*)\))?"
)


class ProxyLog:
    """The proxy's log from the moment the fixture was created."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.mark = len(proxy.log_text())

    def reset(self) -> None:
        self.mark = len(self.proxy.log_text())

    def text(self) -> str:
        return self.proxy.log_text()[self.mark :]

    def access(self) -> list[dict[str, str]]:
        """Access-log entries (method, uri, status, bytes, secs, upstream, note) since the mark."""
        out = []
        for line in self.text().splitlines():
            m = ACCESS.search(line)
            if m:
                out.append({k: (v or "") for k, v in m.groupdict().items()})
        return out

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.text().splitlines() if needle in line]


@pytest.fixture
def proxy_log(proxy: ProxyProcess) -> ProxyLog:
    """Access-log lines the proxy writes during this test."""
    return ProxyLog(proxy)


@pytest.fixture(scope="session")
def proxy_cert_dir(proxy: ProxyProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``--cert-dir`` for skopeo/podman holding only the proxy's CA (as ``ca.crt``)."""
    d = tmp_path_factory.mktemp("proxy-certs")
    shutil.copy(proxy.ca_pem, d / "ca.crt")
    return d


@pytest.fixture
def stopwatch(request: pytest.FixtureRequest) -> Iterator[None]:
    """Record the test body's duration under the test's name."""
    t0 = time.monotonic()
    yield
    record_timing(request.node.name, time.monotonic() - t0)
