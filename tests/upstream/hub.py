"""Test upstreams on loopback, all HTTPS: the Docker-Hub-like one and the machinery behind it.

:class:`Registry` runs the distribution registry (``docker-registry``), optionally
with its own token server and an nginx "CDN", and seeds it.  :class:`Hub` is the
Docker Hub stand-in built from it; Docker Hub's shape, which regproxy must cope with,
is reproduced with real servers rather than mocks:

* the distribution registry with token auth, so clients get a
  ``WWW-Authenticate: Bearer`` challenge and must fetch scoped JWTs;
* a token server (:mod:`tests.upstream.tokenserver`) with Hub's policy: anonymous pull
  except ``private/``, GET and OAuth2 POST flavours, refresh tokens;
* nginx as the blob CDN: the registry's redirect middleware answers blob GETs with a
  307 to it, and like an S3 presigned URL it rejects requests carrying Authorization.

The other shapes (a ghcr.io-like registry with its own realm, a company registry
without auth) are in :mod:`tests.upstream.registries`.  Each component runs as its own
process group and is killed on :meth:`Registry.stop`, on a failed
:meth:`Registry.start` and at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import parse_qs, urlsplit

from tests.upstream import images as img
from tests.upstream.client import Response, UpstreamClient
from tests.upstream.images import SeededImage
from tests.upstream.pki import PKIFiles, make_pki
from tests.upstream.tokens import USERS, Scope, Signer

REPO_ROOT = Path(__file__).resolve().parents[2]
REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
NGINX_BIN = shutil.which("nginx") or "/usr/sbin/nginx"


def host_platform() -> str:
    """``linux/amd64`` on x86_64 etc.: the platform real clients will pick."""
    machine = platform.machine().lower()
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
    }.get(machine, machine)
    return f"linux/{arch}"


def free_port() -> int:
    """An ephemeral loopback port for servers that cannot bind port 0 and report it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StartupError(RuntimeError):
    """A component did not come up; the message carries its log tail."""


@dataclass
class _Proc:
    """One child process with its combined stdout/stderr log."""

    name: str
    argv: list[str]
    log: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._log_file = self.log.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=dict(self.env) if self.env is not None else None,
            cwd=self.cwd,
            start_new_session=True,  # own process group: nginx workers die with it
        )

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        proc = self.popen
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout)
        if proc is not None and proc.poll() is not None:
            # The group may outlive its leader (nginx workers); sweep it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


