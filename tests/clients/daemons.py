"""Drive real container clients (dockerd, containerd/ctr, skopeo, podman).

Everything here is synchronous (``subprocess``).  From a test whose reactor
runs the proxy in-process, call these through
``twisted.internet.threads.deferToThread`` (or run the proxy in a
subprocess), otherwise the blocked reactor can never answer the client.

Docker Hub isolation
--------------------
There is no internet here and nothing may ever try to reach Docker Hub.  Every
daemon and client command is started inside a private mount namespace
(``unshare --mount --propagation private``) in which a generated
``/etc/hosts`` is bind-mounted: it maps Docker Hub's names (``HUB_NAMES``) to
127.0.0.1, so a fallback to the Hub fails at once with "connection refused"
instead of hanging on DNS.  The namespace also swallows any mount a daemon
makes (dockerd bind-mounts its data-root, containerd's overlay snapshotter
mounts while unpacking): when the daemon exits the namespace and its mounts
disappear, nothing is left behind in the host namespace.

Note where the registry traffic comes from: dockerd pulls/pushes in the
*daemon*, but ``ctr images pull`` resolves and fetches in the *ctr client
process* (containerd only stores and unpacks), and skopeo/podman are
daemonless.  Hence the client commands are wrapped too.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

try:  # package-relative when imported as tests.clients / clients
    from ._localregistry import require_binary
except ImportError:  # pragma: no cover - imported as a top-level module
    from _localregistry import require_binary  # type: ignore[no-redef]

__all__ = [
    "HUB_NAMES",
    "SUSPICIOUS_PULL",
    "ClientError",
    "Containerd",
    "DaemonStartError",
    "Dockerd",
    "HubFallbackError",
    "Podman",
    "SuspiciousPullError",
    "hub_blackhole_hosts",
    "isolated_argv",
    "leftover_mounts",
    "require_binary",
    "skopeo",
    "skopeo_accessed",
    "skopeo_copy",
    "write_hosts_toml",
    "write_registries_conf",
]

DOCKER_CLIENT = "/usr/bin/docker"  # /usr/local/bin/docker is an unrelated newer client

HUB_NAMES = (
    "registry-1.docker.io",
    "index.docker.io",
    "auth.docker.io",
    "docker.io",
    "registry.docker.io",
    "registry.hub.docker.com",
    "hub.docker.com",
    "production.cloudflare.docker.com",
)

#: Names of the proxy itself (an upstream selected by ``Host``, see tests/manyconfig.py),
#: resolved to 127.0.0.1 in the clients' namespace.
PROXY_NAMES = ("ghcr.mirror.test",)

DEFAULT_TIMEOUT = 300.0


class ClientError(subprocess.CalledProcessError):
    """A client command failed; ``str()`` carries stdout, stderr and a daemon log tail."""

    def __init__(self, returncode, cmd, output=None, stderr=None, log_tail: str = ""):
        super().__init__(returncode, cmd, output, stderr)
        self.log_tail = log_tail

    def __str__(self) -> str:
        s = super().__str__()
        s += f"\n--- stdout ---\n{self.output or ''}\n--- stderr ---\n{self.stderr or ''}"
        if self.log_tail:
            s += f"\n--- daemon log tail ---\n{self.log_tail}"
        return s


class HubFallbackError(AssertionError):
    """A pull succeeded, but only after falling back to Docker Hub (mirror broken)."""


class SuspiciousPullError(AssertionError):
    """A docker pull succeeded but dockerd printed a warning that hides a broken
    registry/proxy (pull-by-tag fallback, schema 1 conversion); see ``SUSPICIOUS_PULL``."""


# dockerd falls back silently-ish on these; a proxy that drops/collapses the
# six Accept headers makes distribution answer a schema-1 manifest (other digest).
SUSPICIOUS_PULL = (
    "Failed to pull manifest by the resolved digest",
    "outdated schema1 manifest format",
)


class DaemonStartError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# private mount namespace with a Hub-blackholing /etc/hosts


def _hosts_text() -> str:
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    try:
        lines.append(f"127.0.0.1 {os.uname().nodename}")
    except OSError:  # pragma: no cover
        pass
    lines.append("127.0.0.1 " + " ".join(HUB_NAMES))
    lines.append("::1 " + " ".join(HUB_NAMES))
    lines.append("127.0.0.1 " + " ".join(PROXY_NAMES))
    return "\n".join(lines) + "\n"


def write_hub_blackhole_hosts(path: str | os.PathLike) -> Path:
    p = Path(path)
    p.write_text(_hosts_text())
    return p


_shared_dir: Path | None = None


def _process_tmp() -> Path:
    """A short per-process scratch dir (hosts file, empty configs, auth file)."""
    global _shared_dir
    if _shared_dir is None or not _shared_dir.exists():
        _shared_dir = Path(tempfile.mkdtemp(prefix="rpc-", dir="/tmp"))
        atexit.register(shutil.rmtree, _shared_dir, True)
    return _shared_dir


def hub_blackhole_hosts() -> Path:
    """Path of a process-wide hosts file mapping ``HUB_NAMES`` to loopback."""
    p = _process_tmp() / "hosts"
    if not p.exists():
        write_hub_blackhole_hosts(p)
    return p


def isolated_argv(argv: Sequence[str], hosts_file: str | os.PathLike | None = None) -> list[str]:
    """``argv`` wrapped to run in a private mount namespace with ``hosts_file`` as /etc/hosts."""
    hosts = str(hosts_file or hub_blackhole_hosts())
    return [require_binary("unshare"), "--mount", "--propagation", "private",
            "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', hosts, *argv]


def leftover_mounts(*roots: str | os.PathLike) -> list[str]:
    """Mount points (in *our* namespace) at or under any of ``roots``."""
    out = []
    prefixes = [str(Path(r).resolve()) for r in roots]
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if any(mp == p or mp.startswith(p + "/") for p in prefixes):
                out.append(mp)
    return out


def _unmount_leftovers(*roots) -> list[str]:
    left = leftover_mounts(*roots)
    for mp in sorted(left, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)
    return left


def _group_members(pgid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d))
    return pids


def _run(argv: Sequence[str], *, env: Mapping[str, str] | None, check: bool, timeout: float | None,
         input: str | None = None, log_tail=lambda: "") -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(list(argv), check=False, env=dict(env) if env is not None else None, input=input,
                             capture_output=True, text=True, timeout=timeout,
                             stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise ClientError(-1, argv, e.output, f"TIMEOUT after {timeout}s\n{err}",
                          log_tail()) from None
    if check and res.returncode != 0:
        raise ClientError(res.returncode, argv, res.stdout, res.stderr, log_tail())
    return res


class _Daemon:
    """A long-running process started in its own session inside a private mount namespace."""

    name = "daemon"

    def __init__(self, workdir: str | os.PathLike, start_timeout: float):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.hosts_file = write_hub_blackhole_hosts(self.workdir / "hosts")
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.short: Path | None = None  # short dir for sockets (sun_path is 108 bytes)
        self.timings: dict[str, float] = {}

    # -- log ------------------------------------------------------------

    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """Current log size: pass it as ``since=`` to look only at what came after."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- process --------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, argv: Sequence[str]) -> None:
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n===== regproxy harness: starting {' '.join(argv)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(isolated_argv(argv, self.hosts_file), stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.workdir)

    def _wait_ready(self, probe) -> None:
        assert self.proc is not None
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if probe():
                self.timings["start"] = time.monotonic() - t0
                return
            time.sleep(0.1)
        rc = self.proc.poll()
        tail = self.log_tail(80)
        self.stop()
        raise DaemonStartError(
            f"{self.name} did not become ready within {self.start_timeout}s "
            f"(exit status {rc}); log {self.log_path}:\n{tail}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait, SIGKILL if needed; reap stragglers of our session; clean up."""
        if self.proc is not None:
            pid = self.proc.pid
            t0 = time.monotonic()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            # children left in our process group (e.g. a managed containerd), by pid
            for _ in range(50):
                members = _group_members(pid)
                if not members:
                    break
                for m in members:
                    try:
                        os.kill(m, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            self.timings["stop"] = time.monotonic() - t0
            self.proc = None
        roots = [self.workdir] + ([self.short] if self.short else [])
        left = _unmount_leftovers(*roots)
        if left:  # should never happen: all mounts live in the daemon's namespace
            with open(self.log_path, "a") as f:
                f.write(f"\n===== regproxy harness: unmounted leftovers {left}\n")
        if self.short is not None:
            shutil.rmtree(self.short, ignore_errors=True)
            self.short = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# dockerd


class Dockerd(_Daemon):
    """A private dockerd (vfs, no networking) plus the ``/usr/bin/docker`` client.

    Layout: ``workdir/data`` (data-root, images survive restarts),
    ``workdir/docker-config`` (DOCKER_CONFIG: ``docker login`` state),
    ``workdir/daemon.json``, ``workdir/dockerd.log`` (``--debug``); the socket,
    pidfile and exec-root live in a short ``/tmp/rpd-XXXX`` dir because the
    managed containerd's sockets under exec-root must fit in sun_path.
    """

    name = "dockerd"

    def __init__(self, workdir: str | os.PathLike, *, start_timeout: float = 30.0,
                 dockerd: str = "dockerd", docker: str = DOCKER_CLIENT,
                 extra_args: Sequence[str] = ()):
        super().__init__(workdir, start_timeout)
        self.dockerd_bin = require_binary(dockerd)
        self.docker_bin = require_binary(docker)
        self.extra_args = list(extra_args)
        self.data_root = self.workdir / "data"
        self.docker_config = self.workdir / "docker-config"
        self.daemon_json = self.workdir / "daemon.json"
        self.mirrors: list[str] = []
        self.insecure: list[str] = []
        self.extra_config: dict = {}

    @property
    def sock(self) -> Path:
        assert self.short is not None, "dockerd not started"
        return self.short / "d.sock"

    @property
    def host(self) -> str:
        """The DOCKER_HOST value."""
        return f"unix://{self.sock}"

    def _write_config(self) -> None:
        cfg = dict(self.extra_config)
        if self.mirrors:
            cfg["registry-mirrors"] = list(self.mirrors)
        if self.insecure:
            cfg["insecure-registries"] = list(self.insecure)
        # "debug" must not be repeated here: --debug is on the command line and
        # dockerd refuses to start when a flag is also set in the config file.
        self.daemon_json.write_text(json.dumps(cfg, indent=2))

    def start(self, mirrors: Iterable[str] = (), insecure: Iterable[str] = (),
              extra_config: Mapping | None = None) -> Dockerd:
        """Start dockerd with ``registry-mirrors``/``insecure-registries``; wait for the API."""
        assert not self.running, "already running"
        self.mirrors = list(mirrors)
        self.insecure = list(insecure)
        if extra_config is not None:
            self.extra_config = dict(extra_config)
        self._write_config()
        self.data_root.mkdir(exist_ok=True)
        self.docker_config.mkdir(exist_ok=True)
        self.short = Path(tempfile.mkdtemp(prefix="rpd-", dir="/tmp"))
        (self.short / "x").mkdir()
        argv = [
            self.dockerd_bin,
            "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
            "--ip-masq=false",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.short / "x"),
            "-H", self.host,
            "--pidfile", str(self.short / "d.pid"),
            "--config-file", str(self.daemon_json),
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--debug",
            *self.extra_args,
        ]
        self._spawn(argv)
        self._wait_ready(lambda: self.docker("version", check=False, timeout=5).returncode == 0)
        return self

    def restart(self, mirrors: Iterable[str] | None = None, insecure: Iterable[str] | None = None,
                extra_config: Mapping | None = None) -> Dockerd:
        """Stop and start again with a rewritten daemon.json (None keeps the current value)."""
        mirrors = self.mirrors if mirrors is None else mirrors
        insecure = self.insecure if insecure is None else insecure
        t0 = time.monotonic()
        self.stop()
        self.start(mirrors, insecure, extra_config)
        self.timings["restart"] = time.monotonic() - t0
        return self

    # -- client ---------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.docker_config),
                   DOCKER_CLI_HINTS="false")
        return env

    def docker(self, *args: str, check: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
               input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``/usr/bin/docker ARGS`` against this daemon; ClientError on failure if check."""
        return _run([self.docker_bin, *args], env=self.env(), check=check, timeout=timeout,
                    input=input, log_tail=self.log_tail)

    def pull(self, ref: str, *, check: bool = True, allow_fallback: bool = False,
             strict: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
             ) -> subprocess.CompletedProcess:
        """``docker pull REF``.

        A *successful* pull that fell back to Docker Hub raises HubFallbackError
        unless ``allow_fallback``; one whose output carries a ``SUSPICIOUS_PULL``
        warning raises SuspiciousPullError unless ``strict=False``.
        """
        mark = self.log_mark()
        t0 = time.monotonic()
        res = self.docker("pull", ref, check=check, timeout=timeout)
        self.timings[f"pull {ref}"] = time.monotonic() - t0
        if res.returncode == 0 and not allow_fallback and self.fell_back_to_hub(since=mark):
            raise HubFallbackError(
                f"docker pull {ref} succeeded only after falling back from the mirror:\n"
                + self._fallback_lines(mark))
        if res.returncode == 0 and strict:
            out = res.stdout + res.stderr
            hits = [w for w in SUSPICIOUS_PULL if w in out]
            if hits:
                raise SuspiciousPullError(f"docker pull {ref} warned {hits}:\n{out}")
        return res

    def push(self, ref: str, *, check: bool = True,
             timeout: float | None = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        res = self.docker("push", ref, check=check, timeout=timeout)
        self.timings[f"push {ref}"] = time.monotonic() - t0
        return res

    def login(self, host: str, user: str, password: str, *, check: bool = True,
              timeout: float | None = 60) -> subprocess.CompletedProcess:
        return self.docker("login", "--username", user, "--password-stdin", host,
                           input=password, check=check, timeout=timeout)

    def logout(self, host: str, *, check: bool = True) -> subprocess.CompletedProcess:
        return self.docker("logout", host, check=check, timeout=30)

    def tag(self, src: str, dst: str) -> subprocess.CompletedProcess:
        return self.docker("tag", src, dst, timeout=60)

    def rmi(self, *refs: str, force: bool = True, check: bool = True) -> subprocess.CompletedProcess:
        return self.docker("rmi", *(["--force"] if force else []), *refs, check=check, timeout=120)

    def inspect(self, ref: str) -> dict:
        return json.loads(self.docker("image", "inspect", ref, timeout=60).stdout)[0]

    def repo_digests(self, ref: str) -> list[str]:
        """``RepoDigests`` of a local image, e.g. ``['127.0.0.1:5000/x@sha256:...']``."""
        return list(self.inspect(ref).get("RepoDigests") or [])

    def image_id(self, ref: str) -> str:
        return self.inspect(ref)["Id"]

    def has_image(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False, timeout=60).returncode == 0

    # -- log analysis -----------------------------------------------------

    _FALLBACK = re.compile(r"Attempting next endpoint")
    _HUB = re.compile(r"Trying to pull \S+ from https?://(registry-1\.docker\.io|index\.docker\.io)")

    def fell_back_to_hub(self, since: int = 0) -> bool:
        """True if the log (after ``since``) shows dockerd giving up on an endpoint
        and trying Docker Hub (the endpoint after the mirrors)."""
        text = self.log_text(since)
        return bool(self._FALLBACK.search(text)) and bool(self._HUB.search(text))

    def attempted_next_endpoint(self, since: int = 0) -> bool:
        """Any "Attempting next endpoint" at all (also https->http on an insecure host)."""
        return bool(self._FALLBACK.search(self.log_text(since)))

    def _fallback_lines(self, since: int) -> str:
        return "\n".join(line for line in self.log_text(since).splitlines()
                         if self._FALLBACK.search(line) or self._HUB.search(line))


# --------------------------------------------------------------------------
# containerd


class Containerd(_Daemon):
    """A private containerd (CRI disabled) and ``ctr``.

    ``root`` is ``workdir/root``; state, grpc/ttrpc/debug sockets live in a
    short ``/tmp/rpcd-XXXX`` dir.  Snapshotter defaults to overlayfs (works on
    this ext4 root); pass ``snapshotter="native"`` where overlay does not.
    """

    name = "containerd"

    def __init__(self, workdir: str | os.PathLike, *, snapshotter: str = "overlayfs",
                 namespace: str = "regproxy", start_timeout: float = 30.0,
                 containerd: str = "containerd", ctr: str = "ctr"):
        super().__init__(workdir, start_timeout)
        self.containerd_bin = require_binary(containerd)
        self.ctr_bin = require_binary(ctr)
        self.snapshotter = snapshotter
        self.namespace = namespace
        self.root = self.workdir / "root"
        self.config_path = self.workdir / "config.toml"

    @property
    def sock(self) -> Path:
        assert self.short is not None, "containerd not started"
        return self.short / "c.sock"

    def _config(self) -> str:
        s = self.short
        assert s is not None
        return f"""version = 2
root = "{self.root}"
state = "{s / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{self.sock}"

[ttrpc]
  address = "{s / 'c.sock.ttrpc'}"

[debug]
  address = "{s / 'debug.sock'}"
  level = "debug"

[metrics]
  address = ""

[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.02
"""

    def start(self) -> Containerd:
        assert not self.running, "already running"
        self.root.mkdir(exist_ok=True)
        self.short = Path(tempfile.mkdtemp(prefix="rpcd-", dir="/tmp"))
        self.config_path.write_text(self._config())
        self._spawn([self.containerd_bin, "--config", str(self.config_path)])
        self._wait_ready(lambda: self.sock.exists() and self.ctr(
            "version", check=False, timeout=5, isolate=False).returncode == 0)
        return self

    def ctr(self, *args: str, check: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
            isolate: bool = True, debug: bool = False) -> subprocess.CompletedProcess:
        """``ctr -a SOCK -n NS ARGS`` in the Hub-blackholing namespace (ctr does the fetching)."""
        argv = [self.ctr_bin, "-a", str(self.sock), "-n", self.namespace,
                *(["--debug"] if debug else []), *args]
        if isolate:
            argv = isolated_argv(argv, self.hosts_file)
        return _run(argv, env=None, check=check, timeout=timeout, log_tail=self.log_tail)

    def pull(self, ref: str, hosts_dir: str | os.PathLike | None, user: str | None = None,
             plain_http: bool = False, *, check: bool = True, allow_fallback: bool = False,
             extra: Sequence[str] = (), timeout: float | None = DEFAULT_TIMEOUT,
             ) -> subprocess.CompletedProcess:
        """``ctr images pull [--hosts-dir DIR] [--user U:P] [--plain-http] REF`` (fetch + unpack).

        ``user`` is "user:password".  Runs with ``--debug`` so that falling
        back from a hosts.toml mirror to the ``server`` shows in stderr; a
        successful pull that did so raises HubFallbackError unless allow_fallback.
        """
        args = ["images", "pull", "--snapshotter", self.snapshotter]
        if hosts_dir is not None:
            args += ["--hosts-dir", str(hosts_dir)]
        if user:
            args += ["--user", user]
        if plain_http:
            args.append("--plain-http")
        args += [*extra, ref]
        t0 = time.monotonic()
        res = self.ctr(*args, check=check, timeout=timeout, debug=True)
        self.timings[f"pull {ref}"] = time.monotonic() - t0
        if res.returncode == 0 and not allow_fallback and "trying next host" in res.stderr:
            raise HubFallbackError(f"ctr pull {ref} fell back to another host:\n{res.stderr[-4000:]}")
        return res

    def images(self) -> dict[str, str]:
        """ref -> manifest (or index) digest, from ``ctr images ls``."""
        out = self.ctr("images", "ls", isolate=False, timeout=60).stdout.splitlines()
        result = {}
        for line in out[1:]:
            cols = line.split()
            if len(cols) >= 3:
                result[cols[0]] = cols[2]
        return result

    def image_digest(self, ref: str) -> str | None:
        return self.images().get(ref)

    def rmi(self, *refs: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.ctr("images", "rm", "--sync", *refs, check=check, isolate=False, timeout=60)

    def snapshots(self) -> list[str]:
        out = self.ctr("snapshots", "--snapshotter", self.snapshotter, "ls", isolate=False,
                       timeout=60).stdout.splitlines()
        return [line.split()[0] for line in out[1:] if line.strip()]


def write_hosts_toml(dir: str | os.PathLike, registry_host: str, mirror_url: str,
                     ca_pem: str | os.PathLike | None = None,
                     capabilities: Sequence[str] = ("pull", "resolve"),
                     server: str | None = None, skip_verify: bool = False,
                     override_path: bool = False) -> Path:
    """Write ``DIR/<registry_host>/hosts.toml`` naming ``mirror_url`` as a host.

    ``ca_pem``: PEM text (copied to ``DIR/<host>/ca.crt``) or a path to a PEM
    file.  ``server`` defaults to Docker Hub for docker.io (blackholed by the
    namespace) and to ``https://<registry_host>`` otherwise.
    """
    d = Path(dir) / registry_host
    d.mkdir(parents=True, exist_ok=True)
    if server is None:
        server = ("https://registry-1.docker.io" if registry_host == "docker.io"
                  else f"https://{registry_host}")
    lines = [f'server = "{server}"', "", f'[host."{mirror_url}"]',
             "  capabilities = [" + ", ".join(f'"{c}"' for c in capabilities) + "]"]
    if ca_pem is not None:
        text = str(ca_pem)
        if text.lstrip().startswith("-----BEGIN"):
            ca_path = d / "ca.crt"
            ca_path.write_text(text)
        else:
            ca_path = Path(text).resolve()
        lines.append(f'  ca = "{ca_path}"')
    if skip_verify:
        lines.append("  skip_verify = true")
    if override_path:
        lines.append("  override_path = true")
    p = d / "hosts.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


# --------------------------------------------------------------------------
# skopeo


def _empty_registries_conf() -> Path:
    p = _process_tmp() / "registries-empty.conf"
    if not p.exists():
        p.write_text('unqualified-search-registries = []\nshort-name-mode = "disabled"\n')
    return p


def _isolated_env(env: Mapping[str, str] | None) -> dict[str, str]:
    e = dict(os.environ)
    # keep podman/skopeo login state and system config out of the picture
    e.setdefault("REGISTRY_AUTH_FILE", str(_process_tmp() / "auth.json"))
    e.setdefault("XDG_RUNTIME_DIR", str(_process_tmp() / "run"))
    # c/image also reads $HOME/.docker/config.json and ~/.config/containers/*
    e["HOME"] = str(_process_tmp() / "home")
    if env:
        e.update(env)
    return e


def skopeo(*args: str, env: Mapping[str, str] | None = None, check: bool = True,
           timeout: float | None = DEFAULT_TIMEOUT, isolate: bool = True,
           binary: str = "skopeo") -> subprocess.CompletedProcess:
    """Run ``skopeo ARGS`` (Hub-blackholing namespace, private auth file)."""
    argv = [require_binary(binary), *args]
    if isolate:
        argv = isolated_argv(argv)
    (_process_tmp() / "run").mkdir(exist_ok=True)
    (_process_tmp() / "home").mkdir(exist_ok=True)
    if not (_process_tmp() / "auth.json").exists():
        (_process_tmp() / "auth.json").write_text('{"auths": {}}\n')
    return _run(argv, env=_isolated_env(env), check=check, timeout=timeout)


def skopeo_copy(src: str, dst: str, cert_dir: str | os.PathLike | None = None,
                tls_verify: bool | None = True, src_creds: str | None = None,
                dest_creds: str | None = None, all: bool = True, preserve_digests: bool = True,
                registries_conf: str | os.PathLike | None = None, *, debug: bool = True,
                extra: Sequence[str] = (), env: Mapping[str, str] | None = None,
                check: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
                ) -> subprocess.CompletedProcess:
    """``skopeo [--registries-conf F] copy ...``; cert_dir/tls_verify apply to each ``docker://`` side.

    An explicit ``--*-tls-verify=true`` overrides ``insecure = true`` in
    registries.conf, so with ``registries_conf`` the default (True) passes no
    flag (skopeo then verifies unless the conf marks the host insecure);
    ``tls_verify=None`` never passes it, ``False`` always disables verification.

    ``cert_dir`` is a directory of ``*.crt`` CA files (``TLSFiles.cert_dir``).
    Without ``registries_conf`` an empty one is used (no system mirrors).
    ``debug`` keeps ``--debug`` stderr for :func:`skopeo_accessed`.
    """
    g = ["--insecure-policy", "--registries-conf", str(registries_conf or _empty_registries_conf())]
    if debug:
        g.append("--debug")
    a = ["copy", "--retry-times", "0"]
    if all:
        a.append("--all")
    if preserve_digests:
        a.append("--preserve-digests")
    for side, ref, creds in (("src", src, src_creds), ("dest", dst, dest_creds)):
        if ref.startswith("docker://"):
            if tls_verify is False or (tls_verify and registries_conf is None):
                a.append(f"--{side}-tls-verify={'true' if tls_verify else 'false'}")
            if cert_dir is not None:
                a += [f"--{side}-cert-dir", str(cert_dir)]
        if creds:
            a += [f"--{side}-creds", creds]
    a += [*extra, src, dst]
    return skopeo(*g, *a, env=env, check=check, timeout=timeout)


_ACCESS = re.compile(r'Trying to access \\?"([^"\\]+)\\?"')


def skopeo_accessed(result: subprocess.CompletedProcess) -> list[str]:
    """References skopeo tried, in order (mirror first, then the primary on fallback)."""
    return _ACCESS.findall(result.stderr or "")


def write_registries_conf(path: str | os.PathLike, prefix_location: str, mirror_location: str,
                          insecure: bool = False, mirror_by_digest_only: bool = False) -> Path:
    """A containers-registries.conf(5) v2 file: ``prefix_location`` mirrored by
    ``mirror_location`` (``host[:port][/path]``, no scheme); ``insecure`` marks the mirror."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(
        'unqualified-search-registries = []\n'
        'short-name-mode = "disabled"\n\n'
        '[[registry]]\n'
        f'prefix = "{prefix_location}"\n'
        f'location = "{prefix_location}"\n\n'
        '[[registry.mirror]]\n'
        f'location = "{mirror_location}"\n'
        f'insecure = {"true" if insecure else "false"}\n'
        + ('mirror-by-digest-only = true\n' if mirror_by_digest_only else '')
    )
    return p


# --------------------------------------------------------------------------
# podman


class Podman:
    """Rootful podman with private storage (vfs) in ``workdir``; daemonless, so no start/stop."""

    def __init__(self, workdir: str | os.PathLike, *, binary: str = "podman",
                 registries_conf: str | os.PathLike | None = None):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = require_binary(binary)
        self.root = self.workdir / "storage"
        self.short = Path(tempfile.mkdtemp(prefix="rpp-", dir="/tmp"))
        self.runroot = self.short / "run"
        self.tmpdir = self.short / "tmp"
        self.hosts_file = write_hub_blackhole_hosts(self.workdir / "hosts")
        self.registries_conf = Path(registries_conf) if registries_conf else _empty_registries_conf()
        self.containers_conf = self.workdir / "containers.conf"
        self.containers_conf.write_text(
            '[engine]\nevents_logger = "file"\n'
            f'events_logfile_path = "{self.workdir / "events.log"}"\n'
            'cgroup_manager = "cgroupfs"\n'
            'runtime = "runc"\n'
            'num_locks = 128\n')
        self.storage_conf = self.workdir / "storage.conf"
        self.storage_conf.write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{self.runroot}"\ngraphroot = "{self.root}"\n')
        self.auth_file = self.workdir / "auth.json"  # podman insists that it exists
        self.auth_file.write_text('{"auths": {}}\n')
        self.timings: dict[str, float] = {}

    def env(self, registries_conf: str | os.PathLike | None = None) -> dict[str, str]:
        e = dict(os.environ)
        e.update(CONTAINERS_CONF=str(self.containers_conf),
                 CONTAINERS_STORAGE_CONF=str(self.storage_conf),
                 CONTAINERS_REGISTRIES_CONF=str(registries_conf or self.registries_conf),
                 REGISTRY_AUTH_FILE=str(self.auth_file),
                 XDG_RUNTIME_DIR=str(self.short / "xdg"),
                 HOME=str(self.workdir / "home"))
        return e

    def podman(self, *args: str, check: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
               registries_conf: str | os.PathLike | None = None,
               input: str | None = None) -> subprocess.CompletedProcess:
        (self.short / "xdg").mkdir(exist_ok=True)
        (self.workdir / "home").mkdir(exist_ok=True)
        argv = [self.binary, "--root", str(self.root), "--runroot", str(self.runroot),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                "--events-backend", "file", "--tmpdir", str(self.tmpdir), *args]
        return _run(isolated_argv(argv, self.hosts_file), env=self.env(registries_conf),
                    check=check, timeout=timeout, input=input)

    def pull(self, ref: str, tls_verify: bool | None = True, cert_dir: str | os.PathLike | None = None,
             creds: str | None = None, *, registries_conf: str | os.PathLike | None = None,
             check: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
             ) -> subprocess.CompletedProcess:
        """``podman pull`` (``creds`` is "user:password"); ``--log-level debug`` stderr kept.

        podman 4.3 has no ``--retry``: a failing pull is retried 3 times (1 s apart).
        ``tls_verify`` as in :func:`skopeo_copy` (no flag with a registries_conf).
        """
        args = ["--log-level", "debug", "pull"]
        # as with skopeo: an explicit --tls-verify=true overrides registries.conf "insecure"
        if tls_verify is False or (tls_verify and registries_conf is None):
            args.append(f"--tls-verify={'true' if tls_verify else 'false'}")
        if cert_dir is not None:
            args += ["--cert-dir", str(cert_dir)]
        if creds:
            args += ["--creds", creds]
        args.append(ref)
        t0 = time.monotonic()
        res = self.podman(*args, check=check, timeout=timeout, registries_conf=registries_conf)
        self.timings[f"pull {ref}"] = time.monotonic() - t0
        return res

    def inspect(self, ref: str) -> dict:
        return json.loads(self.podman("image", "inspect", ref, timeout=60).stdout)[0]

    def image_digest(self, ref: str) -> str:
        return self.inspect(ref)["Digest"]

    def repo_digests(self, ref: str) -> list[str]:
        return list(self.inspect(ref).get("RepoDigests") or [])

    def rmi(self, *refs: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.podman("rmi", "--force", *refs, check=check, timeout=120)

    def close(self) -> None:
        """Remove the short runroot/tmp dir (podman leaves no processes behind)."""
        left = _unmount_leftovers(self.workdir, self.short)
        shutil.rmtree(self.short, ignore_errors=True)
        if left:  # pragma: no cover
            raise RuntimeError(f"podman left mounts behind: {left}")

    stop = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
