"""The twist plugin: discoverable, options as documented, services as configured."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError

from regproxy.tap import Options, makeService, parse_size, worker_args
from regproxy.workers import Listener, WorkerSupervisor, with_port


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_plugin_discoverable() -> None:
    """`twist regproxy` finds the plugin through twisted.plugins."""
    assert "regproxy" in {p.tapname for p in getPlugins(IServiceMaker)}


def test_defaults() -> None:
    """Defaults: listen on tcp:5000, Docker Hub upstream, library/ rule decided by the upstream."""
    config = parse()["config"]
    assert config.listen == ("tcp:5000",)
    (upstream,) = config.upstreams
    assert upstream.url == "https://registry-1.docker.io" and upstream.name == "docker.io" and upstream.default
    assert upstream.library_prefix is True
    assert config.max_upload_size == 0


def test_acceptance_command_line_spellings(tmp_path: Path) -> None:
    """The exact flags the acceptance checks use parse, and give one service per --listen."""
    from tests.upstream.pki import make_pki

    pki = make_pki(tmp_path)
    options = parse(
        "--listen", "tcp:0:interface=127.0.0.1",
        "--listen", f"ssl:0:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}",
        "--upstream", "https://127.0.0.1:5001",
        "--upstream-ca", str(pki.ca_cert),
        "--library-prefix",
    )
    assert options["library-prefix"] is True
    service = makeService(options, MemoryReactor())
    assert isinstance(service, MultiService)
    listeners = [c for c in service if isinstance(c, Listener)]
    assert len(listeners) == 2 and [c.description for c in listeners] == list(options["config"].listen)


def test_workers_share_bound_ports() -> None:
    """--workers N adds a supervisor whose workers get this process's configuration and bound ports."""
    options = parse("--listen", "tcp:0:interface=127.0.0.1", "--upstream", "http://127.0.0.1:1", "--workers", "2",
                    "--no-library-prefix", "--max-upload-size", "1M")
    service = makeService(options, MemoryReactor())
    assert any(isinstance(c, WorkerSupervisor) for c in service)
    args = worker_args(options, ["tcp:4321:interface=127.0.0.1"])
    assert args[:2] == ["--listen", "tcp:4321:interface=127.0.0.1"] and args[-1] == "--worker"
    assert "--no-library-prefix" in args
    reparsed = parse(*args)
    assert reparsed["worker"] and reparsed["config"].upstreams == options["config"].upstreams
    assert reparsed["config"].max_upload_size == 1 << 20


def test_with_port() -> None:
    """Workers bind the port the first process got, whatever the description's form."""
    assert with_port("tcp:0:interface=127.0.0.1", 5000) == "tcp:5000:interface=127.0.0.1"
    assert with_port("ssl:0:privateKey=k.pem:certKey=c.pem", 443) == "ssl:443:privateKey=k.pem:certKey=c.pem"
    assert with_port("tcp:interface=::1:port=0", 7) == "tcp:interface=::1:port=7"


def test_no_library_prefix_flag() -> None:
    """--no-library-prefix forces the rule off."""
    assert parse("--no-library-prefix")["library-prefix"] is False


@pytest.mark.parametrize("args", [["--upstream", "ftp://x"], ["--upstream-ca", "/nonexistent.pem"], ["--max-upload-size", "lots"], ["--public-url", "proxy:5000"]])
def test_bad_options_are_usage_errors(args: list[str]) -> None:
    """Misconfiguration is a clear usage error at startup."""
    with pytest.raises(UsageError):
        parse(*args)


def test_parse_size() -> None:
    """Sizes take binary units."""
    assert parse_size("0") == 0 and parse_size("10M") == 10 << 20 and parse_size("20G") == 20 << 30
    assert parse_size("1GiB") == 1 << 30 and parse_size(512) == 512


def test_installed_twist_lists_plugin(tmp_path: Path) -> None:
    """The installed package's `twist` (not the source tree) offers `regproxy` with its options."""
    installed = Path(sysconfig.get_paths()["purelib"]) / "twisted" / "plugins" / "regproxy_plugin.py"
    if not installed.exists():
        pytest.skip("regproxy is not installed in this environment (tox installs it)")
    twist = Path(sys.executable).parent / "twist"
    assert twist.exists() or shutil.which("twist")
    out = subprocess.run([str(twist), "regproxy", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--upstream" in out.stdout and "--library-prefix" in out.stdout


def test_process_wide_streaming_settings_follow_read_size() -> None:
    """makeService sets the socket read size, four chunks per send(2), and BatchedTLS for every TLS connection."""
    from twisted.internet import tcp
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from regproxy.tlsrecords import BatchedTLS

    saved = (tcp.Connection.bufferSize, tcp.Connection.SEND_LIMIT, TLSMemoryBIOFactory.protocol)
    try:
        makeService(parse("--listen", "tcp:0:interface=127.0.0.1", "--read-size", "128K"), MemoryReactor())
        assert tcp.Connection.bufferSize == 128 << 10 and tcp.Connection.SEND_LIMIT == 512 << 10
        assert TLSMemoryBIOFactory.protocol is BatchedTLS
    finally:
        tcp.Connection.bufferSize, tcp.Connection.SEND_LIMIT, TLSMemoryBIOFactory.protocol = saved


def test_credentials_without_allow_list_warn_at_startup(tmp_path: Path) -> None:
    """An upstream with the proxy's own account and no allow list logs a warning naming it; with allow it doesn't."""
    from twisted.logger import LogLevel, capturedLogs

    (tmp_path / "pw").write_text("secret\n")
    for allow, expected in (("", True), ("allow = ['library/*']\n", False)):
        path = tmp_path / "r.toml"
        path.write_text(
            "listen = ['tcp:0:interface=127.0.0.1']\n[[upstream]]\nname = 'ghcr.io'\nurl = 'https://ghcr.io'\n"
            f"username = 'bot'\npassword_file = 'pw'\n{allow}"
        )
        with capturedLogs() as events:
            makeService(parse("--config", str(path)), MemoryReactor())
        warned = [e for e in events if e["log_level"] == LogLevel.warn and "set allow" in e["log_format"]]
        assert bool(warned) is expected
        if warned:
            assert warned[0]["name"] == "ghcr.io" and warned[0]["user"] == "bot"
