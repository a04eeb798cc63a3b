"""Start, describe and stop the servers the benchmark talks to.

Every server is a child process listening on 127.0.0.1 on a free port, with
its own config and log under the run directory, so a benchmark run never
depends on (or disturbs) anything already running on the machine.  Each
process is started in its own session and stopped by its own pid.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The source tree regproxy runs from (its cwd: `python -m twisted regproxy` finds the
#: plugin and the package there). run.py --snapshot points it at an export of HEAD.
REGPROXY_TREE = REPO_ROOT


def snapshot_tree(workdir: Path) -> tuple[Path, str]:
    """git archive HEAD into workdir/tree-<sha> (reused): a copy nobody edits while the
    benchmark runs. Returns the directory and the commit."""
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = workdir / f"tree-{sha[:12]}"
    if not (tree / "regproxy").is_dir():
        tmp = workdir / f"tree-{sha[:12]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.Popen(["git", "archive", "HEAD"], cwd=REPO_ROOT, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(tmp)], stdin=archive.stdout, check=True)
        assert archive.stdout is not None
        archive.stdout.close()
        if archive.wait() != 0:
            raise RuntimeError("git archive HEAD failed")
        tmp.rename(tree)
    return tree, sha


def tree_version(tree: Path) -> str:
    """The commit regproxy runs from, with "-dirty" when the work tree has changes."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=tree,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def discard_data(rundir: Path) -> None:
    """Once every server of a run has stopped: remove its directories (caches, storages,
    dockerd's images: gigabytes per run), keep the configs and logs next to them."""
    for child in rundir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)