#: One access-log line of the registry: gorilla/handlers' Apache "combined" format,
#: ``127.0.0.1 - - [01/Dec/2026:09:08:39 +0000] "GET /v2/ HTTP/1.1" 401 87 "" ""``.
#: The target is the raw request URI (query included); referer and user agent are
#: quoted with backslash escapes.  The logrus lines (``time=... level=...``) that share
#: the log never match.
_ACCESS_LINE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<target>\S+) (?P<proto>[^"]*)" '
    r"(?P<status>\d{3}) (?P<bytes>\d+|-) "
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<user_agent>(?:[^"\\]|\\.)*)"$'
)


_ESCAPE = re.compile(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[abfnrtv"\\])')
_CONTROL = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _unquote(text: str) -> str:
    """Undo gorilla's ``appendQuoted``: Go-style escapes (``\\"``, ``\\\\``, ``\\xHH``, ...)."""

    def one(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc[0] in "xuU":
            return chr(int(esc[1:], 16))
        return _CONTROL.get(esc, esc)

    return _ESCAPE.sub(one, text)


def parse_access_line(line: str) -> dict[str, Any] | None:
    """One registry access-log line as a dict, or None for any other log line.

    Keys: ``method``, ``target`` (raw request URI), ``path`` (without the query),
    ``query`` (parsed, values are lists), ``status`` and ``bytes`` (ints), ``proto``,
    ``remote``, ``time`` (as logged, second resolution), ``user_agent``, ``referer``.
    """
    m = _ACCESS_LINE.match(line.rstrip("\r\n"))
    if m is None:
        return None
    target = _unquote(m.group("target"))
    parts = urlsplit(target)
    size = m.group("bytes")
    return {
        "method": m.group("method"),
        "target": target,
        "path": parts.path,
        "query": parse_qs(parts.query, keep_blank_values=True),
        "status": int(m.group("status")),
        "bytes": 0 if size == "-" else int(size),
        "proto": m.group("proto"),
        "remote": m.group("remote"),
        "time": m.group("time"),
        "user_agent": _unquote(m.group("user_agent")),
        "referer": _unquote(m.group("referer")),
    }


#: ``seed=`` of :class:`Registry`: True = the class's :meth:`Registry.seed_images`,
#: False = nothing, or a callable run with the started registry (it may
#: :meth:`Registry.push`).
Seed = bool | Callable[["Registry"], object]


class Registry:
    """A distribution registry on loopback: ``with Registry(workdir) as r: ...`` or ``start()``/``stop()``.

    What it runs is set by class attributes (subclasses such as :class:`Hub` pick
    theirs), each overridable per instance by the keyword of the same name:

    * ``token_auth``: a token server of its own (:mod:`tests.upstream.tokenserver`,
      with the policy of :mod:`tests.upstream.tokens`) signing for ``service`` as
      ``issuer``, at ``token_path``; without it the registry has no auth at all;
    * ``cdn``: blob GET/HEAD answered with a 307 to an nginx serving the storage, which
      rejects requests carrying Authorization; without it the registry serves blobs;
    * ``seed``: what to push once it is up (see :data:`Seed`).

    Each instance makes its own PKI under ``workdir/pki`` (CA in :attr:`ca_pem`).
    Helpers (:meth:`get`, :meth:`head`, :meth:`blob_digest`) talk to the registry
    directly, with an admin token minted locally when there is auth, so they never
    appear in :meth:`token_log` (they do appear in :meth:`registry_requests`).
    """

    #: The ``service`` of the Bearer challenge and the tokens' ``aud``; "" without auth.
    service = "registry.test"
    issuer = "regproxy-test-auth"
    token_path = "/token"
    token_auth = True
    cdn = False
    #: Used in error messages.
    label = "registry"

    def __init__(
        self,
        workdir: Path,
        *,
        seed: Seed = True,
        startup_timeout: float = 20.0,
        service: str | None = None,
        issuer: str | None = None,
        token_path: str | None = None,
        token_auth: bool | None = None,
        cdn: bool | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        if service is not None:
            self.service = service
        if issuer is not None:
            self.issuer = issuer
        if token_path is not None:
            self.token_path = token_path
        if token_auth is not None:
            self.token_auth = token_auth
        if cdn is not None:
            self.cdn = cdn
        if not self.token_auth:
            self.service = ""
        self.seed_on_start = bool(seed)
        self._seed: Seed = seed
        self.startup_timeout = startup_timeout
        self.users: dict[str, str] = dict(USERS) if self.token_auth else {}
        self.platform = host_platform()
        self.images: dict[str, SeededImage] = {}
        self.storage_dir = self.workdir / "registry" / "storage"
        self.cache_dir = self.workdir / "cache"
        self.registry_log_path = self.workdir / "registry" / "registry.log"
        self.token_log_path = self.workdir / "token" / "requests.jsonl"
        self.cdn_log_path = self.workdir / "cdn" / "access.log"
        self.cdn_error_log_path = self.workdir / "cdn" / "error.log"
        self.registry_url = ""
        #: The realm of the Bearer challenge; "" without auth.
        self.token_realm = ""
        self.cdn_url = ""
        self.ca_pem = self.workdir / "pki" / "ca.pem"
        self._pki: PKIFiles | None = None
        self._signer: Signer | None = None
        self._client: UpstreamClient | None = None
        self._procs: list[_Proc] = []
        self._started = False

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Start token server, CDN and registry (those configured), wait until each answers, then seed."""
        if self._started:
            return self
        atexit.register(self.stop)
        self._started = True
        try:
            for sub in ("pki", "registry", "token", "cdn", "cache"):
                (self.workdir / sub).mkdir(parents=True, exist_ok=True)
            self.storage_dir.mkdir(parents=True, exist_ok=True)
            self._pki = make_pki(self.workdir / "pki")
            self.ca_pem = self._pki.ca_cert
            token_proc: _Proc | None = None
            if self.token_auth:
                self._signer = Signer.from_files(
                    self._pki.token_key, self._pki.token_cert, self.issuer, self.service
                )
                token_proc = self._spawn_token_server()
            if self.cdn:
                self._start_with_port_retry(self._spawn_cdn)
            token_base = ""
            if token_proc is not None:
                token_port = self._wait_port_file(
                    token_proc, self.workdir / "token" / "port"
                )
                token_base = f"https://127.0.0.1:{token_port}"
                self.token_realm = token_base + self.token_path
            self._client = UpstreamClient(
                "https://127.0.0.1:1",
                self.ca_pem,
                self._admin_token_for if self.token_auth else None,
            )
            self._start_with_port_retry(self._spawn_registry)
            self._client.registry_url = self.registry_url
            if token_proc is not None:
                self._wait_http(token_proc, token_base + "/healthz", 200)
            if self._seed is True:
                self.seed_images()
            elif callable(self._seed):
                self._seed(self)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process (reverse start order); safe to call repeatedly."""
        for proc in reversed(self._procs):
            proc.stop()
        self._procs.clear()
        self._started = False
        atexit.unregister(self.stop)

    # -- components ----------------------------------------------------------

    def _spawn(
        self,
        name: str,
        argv: list[str],
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> _Proc:
        proc = _Proc(name, argv, log, env=env, cwd=self.workdir)
        self._procs.append(proc)
        proc.start()
        return proc

    def _spawn_token_server(self) -> _Proc:
        assert self._pki is not None
        port_file = self.workdir / "token" / "port"
        port_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        return self._spawn(
            f"{self.label}: token server",
            [
                sys.executable,
                "-m",
                "tests.upstream.tokenserver",
                "--cert",
                str(self._pki.server_cert),
                "--key",
                str(self._pki.server_key),
                "--signing-cert",
                str(self._pki.token_cert),
                "--signing-key",
                str(self._pki.token_key),
                "--issuer",
                self.issuer,
                "--service",
                self.service,
                "--path",
                self.token_path,
                "--log",
                str(self.token_log_path),
                "--port-file",
                str(port_file),
            ],
            self.workdir / "token" / "server.log",
            env=env,
        )

    def _spawn_cdn(self) -> _Proc:
        """nginx serving the storage root; 400 to any request with Authorization."""
        assert self._pki is not None
        cdn = self.workdir / "cdn"
        for tmp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (cdn / "tmp" / tmp).mkdir(parents=True, exist_ok=True)
        port = free_port()
        # The storage dir sits below pytest's 0700 tmp dirs, so workers must run as
        # the same user as us; the `user` directive is only legal when we are root.
        user = "user root root;" if os.geteuid() == 0 else ""
        conf = f"""
{user}
worker_processes 1;
pid {cdn}/nginx.pid;
error_log {self.cdn_error_log_path} info;
events {{ worker_connections 512; }}
http {{
    client_body_temp_path {cdn}/tmp/client_body;
    proxy_temp_path {cdn}/tmp/proxy;
    fastcgi_temp_path {cdn}/tmp/fastcgi;
    uwsgi_temp_path {cdn}/tmp/uwsgi;
    scgi_temp_path {cdn}/tmp/scgi;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30;
    server_tokens off;
    map $http_authorization $cdn_auth {{ default true; "" false; }}
    log_format cdn escape=json '{{"time":"$time_iso8601","method":"$request_method",'
        '"uri":"$request_uri","status":$status,"bytes":$body_bytes_sent,'
        '"authorization":$cdn_auth,"range":"$http_range","user_agent":"$http_user_agent",'
        '"request_time":$request_time}}';
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {self._pki.server_cert};
        ssl_certificate_key {self._pki.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        access_log {self.cdn_log_path} cdn;
        root {self.storage_dir};
        # Like an S3/CloudFront presigned URL: an extra Authorization is an error.
        if ($http_authorization) {{ rewrite ^ /__authorization_rejected last; }}
        location = /__authorization_rejected {{
            internal;
            default_type application/xml;
            return 400 '<?xml version="1.0" encoding="UTF-8"?>\\n<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string parameter or the Authorization header should be specified</Message></Error>\\n';
        }}
        location = /__health {{
            access_log off;
            return 204;
        }}
        location / {{
            limit_except GET {{ deny all; }}
            autoindex off;
        }}
    }}
}}
"""
        conf_path = cdn / "nginx.conf"
        conf_path.write_text(conf)
        self.cdn_url = f"https://127.0.0.1:{port}"
        proc = self._spawn(
            f"{self.label}: cdn (nginx)",
            [
                NGINX_BIN,
                "-p",
                str(cdn),
                "-c",
                str(conf_path),
                "-e",
                str(self.cdn_error_log_path),
                "-g",
                "daemon off;",
            ],
            cdn / "nginx.out",
        )
        self._wait_http(
            proc, self.cdn_url + "/__health", 204, extra_log=self.cdn_error_log_path
        )
        return proc

    def registry_config(self, port: int) -> dict[str, Any]:
        """The registry's config (written as JSON, which is valid YAML)."""
        assert self._pki is not None
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {
                "level": "info",
                "formatter": "text",
                "accesslog": {"disabled": False},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{port}",
                "secret": secrets.token_hex(16),
                "tls": {
                    "certificate": str(self._pki.server_cert),
                    "key": str(self._pki.server_key),
                },
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.token_auth:
            config["auth"] = {
                "token": {
                    "realm": self.token_realm,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self._pki.token_cert),
                }
            }
        if self.cdn:
            config["middleware"] = {
                "storage": [{"name": "redirect", "options": {"baseurl": self.cdn_url}}]
            }
        return config

    def _spawn_registry(self) -> _Proc:
        port = free_port()
        self.registry_url = f"https://127.0.0.1:{port}"
        conf_path = self.workdir / "registry" / "config.yml"
        conf_path.write_text(json.dumps(self.registry_config(port), indent=2))
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        proc = self._spawn(
            f"{self.label}: registry",
            [REGISTRY_BIN, "serve", str(conf_path)],
            self.registry_log_path,
            env,
        )
        self._wait_http(
            proc, self.registry_url + "/v2/", 401 if self.token_auth else 200
        )
        return proc

    def _start_with_port_retry(
        self, spawn: Callable[[], _Proc], attempts: int = 3
    ) -> _Proc:
        """Retry when the pre-picked port was grabbed by someone else meanwhile."""
        for attempt in range(attempts):
            try:
                return spawn()
            except StartupError as e:
                if (
                    "address already in use" not in str(e).lower()
                    or attempt == attempts - 1
                ):
                    raise
                failed = self._procs.pop()
                failed.stop()
        raise AssertionError("unreachable")

    def _wait_port_file(self, proc: _Proc, path: Path) -> int:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if path.exists():
                text = path.read_text().strip()
                if text:
                    return int(text)
            if not proc.running():
                break
            time.sleep(0.02)
        raise StartupError(f"{proc.name} did not report its port:\n{proc.tail()}")

    def _wait_http(
        self, proc: _Proc, url: str, expect: int | None, extra_log: Path | None = None
    ) -> None:
        """Poll ``url`` until it answers (``expect`` status, or any if None)."""
        client = UpstreamClient(url, self.ca_pem, None)
        deadline = time.monotonic() + self.startup_timeout
        last: object = None
        while time.monotonic() < deadline:
            if not proc.running():
                break
            try:
                status = client.request("GET", url, auth=False, timeout=2).status
                if expect is None or status == expect:
                    return
                last = f"status {status}"
            except OSError as e:
                last = e
            time.sleep(0.05)
        detail = proc.tail()
        if extra_log is not None and extra_log.exists():
            detail += "\n" + "\n".join(
                extra_log.read_text(errors="replace").splitlines()[-20:]
            )
        state = "exited" if not proc.running() else f"not answering ({last})"
        raise StartupError(f"{proc.name} {state} at {url}:\n{detail}")

    # -- seeding -------------------------------------------------------------

    def seed_images(self) -> None:
        """What ``seed=True`` pushes at start; subclasses define their images."""

    def push(self, image: SeededImage) -> SeededImage:
        """Push an image (children and blobs first) and record it in :attr:`images`."""
        client = self.client
        for child in image.platforms.values():
            for blob in child.blobs():
                client.push_blob(image.repository, blob)
            client.put_manifest(
                image.repository, child.digest, child.media_type, child.manifest
            )
        for blob in image.blobs() if not image.is_index else []:
            client.push_blob(image.repository, blob)
        digest = client.put_manifest(
            image.repository, image.tag, image.media_type, image.manifest
        )
        if digest and digest != image.digest:
            raise RuntimeError(
                f"registry computed {digest} for {image.reference}, expected {image.digest}"
            )
        self.images[image.reference] = image
        return image

    # -- helpers for tests ---------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` of the registry, for image references."""
        return urlsplit(self.registry_url).netloc

    @property
    def client(self) -> UpstreamClient:
        """The direct (proxy-bypassing) client; ``request(..., auth=False)`` works for any URL."""
        if self._client is None:
            raise RuntimeError(f"{self.label} not started")
        return self._client

    def _admin_token_for(self, scopes: list[str]) -> str:
        return self.admin_token(*scopes)

    def admin_token(self, *scopes: str) -> str:
        """A registry token for ``admin`` granting exactly ``scopes`` (minted locally)."""
        if not self.token_auth:
            raise RuntimeError(f"{self.label} has no token auth")
        if self._signer is None:
            raise RuntimeError(f"{self.label} not started")
        parsed = [s for s in (Scope.parse(x) for x in scopes) if s is not None]
        return self._signer.sign("admin", parsed)

    def get(
        self, path: str, headers: Mapping[str, str] | None = None, *, auth: bool = True
    ) -> Response:
        """GET from the registry with an admin token (scoped from the path); no redirects followed."""
        return self.client.request("GET", path, headers, auth=auth)

    def head(
        self, path: str, headers: Mapping[str, str] | None = None, *, auth: bool = True
    ) -> Response:
        """HEAD counterpart of :meth:`get`."""
        return self.client.request("HEAD", path, headers, auth=auth)

    def delete(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        """DELETE with an admin token (delete is enabled in the registry)."""
        return self.client.request("DELETE", path, headers)

    def blob_digest(self, repository: str, digest: str) -> str:
        """Stream a blob from upstream (via the CDN redirect if any) and return its sha256 digest."""
        return self.client.blob_digest(repository, digest)

    @staticmethod
    def _jsonl(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [
            json.loads(line) for line in path.read_text().splitlines() if line.strip()
        ]

    def token_log(self) -> list[dict[str, Any]]:
        """Requests the token server saw: method, path, query, form, authorization, username, scopes.

        Empty without token auth.
        """
        return self._jsonl(self.token_log_path)

    def cdn_log(self) -> list[dict[str, Any]]:
        """Requests the CDN saw: method, uri, status, bytes, authorization (bool), range.

        Empty without a CDN.
        """
        return self._jsonl(self.cdn_log_path)

    def registry_log(self) -> str:
        """The registry's raw log (access log lines included)."""
        return (
            self.registry_log_path.read_text(errors="replace")
            if self.registry_log_path.exists()
            else ""
        )

    def registry_requests(self) -> list[dict[str, Any]]:
        """Every request the registry logged, oldest first (see :func:`parse_access_line`).

        The registry writes a line once its handler has returned, which can be just
        after the client read the whole response: use :meth:`wait_registry_request`
        to wait for one.  Start-up probes and seeding are in here too, so take
        ``len(...)`` before the action under test and look at what follows.
        """
        entries = (parse_access_line(line) for line in self.registry_log().splitlines())
        return [e for e in entries if e is not None]

    def registry_request_counts(self, since: int = 0) -> Counter[tuple[str, str]]:
        """``(method, path) -> n`` over :meth:`registry_requests` from index ``since``."""
        return Counter(
            (e["method"], e["path"]) for e in self.registry_requests()[since:]
        )

    def wait_registry_request(
        self,
        method: str,
        path: str,
        *,
        since: int = 0,
        count: int = 1,
        timeout: float = 5.0,
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` ``method path`` requests are logged after index ``since``; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                e
                for e in self.registry_requests()[since:]
                if e["method"] == method and e["path"] == path
            ]
            if len(found) >= count or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if len(found) < count:
            raise AssertionError(
                f"{self.label} logged {len(found)} of {count} {method} {path} within {timeout}s"
            )
        return found


class Hub(Registry):
    """Docker Hub stand-in: ``with Hub(workdir) as hub: ...`` or ``start()``/``stop()``.

    Token auth (service ``registry.test``, realm ``/token``) and the CDN.  After
    :meth:`start` the small images are seeded (see :attr:`images`); call
    :meth:`seed_big` for the 1 GiB one.
    """

    service = "registry.test"
    issuer = "regproxy-test-auth"
    token_path = "/token"
    token_auth = True
    cdn = True
    label = "hub"

    def seed_images(self) -> None:
        p = self.platform
        alpine = img.make_image(
            "library/alpine", "3.21", seed="alpine-3.21", platform=p
        )
        self.push(alpine)
        self.push(_retag(alpine, "latest"))
        self.push(
            img.make_image("library/alpine", "3.20", seed="alpine-3.20", platform=p)
        )
        self.push(
            img.make_image("library/alpine", "3.19", seed="alpine-3.19", platform=p)
        )
        for repo, oci in (("library/multi", False), ("library/ociidx", True)):
            children = [
                img.make_image(repo, "latest", seed=repo, platform=plat, oci=oci)
                for plat in ("linux/amd64", "linux/arm64/v8")
            ]
            self.push(img.make_index(repo, "latest", children, oci=oci))
        self.push(img.make_image("myorg/tool", "1.0", seed="myorg/tool", platform=p))
        self.push(
            img.make_image(
                "private/secret", "latest", seed="private/secret", platform=p
            )
        )

    def seed_big(self, size: int = 1 << 30) -> SeededImage:
        """Push ``library/big:latest`` with one ~``size``-byte layer (generated once, cached)."""
        existing = self.images.get("library/big:latest")
        if existing is not None and existing.layers[0].size >= size:
            return existing
        layer = img.write_big_layer(self.cache_dir / f"big-{size}.tar.gz", size)
        image = img.image_from_layers(
            "library/big", "latest", "big", [layer], self.platform, oci=False
        )
        return self.push(image)


def _retag(image: SeededImage, tag: str) -> SeededImage:
    """The same manifest under another tag (alpine:latest is alpine:3.21, as on Hub)."""
    return replace(image, tag=tag)
