"""Benchmark regproxy against a direct registry, nginx and distribution's proxy mode.

    python benchmarks/run.py            # full run, ~25 min, updates README.md
    python benchmarks/run.py --quick    # ~4 min, smaller blobs, 1 repetition
    python benchmarks/run.py --peers nginx,cache-warm --rows single,wrk-digest

All peers are measured in the same run and interleaved (A B C D, A B C D, ...)
so drift in machine speed hits every peer alike; figures are medians over
the repetitions.  See README.md in this directory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import seed  # noqa: E402
from peers import (  # noqa: E402
    DelayRelay,
    NaiveProxy,
    Nginx,
    NginxStatic,
    Peer,
    Registry,
    RegProxy,
    http_get,
    make_cert,
    process_tree,
)

HERE = Path(__file__).resolve().parent
TOOLS = {"nginx": "nginx", "docker-registry": "docker-registry", "wrk": "wrk",
         "curl": "curl", "openssl": "openssl"}  # command -> Debian package


def ensure_tools() -> None:
    """apt-get the servers and clients if this machine lacks them."""
    missing = [pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None]
    if not missing:
        return
    print(f"installing {' '.join(missing)} with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)
    # The Debian packages start system services; we run our own instances.
    for svc in ("nginx", "docker-registry"):
        subprocess.run(["systemctl", "stop", svc], capture_output=True)


#: Every peer (column) the harness knows, in table order: key -> display name.
PEERS: dict[str, str] = {
    "direct": "direct",
    "nginx": "nginx",
    "nginx-64k": "nginx (64k)",
    "nginx-static": "nginx (static file)",
    "naive": "twisted naive",
    "dist-cold": "distribution (cold)",
    "dist-warm": "distribution (warm)",
    "regproxy": "regproxy",
    "regproxy-tls": "regproxy (TLS)",
    "regproxy-2w": "regproxy (2 workers)",
    "regproxy-tls-up": "regproxy (TLS upstream)",
    "cache-warm": "regproxy (cache, warm)",
    "cache-warm-tls": "regproxy (cache, warm, TLS)",
    "cache-cold": "regproxy (cache, cold)",
    "cache-fresh": "regproxy (cache, fresh 1h)",
    "pull-direct": "direct (50 ms away)",
    "pull-pass": "regproxy pass-through (50 ms)",
    "pull-p0": "regproxy --prefetch 0 (50 ms)",
    "pull-p4": "regproxy --prefetch 4 (50 ms)",
}
#: Every measurement (row group): "par" stands for every --parallel count.
TESTS = ["check", "single", "par", "wrk", "wrk-digest", "tags", "pull", "docker", "rss"]
_STREAM = {"check", "single", "par", "wrk", "rss"}
#: Which measurements each peer takes part in (what its column is for).
PEER_TESTS: dict[str, set[str]] = {
    "direct": _STREAM | {"wrk-digest"},
    "nginx": _STREAM | {"wrk-digest", "tags"},
    "nginx-64k": _STREAM,
    "nginx-static": {"check", "single", "par"},
    "naive": _STREAM,
    "dist-cold": {"check", "single", "par", "rss"},
    "dist-warm": _STREAM | {"wrk-digest", "tags"},
    "regproxy": _STREAM | {"wrk-digest", "tags"},
    "regproxy-tls": _STREAM,
    "regproxy-2w": _STREAM,
    "regproxy-tls-up": {"check", "single", "wrk"},
    "cache-warm": _STREAM | {"wrk-digest", "tags"},
    "cache-warm-tls": {"check", "single"},
    "cache-cold": {"check", "single", "par", "rss"},
    "cache-fresh": {"wrk", "tags"},
    "pull-direct": {"pull", "docker"},
    "pull-pass": {"pull", "docker"},
    "pull-p0": {"pull", "docker"},
    "pull-p4": {"pull", "docker"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="development mode: 1 rep, 256/32 MiB blobs, 2 s wrk, 5 s RSS")
    p.add_argument("--reps", type=int, help="repetitions per measurement (default 3, quick 1)")
    p.add_argument("--big-mib", type=int, help="big blob size (default 1024, quick 256)")
    p.add_argument("--medium-mib", type=int, help="medium blob size (default 100, quick 32)")
    p.add_argument("--wrk-seconds", type=float, help="manifest load duration (default 5, quick 2)")
    p.add_argument("--wrk-conns", type=int, default=32)
    p.add_argument("--parallel", default="16,64", help="parallel download counts")
    p.add_argument("--rss-rate", default="20M", help="curl --limit-rate for the RSS test")
    p.add_argument("--rss-seconds", type=float,
                   help="cut the RSS download after N s (default 15, quick 5; 0 = whole blob, "
                        "~54 s per peer)")
    p.add_argument("--tag-pulls", type=int, default=1000,
                   help="manifest-by-tag GETs for the upstream-requests count (default 1000)")
    p.add_argument("--pull-rtt-ms", type=float, default=50.0,
                   help="round trip to the upstream for the cold-pull test (default 50)")
    p.add_argument("--pull-layers", type=int, default=12, help="layers of the cold-pull image")
    p.add_argument("--pull-parallel", type=int, default=3,
                   help="concurrent blob downloads of the pull client (docker's default 3)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated subset of: " + ", ".join(PEERS))
    p.add_argument("--rows", default=",".join(TESTS),
                   help="comma-separated subset of the measurements: " + ", ".join(TESTS)
                   + " (par = every --parallel count; par16 etc. also work)")
    p.add_argument("--nginx-buffer", default="",
                   help="nginx proxy_buffer_size, e.g. 64k (default: nginx's own, one page)")
    p.add_argument("--max-foreign-cpu", type=float, default=25.0,
                   help="before each repetition, wait while other processes (not this "
                        "benchmark) use more than this %% of all cores (default 25)")
    p.add_argument("--wait-quiet", type=float,
                   help="wait at most this long for that, seconds (default 180, quick 0)")
    p.add_argument("--busy-retries", type=int,
                   help="measure again when others used more than --max-foreign-cpu meanwhile, "
                        "this many times at most (default 2, quick 0)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/regproxy-bench"),
                   help="blobs and upstream storage, reused across runs")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that runs regproxy (needs twisted, treq)")
    p.add_argument("--snapshot", action="store_true",
                   help="run regproxy from an export of HEAD (git archive into the workdir), not "
                        "from the work tree: edits made while the benchmark runs don't reach it")
    p.add_argument("--regproxy-tree", type=Path,
                   help="run regproxy from this source tree (e.g. an earlier --snapshot's "
                        "workdir/tree-<sha>) instead of the work tree")
    p.add_argument("--update-readme", action=argparse.BooleanOptionalAction,
                   help="put the table into benchmarks/README.md (default: on unless --quick "
                        "or a --peers/--rows subset)")
    a = p.parse_args(argv)
    q = a.quick
    a.reps = a.reps or (1 if q else 3)
    a.big_mib = a.big_mib or (256 if q else 1024)
    a.medium_mib = a.medium_mib or (32 if q else 100)
    a.wrk_seconds = a.wrk_seconds or (2.0 if q else 5.0)
    a.rss_seconds = a.rss_seconds if a.rss_seconds is not None else (5.0 if q else 15.0)
    a.wait_quiet = a.wait_quiet if a.wait_quiet is not None else (0.0 if q else 180.0)
    a.busy_retries = a.busy_retries if a.busy_retries is not None else (0 if q else 2)
    subset = a.peers != ",".join(PEERS) or a.rows != ",".join(TESTS)
    a.update_readme = a.update_readme if a.update_readme is not None else not (q or subset)
    a.parallel = [int(n) for n in a.parallel.split(",") if n]
    a.peers = [k for k in a.peers.split(",") if k]
    unknown = [k for k in a.peers if k not in PEERS]
    if unknown:
        p.error(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    rows: set[str] = set()
    for r in (x for x in a.rows.split(",") if x):
        if r == "par":
            rows |= {f"par{n}" for n in a.parallel}
        elif r in TESTS or (r.startswith("par") and r[3:].isdigit()):
            rows.add(r)
        else:
            p.error(f"unknown row {r!r}; known: {', '.join(TESTS)}")
    a.rows = rows
    return a


def _expand(tests: set[str], parallel: list[int]) -> set[str]:
    return (tests - {"par"}) | ({f"par{n}" for n in parallel} if "par" in tests else set())


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f) - idle, sum(f)


class ForeignCpu:
    """CPU used by processes that are not this benchmark (other test suites on the
    box), as % of all cores over an interval: busy time from /proc/stat minus
    this process tree's (servers, and reaped clients through RUSAGE_CHILDREN)."""

    def __init__(self) -> None:
        self.reset()

    def _ours(self) -> float:
        return measure.cpu_seconds(process_tree(os.getpid())) + measure.children_cpu()

    def reset(self) -> None:
        self.busy0, self.total0 = _busy_jiffies()
        self.ours0 = self._ours()

    def pct(self) -> float:
        busy, total = _busy_jiffies()
        ours = self._ours()
        cores = os.cpu_count() or 1
        dt_total = (total - self.total0) / measure.TICK  # core-seconds elapsed
        if dt_total <= 0:
            return 0.0
        foreign = (busy - self.busy0) / measure.TICK - (ours - self.ours0)
        return max(0.0, 100 * foreign / dt_total) if cores else 0.0


