"""Shared fixtures, and the rule that a full run (CI) may not skip anything.

With C{REGPROXY_NO_SKIP=1} (set by C{.ci/run}) a skipped test fails the run: the
integration and real-client tests are the point of the suite, and a missing
daemon must not turn into a green build.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.manyconfig import config_proxy, many_upstreams
from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub
from tests.upstream.registries import CompanyRegistry, GhcrRegistry

pytest_plugins = ["tests.upstream.fixtures"]

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("REGPROXY_NO_SKIP") != "1":
        return
    if _skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        # A full run that collected nothing is broken, not green.
        print("\nREGPROXY_NO_SKIP=1: no tests were collected; failing the run")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: object, exitstatus: int) -> None:
    if os.environ.get("REGPROXY_NO_SKIP") == "1" and _skipped:
        write = terminalreporter.write_line
        write(f"REGPROXY_NO_SKIP=1: {len(_skipped)} test(s) skipped, failing the run:")
        for nodeid in _skipped:
            write(f"  skipped: {nodeid}")


@pytest.fixture(scope="session")
def proxy(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """regproxy in front of the Docker-Hub-like upstream, TCP and TLS listeners, library/ prefix on."""
    with ProxyProcess(
        tmp_path_factory.mktemp("proxy"),
        hub.registry_url,
        ["--upstream-ca", str(hub.ca_pem), "--library-prefix"],
    ) as started:
        yield started


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def many_proxy(hub: Hub, ghcr: GhcrRegistry, company: CompanyRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """regproxy with --config serving docker.io (hub, default), ghcr.io (also Host ghcr.mirror.test) and registry.corp.test; plain HTTP."""
    with config_proxy(tmp_path_factory.mktemp("many-proxy"), many_upstreams(hub, ghcr, company)) as started:
        yield started
