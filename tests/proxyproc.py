"""Run C{twist regproxy} as a real subprocess for integration and client tests.

Tests talk to the proxy over real sockets, as docker and skopeo do; the process
is started exactly as the README tells operators to start it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.upstream.pki import PKIFiles, make_pki

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free loopback port (the proxy is told it on the command line)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class ProxyProcess:
    """A running regproxy: its URLs, its TLS material and its process."""

    workdir: Path
    upstream: str
    args: Sequence[str] = ()
    tls: bool = True
    port: int = 0
    tls_port: int = 0
    pki: PKIFiles | None = None
    process: subprocess.Popen[bytes] | None = None
    #: A TOML configuration (C{--config FILE}); the upstreams are then the file's and
    #: C{upstream} is not passed (C{--upstream} and C{--config} exclude each other).
    config: Path | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "regproxy.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    @property
    def tls_host(self) -> str:
        return f"127.0.0.1:{self.tls_port}"

    @property
    def ca_pem(self) -> Path:
        assert self.pki is not None
        return self.pki.ca_cert

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "twisted", "--log-format=text", "regproxy"]
        argv += ["--listen", f"tcp:{self.port}:interface=127.0.0.1"]
        if self.tls and self.pki is not None:
            argv += [
                "--listen",
                f"ssl:{self.tls_port}:interface=127.0.0.1"
                f":privateKey={self.pki.server_key}:certKey={self.pki.server_cert}",
            ]
        if self.config is not None:
            return argv + ["--config", str(self.config), *self.args]
        return argv + ["--upstream", self.upstream, *self.args]

    def start(self, timeout: float = 20.0, keep_ports: bool = False) -> ProxyProcess:
        """Start the proxy on free ports (or, with C{keep_ports}, on the ones it had: a restart)."""
        if self.tls and self.pki is None:
            self.pki = make_pki(self.workdir / "pki")
        for _ in range(3):
            if not keep_ports:
                self.port = free_port()
                self.tls_port = free_port() if self.tls else 0
            log = self.log_path.open("ab")
            self.process = subprocess.Popen(
                self.command(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
            )
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                if _answers(self.port) and (not self.tls or _answers(self.tls_port)):
                    return self
                time.sleep(0.05)
            self.stop()
            if "Address already in use" not in self.log_text():
                break
        raise RuntimeError(f"regproxy did not start:\n{self.log_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the proxy dies mid-whatever, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_kib(self) -> int:
        """Resident memory of the proxy process now, in KiB."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