class Bench:
    """Owns the servers for one run and the samples they produce."""

    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.stack = stack
        args.workdir.mkdir(parents=True, exist_ok=True)
        started = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
        self.rundir = args.workdir / f"run-{started.replace(':', '')}"
        self.rundir.mkdir()
        self.started = started
        self.samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.peers: list[Peer] = []
        self.loadavg: list[float] = []  # other work on the box skews results: show it
        self.foreign: list[float] = []  # % of all cores used by others, per repetition
        self.image: seed.Image | None = None
        self.dockerd: Any = None
        self.docker_unavailable: str | None = None

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def tests_of(self, key: str) -> set[str]:
        """The measurements a peer takes part in this run (its own ∩ --rows)."""
        if key not in self.args.peers:
            return set()
        return _expand(PEER_TESTS[key], self.args.parallel) & self.args.rows

    def start(self) -> None:
        a = self.args
        wanted = {k for k in PEERS if self.tests_of(k)}
        self.log(f"making blobs ({a.big_mib} and {a.medium_mib} MiB) in {a.workdir}")
        self.big = seed.make_blob(a.workdir, a.big_mib << 20)
        self.medium = seed.make_blob(a.workdir, a.medium_mib << 20)

        self.upstream = Registry("upstream", self.rundir, a.workdir / "upstream-storage")
        self._launch(self.upstream.proc, self.upstream.start)
        self.log(f"upstream registry on {self.upstream.url}; seeding")
        for b in (self.big, self.medium):
            seed.push_blob(self.upstream.url, blob=b)
        self.manifest = seed.push_manifest(self.upstream.url, [self.big, self.medium])
        if any(k.startswith("pull-") for k in wanted):
            self.image = seed.make_image(a.workdir, a.pull_layers)
            seed.push_image(self.upstream.url, self.image)
            self.log(f"pull image {self.image.repo}:{self.image.tag}: {len(self.image.layers)} "
                     f"layers, {self.image.blob_bytes / 2**20:.1f} MiB")

        up = self.upstream
        if "direct" in wanted:
            self._peer("direct", up.url, lambda: [up.proc.pid])
        if "nginx" in wanted:
            ng = Nginx(self.rundir, f"127.0.0.1:{up.port}", a.nginx_buffer)
            self._launch(ng.proc, ng.start)
            self._peer("nginx", ng.url, lambda: process_tree(ng.proc.pid))
        if "nginx-64k" in wanted:
            # proxy_buffering off makes stock nginx move one page per read/write;
            # 64k buffers are what a tuned deployment (and the figures) use.
            tuned = Nginx(self.rundir, f"127.0.0.1:{up.port}", "64k", name="nginx-64k")
            self._launch(tuned.proc, tuned.start)
            self._peer("nginx-64k", tuned.url, lambda: process_tree(tuned.proc.pid))
        if "nginx-static" in wanted:
            m = self.manifest
            files = {f"/v2/{seed.REPO}/blobs/{b.digest}": b.path for b in (self.big, self.medium)}
            mfile = self.rundir / "manifest.json"
            mfile.write_bytes(m.body)
            files[f"/v2/{seed.REPO}/manifests/{seed.TAG}"] = mfile
            files[f"/v2/{seed.REPO}/manifests/{m.digest}"] = mfile
            st = NginxStatic(self.rundir, files, seed.MANIFEST_TYPE)
            self._launch(st.proc, st.start)
            self._peer("nginx-static", st.url, lambda: process_tree(st.proc.pid))
        if "naive" in wanted:
            nv = NaiveProxy(self.rundir, up.port, a.python)
            err = self._launch(nv.proc, nv.start)
            self._peer("naive", nv.url, lambda: [nv.proc.pid], unavailable=err)
        if wanted & {"dist-cold", "dist-warm"}:
            self._add_distribution(wanted)
        if wanted & {"regproxy", "regproxy-tls", "regproxy-2w", "regproxy-tls-up"}:
            self._add_regproxy(wanted)
        if wanted & {"cache-warm", "cache-warm-tls", "cache-cold", "cache-fresh"}:
            self._add_cache(wanted)
        if any(k.startswith("pull-") for k in wanted):
            self._add_pull(wanted)
        if any("docker" in p.tests for p in self.peers if p.tests):
            self._start_dockerd()

    def _start_dockerd(self) -> None:
        """A private dockerd for the real `docker pull` row (needs root; optional:
        without it that row is left out and the reason shown)."""
        try:
            if os.geteuid() != 0:
                raise RuntimeError("needs root")
            sys.path.insert(0, str(HERE.parent))
            from tests.clients.daemons import Dockerd  # the test suite's driver
            d = Dockerd(self.rundir / "dockerd", start_timeout=60)
            self.stack.callback(d.stop)
            d.start()
            self.dockerd = d
            self.log(f"dockerd started ({d.host})")
        except Exception as e:  # noqa: BLE001 - optional
            self.docker_unavailable = f"{type(e).__name__}: {e}"[:300]
            self.log(f"no docker pull row: {self.docker_unavailable}")
            for p in self.peers:
                if p.tests:
                    p.tests.discard("docker")

    def _peer(self, key: str, url: str, pids: Callable[[], list[int]], **kw: Any) -> Peer:
        peer = Peer(PEERS[key], url, pids, tests=self.tests_of(key), key=key, **kw)
        self.peers.append(peer)
        return peer

    def _launch(self, proc: Any, start: Callable[[], str | None]) -> str | None:
        self.stack.callback(proc.stop)
        err = start()
        if err and proc.name in ("upstream", "nginx", "relay"):
            raise RuntimeError(err)
        if err:
            proc.stop()
        return err

    def _add_distribution(self, wanted: set[str]) -> None:
        dist = Registry("distribution-proxy", self.rundir, self.rundir / "proxy-storage",
                        remote=self.upstream.url)
        self._launch(dist.proc, dist.start)

        def wait_cached(digest: str | None) -> None:
            deadline = time.monotonic() + 300
            while digest and not dist.has_blob(digest) and time.monotonic() < deadline:
                time.sleep(0.1)

        def warm(digest: str | None) -> None:
            if digest is None:
                http_get(seed.Manifest.url(dist.url), {"Accept": seed.MANIFEST_TYPE})
            elif not dist.has_blob(digest):
                subprocess.run(["curl", "-s", "-o", "/dev/null", f"{dist.url}/v2/{seed.REPO}"
                                f"/blobs/{digest}"], check=True)
                wait_cached(digest)

        pids = lambda: [dist.proc.pid]  # noqa: E731
        if "dist-cold" in wanted:
            # Fresh process on empty storage before every measurement; afterwards wait
            # for its background copy to storage so that traffic is counted and done.
            self._peer("dist-cold", dist.url, pids, prepare=lambda d: dist.restart(fresh=True),
                       settle=wait_cached)
        if "dist-warm" in wanted:
            self._peer("dist-warm", dist.url, pids, prepare=warm)

    def _regproxy(self, name: str, upstream_url: str, **kw: Any) -> tuple[RegProxy, str | None]:
        rp = RegProxy(self.rundir, upstream_url, self.args.python, name=name, **kw)
        return rp, self._launch(rp.proc, rp.start)

    def _add_regproxy(self, wanted: set[str]) -> None:
        if wanted & {"regproxy", "regproxy-tls"}:
            rp, err = self._regproxy("regproxy", self.upstream.url)
            pids = lambda: process_tree(rp.proc.pid)  # noqa: E731
            if "regproxy" in wanted:
                self._peer("regproxy", rp.url, pids, unavailable=err)
            if "regproxy-tls" in wanted:
                self._peer("regproxy-tls", rp.tls_url, pids, unavailable=err)
        if "regproxy-2w" in wanted:
            rp2, err2 = self._regproxy("regproxy-2w", self.upstream.url, extra=("--workers", "2"))
            self._peer("regproxy-2w", rp2.url, lambda: process_tree(rp2.proc.pid), unavailable=err2)
        if "regproxy-tls-up" in wanted:
            # A second distribution on the upstream's own storage, speaking TLS
            # (http.tls, the run's self-signed cert, which the proxy gets as its CA).
            key, cert = make_cert(self.rundir)
            tls_up = Registry("upstream-tls", self.rundir, self.args.workdir / "upstream-storage",
                              tls=(key, cert))
            err_up = self._launch(tls_up.proc, tls_up.start)
            rp3, err3 = self._regproxy("regproxy-tls-up", tls_up.url, upstream_ca=cert)
            err3 = f"TLS upstream: {err_up}" if err_up else err3
            self._peer("regproxy-tls-up", rp3.url, lambda: process_tree(rp3.proc.pid),
                       unavailable=err3, upstream=tls_up)

    def _warm_regproxy(self, rp: RegProxy) -> Callable[[str | None], None]:
        """prepare() of the warm cache peers: both blobs and the manifest (by tag
        and by digest, with the benchmark's Accept) are in the cache."""
        def warm(_digest: str | None) -> None:
            for b in (self.big, self.medium):
                path = f"/v2/{seed.REPO}/blobs/{b.digest}"
                if "hit" in rp.cache_status(path):
                    continue
                subprocess.run(["curl", "-s", "-o", "/dev/null", rp.url + path], check=True)
                deadline = time.monotonic() + 120
                while "hit" not in rp.cache_status(path):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{rp.name}: {b.digest} not cached after a GET")
                    time.sleep(0.2)
            for ref in (seed.TAG, self.manifest.digest):
                status, _, _ = http_get(seed.Manifest.url(rp.url, ref), {"Accept": seed.MANIFEST_TYPE})
                if status != 200:
                    raise RuntimeError(f"{rp.name}: manifest {ref}: HTTP {status}")
        return warm

    def _add_cache(self, wanted: set[str]) -> None:
        up = self.upstream
        if wanted & {"cache-warm", "cache-warm-tls"}:
            rp, err = self._regproxy("regproxy-cache", up.url, cache=True)
            pids = lambda: process_tree(rp.proc.pid)  # noqa: E731
            warm = self._warm_regproxy(rp)
            if "cache-warm" in wanted:
                self._peer("cache-warm", rp.url, pids, prepare=warm, unavailable=err)
            if "cache-warm-tls" in wanted:
                self._peer("cache-warm-tls", rp.tls_url, pids, prepare=warm, unavailable=err)
        if "cache-cold" in wanted:
            cold, errc = self._regproxy("regproxy-cache-cold", up.url, cache=True)
            self._peer("cache-cold", cold.url, lambda: process_tree(cold.proc.pid),
                       prepare=lambda d: cold.restart(fresh=True), unavailable=errc)
        if "cache-fresh" in wanted:
            # The tag rules need a config file: one default upstream, tags fresh for an hour.
            conf = (f'[[upstream]]\nname = "127.0.0.1:{up.port}"\nurl = "{up.url}"\n'
                    f'default = true\nlibrary_prefix = false\n'
                    f'tags = [{{repositories = ["**"], fresh = 3600}}]\n')
            # No prefetch: its first tag miss would otherwise fill both blobs (1.1 GiB)
            # in the background while other peers are being measured.
            fr, errf = self._regproxy("regproxy-cache-fresh", up.url, cache=True, config=conf,
                                      extra=("--prefetch", "0"))

            def warm_tag(_digest: str | None) -> None:
                status, _, _ = http_get(seed.Manifest.url(fr.url), {"Accept": seed.MANIFEST_TYPE})
                if status != 200:
                    raise RuntimeError(f"{fr.name}: manifest: HTTP {status}")
            self._peer("cache-fresh", fr.url, lambda: process_tree(fr.proc.pid), prepare=warm_tag,
                       unavailable=errf)

    def _add_pull(self, wanted: set[str]) -> None:
        """The cold `docker pull`-like fetch: everything through a relay that puts
        the upstream --pull-rtt-ms away; each regproxy restarts (empty cache, no
        pooled connections) before every measurement."""
        a = self.args
        relay = DelayRelay(self.rundir, self.upstream.port, a.pull_rtt_ms, a.python)
        self._launch(relay.proc, relay.start)
        up = self.upstream
        if "pull-direct" in wanted:
            self._peer("pull-direct", relay.url, lambda: [up.proc.pid])
        for key, kw in (("pull-pass", {}),
                        ("pull-p0", {"cache": True, "extra": ("--prefetch", "0")}),
                        ("pull-p4", {"cache": True, "extra": ("--prefetch", "4")})):
            if key not in wanted:
                continue
            rp, err = self._regproxy(f"regproxy-{key}", relay.url, **kw)
            self._peer(key, rp.url, lambda rp=rp: process_tree(rp.proc.pid),
                       prepare=lambda d, rp=rp: rp.restart(fresh=True), unavailable=err)

    def _quiet_log(self, reg: Registry) -> None:
        """Wait until the upstream's access log stops growing (its lines land
        when each answer is complete)."""
        last, stable, deadline = -1, 0, time.monotonic() + 3
        while time.monotonic() < deadline and stable < 2:
            time.sleep(0.08)
            size = reg.log_mark()
            stable = stable + 1 if size == last else 0
            last = size

    def _upstream_stats(self, test: str, reqs: list[tuple[str, str, int, int]],
                        r: dict[str, Any]) -> dict[str, float]:
        blob_bytes = sum(n for m, path, _, n in reqs if m == "GET" and "/blobs/" in path)
        man_head = sum(1 for m, path, _, _ in reqs if m == "HEAD" and "/manifests/" in path)
        man_get = sum(1 for m, path, _, _ in reqs if m == "GET" and "/manifests/" in path)
        out: dict[str, float] = {"upstream_requests": float(len(reqs)),
                                 "upstream_blob_gets": float(sum(1 for m, path, _, _ in reqs
                                                                 if m == "GET" and "/blobs/" in path))}
        if test == "single":
            out["upstream_x"] = blob_bytes / self.big.size
        elif test.startswith("par"):
            out["upstream_x"] = blob_bytes / self.medium.size
        elif test in ("pull", "docker") and self.image is not None:
            out["upstream_x"] = blob_bytes / self.image.blob_bytes  # cold + warm pull
        n = r.get("pulls") or r.get("requests")
        if test in ("tags", "wrk", "wrk-digest") and n:
            out["up_head_per_1000"] = 1000 * man_head / n
            out["up_get_per_1000"] = 1000 * man_get / n
            out["up_manifest_per_1000"] = 1000 * (man_head + man_get) / n
        return out

    def record(self, peer: Peer, test: str, fn: Callable[[], dict[str, Any]],
               digest: str | None) -> None:
        """Run one measurement; a failure is recorded, not raised, so the run goes on.

        If other processes used more than --max-foreign-cpu % of the machine
        meanwhile, it is measured again (--busy-retries times at most, after
        waiting up to 30 s for the machine to calm down); the sample keeps its
        foreign_cpu_pct and how many tries it took."""
        if peer.unavailable or not peer.takes(test):
            return
        a = self.args
        for attempt in range(a.busy_retries + 1):
            r = self._measure(peer, test, fn, digest)
            r["tries"] = attempt + 1
            busy = r["foreign_cpu_pct"] > a.max_foreign_cpu
            # rss takes long; docker's own disk work (vfs copies) shows up as kernel threads
            if not busy or attempt == a.busy_retries or test in ("rss", "docker"):
                break
            self.log(f"  {peer.name:30} {test:10} other processes used {r['foreign_cpu_pct']:.0f}% "
                     f"of the cores meanwhile: measuring again")
            self.wait_quiet(30)
        self.samples.setdefault(peer.name, {}).setdefault(test, []).append(r)
        nums = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.items() if k != "problems")
        self.log(f"  {peer.name:30} {test:10} {nums}")

    def _measure(self, peer: Peer, test: str, fn: Callable[[], dict[str, Any]],
                 digest: str | None) -> dict[str, Any]:
        other = ForeignCpu()
        load = os.getloadavg()[0]
        try:
            peer.prepare(digest)
            reg = peer.upstream or self.upstream
            mark = reg.log_mark()
            other.reset()
            r = fn()
            peer.settle(digest)
            if test not in ("check", "rss"):
                self._quiet_log(reg)
                r.update(self._upstream_stats(test, reg.requests_since(mark), r))
        except Exception as e:  # noqa: BLE001 - report and carry on
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        r["load1"] = load
        r["foreign_cpu_pct"] = other.pct()
        return r

    def wait_quiet(self, limit: float | None = None) -> float:
        """Wait (at most --wait-quiet s, or limit) while other processes use more
        than --max-foreign-cpu % of the machine; returns the last figure."""
        a = self.args
        deadline = time.monotonic() + (a.wait_quiet if limit is None else limit)
        while True:
            probe = ForeignCpu()
            time.sleep(3)
            pct = probe.pct()
            if pct <= a.max_foreign_cpu or time.monotonic() >= deadline:
                if pct > a.max_foreign_cpu:
                    self.log(f"other processes still use {pct:.0f}% of the cores; going on")
                return pct
            self.log(f"other processes use {pct:.0f}% of the cores (> {a.max_foreign_cpu:.0f}%); "
                     f"waiting")

    def run(self) -> dict[str, Any]:
        a, big, med = self.args, self.big, self.medium
        t0 = time.monotonic()
        self.log("correctness (ranges, digests)")
        for p in self.peers:
            self.record(p, "check", lambda p=p: measure.correctness(p, big, med, self.manifest), None)
        by_digest = seed.Manifest.url  # with the manifest's digest as the reference
        for rep in range(a.reps):
            if a.wait_quiet:
                self.wait_quiet()
            self.loadavg.append(os.getloadavg()[0])
            rep_other = ForeignCpu()
            self.log(f"repetition {rep + 1}/{a.reps} (load average {self.loadavg[-1]:.2f})")
            for p in self.peers:
                self.record(p, "single", lambda p=p: measure.single_stream(p, big), big.digest)
            for n in a.parallel:
                for p in self.peers:
                    self.record(p, f"par{n}", lambda p=p, n=n: measure.parallel(p, med, n), med.digest)
            for p in self.peers:
                self.record(p, "wrk", lambda p=p: measure.manifest_wrk(p, a.wrk_seconds, a.wrk_conns),
                            None)
            for p in self.peers:
                self.record(p, "wrk-digest", lambda p=p: measure.manifest_wrk(
                    p, a.wrk_seconds, a.wrk_conns, by_digest(p.url, self.manifest.digest)), None)
            for p in self.peers:
                self.record(p, "tags", lambda p=p: measure.tag_pulls(p, a.tag_pulls), None)
            if self.image is not None:
                for p in self.peers:
                    self.record(p, "pull", lambda p=p: measure.pull_cold_then_warm(p, self.image, a.pull_parallel),
                                None)
            if self.image is not None and self.dockerd is not None:
                for p in self.peers:
                    self.record(p, "docker", lambda p=p: measure.docker_pull(self.dockerd, p, self.image), None)
            self.foreign.append(rep_other.pct())
            self.log(f"repetition {rep + 1}: other processes used {self.foreign[-1]:.0f}% of the cores")
        self.log(f"RSS growth with a {a.rss_rate}/s client (once per peer)")
        for p in self.peers:
            self.record(p, "rss", lambda p=p: measure.rss_growth(p, big, a.rss_rate, a.rss_seconds),
                        big.digest)
        return {
            "started": self.started, "seconds": time.monotonic() - t0,
            "config": {"quick": a.quick, "reps": a.reps, "big_mib": a.big_mib,
                       "medium_mib": a.medium_mib, "wrk_seconds": a.wrk_seconds,
                       "wrk_conns": a.wrk_conns, "parallel": a.parallel,
                       "rss_rate": a.rss_rate, "rss_seconds": a.rss_seconds,
                       "tag_pulls": a.tag_pulls, "pull_rtt_ms": a.pull_rtt_ms,
                       "pull_parallel": a.pull_parallel,
                       "pull_layers": len(self.image.layers) if self.image else None,
                       "pull_mib": self.image.blob_bytes / 2**20 if self.image else None,
                       "cores": os.cpu_count(), "nginx_buffer": a.nginx_buffer or "default",
                       "loadavg_1min_per_rep": self.loadavg,
                       "foreign_cpu_pct_per_rep": self.foreign,
                       "max_foreign_cpu": a.max_foreign_cpu, "busy_retries": a.busy_retries,
                       "rows": sorted(a.rows), "docker_unavailable": self.docker_unavailable,
                       "client": "curl processes, -o /dev/null; wrk -t2; Python http.client "
                                 "for the tag pulls and the cold pull"},
            "peers": [p.name for p in self.peers],
            "unavailable": {p.name: p.unavailable for p in self.peers if p.unavailable},
            "samples": self.samples,
            "medians": report.medians(self.samples) | {
                p.name: {} for p in self.peers if p.name not in self.samples},
            "logs": str(self.rundir),
        }


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStack, which stops the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    ensure_tools()
    if args.regproxy_tree:
        peers.REGPROXY_TREE = args.regproxy_tree.resolve()
        version = peers.tree_version(peers.REGPROXY_TREE)
        if version == "unknown" and peers.REGPROXY_TREE.name.startswith("tree-"):
            version = peers.REGPROXY_TREE.name[5:]
    elif args.snapshot:
        args.workdir.mkdir(parents=True, exist_ok=True)
        peers.REGPROXY_TREE, sha = peers.snapshot_tree(args.workdir)
        print(f"regproxy from a snapshot of {sha[:12]}: {peers.REGPROXY_TREE}", flush=True)
        version = sha[:12]
    else:
        version = peers.tree_version(peers.REGPROXY_TREE)
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        bench = Bench(args, stack)
        bench.start()
        result = bench.run()
    peers.discard_data(bench.rundir)
    result["seconds_total"] = time.monotonic() - t0
    result["config"]["regproxy_version"] = version + (
        f" ({peers.REGPROXY_TREE})" if args.regproxy_tree else " (snapshot)" if args.snapshot else " (work tree)")
    path = report.write(result, args.out, HERE / "README.md" if args.update_readme else None)
    print()
    print(report.markdown(result))
    print(f"written: {path} (+ .json); server logs in {result['logs']}; "
          f"total {result['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