def free_port() -> int:
    """Ask the kernel for an unused loopback port (tiny race, fine here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, headers: dict[str, str] | None = None,
             timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One small GET with the stdlib; TLS is accepted unverified (self-signed)."""
    u = urllib.parse.urlsplit(url)
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", u.path + ("?" + u.query if u.query else ""), headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def process_tree(pid: int) -> list[int]:
    """pid plus all its descendants (nginx workers, twistd children)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class Proc:
    """A child server process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path | None = None) -> None:
        self.name, self.argv, self.log, self.cwd = name, argv, log, cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as f:
            self.popen = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=self.cwd,
                                          start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        """SIGTERM our own process group (nginx workers included), then SIGKILL."""
        if self.popen is None or self.popen.poll() is not None:
            return
        pgid = self.popen.pid  # start_new_session: pgid == pid of the child we made
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, n: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_http(url: str, proc: Proc, timeout: float = 20.0) -> str | None:
    """Wait until url answers any HTTP status; return an error text or None."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            return f"{proc.name} exited (rc={proc.popen.returncode if proc.popen else '?'}): " \
                   f"{proc.log_tail()}"
        try:
            http_get(url, timeout=2)
            return None
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    return f"{proc.name} did not answer {url} within {timeout:.0f}s ({last}): {proc.log_tail()}"


REGISTRY_CONFIG = """\
version: 0.1
log:
  level: {level}
  formatter: text
  accesslog:
    disabled: {noaccess}
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:{port}
{tls}{proxy}"""


class Registry:
    """A distribution (docker-registry) instance: the upstream, or a pull-through proxy.

    The upstream keeps its access log on: the combined-log lines give the bytes it
    sent per blob GET, which is how upstream traffic of each peer is counted.
    """

    ACCESS = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')

    def __init__(self, name: str, rundir: Path, storage: Path,
                 remote: str | None = None, tls: tuple[Path, Path] | None = None) -> None:
        """tls: (key, cert) to serve HTTPS (distribution's http.tls), e.g. a second
        instance on the upstream's storage as the TLS upstream."""
        self.name, self.storage, self.remote = name, storage, remote
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.config = rundir / f"{name}.yml"
        proxy = f"proxy:\n  remoteurl: {remote}\n" if remote else ""
        tls_conf = f"  tls:\n    certificate: {tls[1]}\n    key: {tls[0]}\n" if tls else ""
        # The proxy logs only warnings: it is measured, the upstream is not.
        self.config.write_text(REGISTRY_CONFIG.format(
            level="warn" if remote else "info", noaccess="true" if remote else "false",
            root=storage, port=self.port, proxy=proxy, tls=tls_conf))
        self.proc = Proc(name, ["docker-registry", "serve", str(self.config)],
                         rundir / f"{name}.log")

    def start(self, fresh: bool = False) -> str | None:
        if fresh and self.storage.exists():
            shutil.rmtree(self.storage)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.proc.start()
        return wait_http(self.url + "/v2/", self.proc)

    def restart(self, fresh: bool) -> None:
        self.proc.stop()
        err = self.start(fresh=fresh)
        if err:
            raise RuntimeError(err)

    def log_mark(self) -> int:
        return self.proc.log.stat().st_size

    def requests_since(self, mark: int) -> list[tuple[str, str, int, int]]:
        """(method, path, status, body bytes) of each request the access log
        recorded after mark."""
        with open(self.proc.log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return [(m.group(1), m.group(2), int(m.group(3)),
                 int(m.group(4)) if m.group(4) != "-" else 0)
                for m in self.ACCESS.finditer(text)]

    def blob_bytes_since(self, mark: int) -> int:
        """Bytes of blob GET responses the access log recorded after mark."""
        return sum(n for method, path, _, n in self.requests_since(mark)
                   if method == "GET" and "/blobs/" in path)

    def has_blob(self, digest: str) -> bool:
        """True once the blob is complete in this registry's own storage."""
        algo, hexd = digest.split(":")
        data = self.storage / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"
        return data.exists()


#: What both nginx peers share: processes, pid and logs, temp paths in the run directory.
_NGINX_HEAD = """\
worker_processes 2;
pid {d}/{name}.pid;
error_log {d}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-tmp/body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;
"""

NGINX_CONFIG = _NGINX_HEAD + """\
    upstream registry {{ server {upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://registry;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
{buffers}        }}
    }}
}}
"""


class Nginx:
    """nginx as a plain streaming reverse proxy: the baseline to beat."""

    def __init__(self, rundir: Path, upstream_hostport: str, buffer: str = "", name: str = "nginx") -> None:
        """buffer: proxy_buffer_size (with proxy_buffering off, the size of each
        read/write); empty keeps nginx's default of one page."""
        self.port = free_port()
        buffers = (f"            proxy_buffer_size {buffer}; proxy_buffers 8 {buffer};\n"
                   f"            proxy_busy_buffers_size {buffer};\n") if buffer else ""
        self.url = f"http://127.0.0.1:{self.port}"
        (rundir / "nginx-tmp").mkdir(exist_ok=True)
        conf = rundir / f"{name}.conf"
        conf.write_text(NGINX_CONFIG.format(d=rundir, upstream=upstream_hostport, port=self.port,
                                             buffers=buffers, name=name))
        self.proc = Proc(name, ["nginx", "-p", str(rundir), "-c", str(conf),
                                "-g", "daemon off;"], rundir / f"{name}.log")

    def start(self) -> str | None:
        self.proc.start()
        return wait_http(self.url + "/v2/", self.proc)


def make_cert(rundir: Path) -> tuple[Path, Path]:
    """Self-signed cert for 127.0.0.1 (made once per run), for regproxy's TLS
    listener and the TLS upstream; it is also the CA the proxies are given."""
    key, cert = rundir / "tls-key.pem", rundir / "tls-cert.pem"
    if key.exists() and cert.exists():
        return key, cert
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


class RegProxy:
    """The proxy under test, run from the work tree so its twisted plugin is found.

    cache: a cache directory (under the run directory) turns the blob and
    manifest cache on; restart(fresh=True) empties it (the cold peers).
    config: TOML text written next to it and passed as --config (the tag rules).
    """

    def __init__(self, rundir: Path, upstream_url: str, python: str, extra: tuple[str, ...] = (),
                 name: str = "regproxy", cache: bool = False, config: str | None = None,
                 upstream_ca: Path | None = None) -> None:
        self.name = name
        self.port, self.tls_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tls_url = f"https://127.0.0.1:{self.tls_port}"
        self.cache_dir = rundir / f"{name}-cache" if cache else None
        key, cert = make_cert(rundir)
        argv = [python, "-m", "twisted", "regproxy", *extra,
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--listen", f"ssl:{self.tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]
        if config is not None:
            conf = rundir / f"{name}.toml"
            conf.write_text(config)
            argv += ["--config", str(conf)]
        else:
            argv += ["--upstream", upstream_url, "--no-library-prefix"]
            if upstream_ca is not None:
                argv += ["--upstream-ca", str(upstream_ca)]
        if self.cache_dir is not None:
            argv += ["--cache-dir", str(self.cache_dir)]
        # A restart (cold peers) should not wait for idle keep-alive clients.
        argv += ["--drain-timeout", "2"]
        self.proc = Proc(name, argv, rundir / f"{name}.log", cwd=REGPROXY_TREE)

    def start(self) -> str | None:
        self.proc.start()
        err = wait_http(self.url + "/v2/", self.proc, timeout=30)
        return err or wait_http(self.tls_url + "/v2/", self.proc, timeout=10)

    def restart(self, fresh: bool = True) -> None:
        """Stop; with fresh, empty the cache directory; start again."""
        self.proc.stop()
        if fresh and self.cache_dir is not None and self.cache_dir.exists():
            shutil.rmtree(self.cache_dir)
        err = self.start()
        if err:
            raise RuntimeError(err)

    def cache_status(self, path: str, headers: dict[str, str] | None = None) -> str:
        """The Cache-Status of a HEAD of path (plain listener)."""
        u = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        try:
            conn.request("HEAD", path, headers=headers or {})
            r = conn.getresponse()
            r.read()
            return r.getheader("Cache-Status", "")
        finally:
            conn.close()


NGINX_STATIC_CONFIG = _NGINX_HEAD + """\
    sendfile on;
    tcp_nopush on;
    types {{ }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /v2/ {{ default_type application/octet-stream; }}
        location ~ /manifests/ {{ default_type {manifest_type}; }}
    }}
}}
"""


class NginxStatic:
    """nginx serving the blob files themselves from disk (sendfile on): what a
    cache hit can at best be. files: URL path -> file (symlinked under a root)."""

    def __init__(self, rundir: Path, files: dict[str, Path], manifest_type: str,
                 name: str = "nginx-static") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = rundir / f"{name}-root"
        for urlpath, target in files.items():
            link = root / urlpath.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(target)
        (rundir / "nginx-tmp").mkdir(exist_ok=True)
        conf = rundir / f"{name}.conf"
        conf.write_text(NGINX_STATIC_CONFIG.format(d=rundir, port=self.port, root=root,
                                                    manifest_type=manifest_type, name=name))
        self.proc = Proc(name, ["nginx", "-p", str(rundir), "-c", str(conf),
                                "-g", "daemon off;"], rundir / f"{name}.log")

    def start(self) -> str | None:
        self.proc.start()
        return wait_http(self.url + "/v2/", self.proc)


class NaiveProxy:
    """benchmarks/naive_proxy.py: twisted.web.proxy.ReverseProxyResource in front of
    the upstream, nothing else (no flow control: it buffers whatever the client
    doesn't take yet)."""

    def __init__(self, rundir: Path, upstream_port: int, python: str, name: str = "naive") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(name, [python, str(Path(__file__).resolve().parent / "naive_proxy.py"),
                                "127.0.0.1", str(upstream_port), str(self.port)],
                         rundir / f"{name}.log")

    def start(self) -> str | None:
        self.proc.start()
        return wait_http(self.url + "/v2/", self.proc)


class DelayRelay:
    """benchmarks/delay_relay.py: a TCP relay that puts the upstream rtt_ms away."""

    def __init__(self, rundir: Path, target_port: int, rtt_ms: float, python: str,
                 name: str = "relay") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(name, [python, str(Path(__file__).resolve().parent / "delay_relay.py"),
                                "--listen", str(self.port), "--target", f"127.0.0.1:{target_port}",
                                "--rtt-ms", str(rtt_ms)], rundir / f"{name}.log")

    def start(self) -> str | None:
        self.proc.start()
        return wait_http(self.url + "/v2/", self.proc)


@dataclass
class Peer:
    """One column of the results: a base URL plus the processes charged for its work.

    prepare(digest) runs before every measurement: the cold peers restart on
    empty storage there, the warm ones make sure the blob is cached.
    settle() runs after a measurement, before upstream traffic is read.
    tests: the measurements (rows) this peer takes part in; skip: never these.
    upstream: the registry whose access log counts this peer's upstream traffic
    (default: the plain upstream).
    """

    name: str
    url: str
    pids: Callable[[], list[int]]
    prepare: Callable[[str | None], None] = lambda digest: None
    settle: Callable[[str | None], None] = lambda digest: None
    skip: set[str] = field(default_factory=set)
    unavailable: str | None = None
    tests: set[str] | None = None
    upstream: Registry | None = None
    key: str = ""

    def takes(self, test: str) -> bool:
        return test not in self.skip and (self.tests is None or test in self.tests)
