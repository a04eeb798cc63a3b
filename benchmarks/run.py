"""Benchmark regproxy against a direct registry, nginx and distribution's proxy mode.

    python benchmarks/run.py            # full run, ~15 min, updates README.md
    python benchmarks/run.py --quick    # ~2 min, smaller blobs, 1 repetition

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
import report  # noqa: E402
import seed  # noqa: E402
from peers import Nginx, Peer, Registry, RegProxy, http_get, process_tree  # noqa: E402

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
                   help="cut the RSS download after N s (default 0 = whole blob, ~54 s "
                        "per peer; quick 5)")
    p.add_argument("--peers", default="direct,nginx,nginx-64k,dist-cold,dist-warm,regproxy,regproxy-tls,"
                   "regproxy-2w",
                   help="comma-separated subset of the default list")
    p.add_argument("--nginx-buffer", default="",
                   help="nginx proxy_buffer_size, e.g. 64k (default: nginx's own, one page)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/regproxy-bench"),
                   help="blobs and upstream storage, reused across runs")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that runs regproxy (needs twisted, treq)")
    p.add_argument("--update-readme", action=argparse.BooleanOptionalAction,
                   help="put the table into benchmarks/README.md (default: on unless --quick)")
    a = p.parse_args(argv)
    q = a.quick
    a.reps = a.reps or (1 if q else 3)
    a.big_mib = a.big_mib or (256 if q else 1024)
    a.medium_mib = a.medium_mib or (32 if q else 100)
    a.wrk_seconds = a.wrk_seconds or (2.0 if q else 5.0)
    a.rss_seconds = a.rss_seconds if a.rss_seconds is not None else (5.0 if q else 0.0)
    a.update_readme = a.update_readme if a.update_readme is not None else not q
    a.parallel = [int(n) for n in a.parallel.split(",") if n]
    a.peers = a.peers.split(",")
    return a


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

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def start(self) -> None:
        a = self.args
        self.log(f"making blobs ({a.big_mib} and {a.medium_mib} MiB) in {a.workdir}")
        self.big = seed.make_blob(a.workdir, a.big_mib << 20)
        self.medium = seed.make_blob(a.workdir, a.medium_mib << 20)

        self.upstream = Registry("upstream", self.rundir, a.workdir / "upstream-storage")
        self._launch(self.upstream.proc, self.upstream.start)
        self.log(f"upstream registry on {self.upstream.url}; seeding")
        for b in (self.big, self.medium):
            seed.push_blob(self.upstream.url, blob=b)
        self.manifest = seed.push_manifest(self.upstream.url, [self.big, self.medium])

        up = self.upstream
        wanted = set(a.peers)
        if "direct" in wanted:
            self.peers.append(Peer("direct", up.url, lambda: [up.proc.pid]))
        if "nginx" in wanted:
            ng = Nginx(self.rundir, f"127.0.0.1:{up.port}", a.nginx_buffer)
            self._launch(ng.proc, ng.start)
            self.peers.append(Peer("nginx", ng.url, lambda: process_tree(ng.proc.pid)))
        if "nginx-64k" in wanted:
            # proxy_buffering off makes stock nginx move one page per read/write;
            # 64k buffers are what a tuned deployment (and the figures) use.
            tuned = Nginx(self.rundir, f"127.0.0.1:{up.port}", "64k", name="nginx-64k")
            self._launch(tuned.proc, tuned.start)
            self.peers.append(Peer("nginx (64k)", tuned.url, lambda: process_tree(tuned.proc.pid)))
        if wanted & {"dist-cold", "dist-warm"}:
            self._add_distribution(wanted)
        if wanted & {"regproxy", "regproxy-tls"}:
            self._add_regproxy(wanted)

    def _launch(self, proc: Any, start: Callable[[], str | None]) -> str | None:
        self.stack.callback(proc.stop)
        err = start()
        if err and proc.name in ("upstream", "nginx"):
            raise RuntimeError(err)
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
            self.peers.append(Peer("distribution (cold)", dist.url, pids,
                                   prepare=lambda d: dist.restart(fresh=True),
                                   settle=wait_cached, skip={"wrk"}))
        if "dist-warm" in wanted:
            self.peers.append(Peer("distribution (warm)", dist.url, pids, prepare=warm))

    def _add_regproxy(self, wanted: set[str]) -> None:
        rp = RegProxy(self.rundir, self.upstream.url, self.args.python)
        err = self._launch(rp.proc, rp.start)
        if err:
            rp.proc.stop()
        pids = lambda: process_tree(rp.proc.pid)  # noqa: E731
        if "regproxy" in wanted:
            self.peers.append(Peer("regproxy", rp.url, pids, unavailable=err))
        if "regproxy-tls" in wanted:
            self.peers.append(Peer("regproxy (TLS)", rp.tls_url, pids, unavailable=err))
        if "regproxy-2w" in wanted:
            rp2 = RegProxy(self.rundir, self.upstream.url, self.args.python, ("--workers", "2"), "regproxy-2w")
            err2 = self._launch(rp2.proc, rp2.start)
            if err2:
                rp2.proc.stop()
            self.peers.append(Peer("regproxy (2 workers)", rp2.url, lambda: process_tree(rp2.proc.pid),
                                   unavailable=err2))

    def record(self, peer: Peer, test: str, fn: Callable[[], dict[str, Any]],
               digest: str | None) -> None:
        """Run one measurement; a failure is recorded, not raised, so the run goes on."""
        if peer.unavailable or test in peer.skip:
            return
        try:
            peer.prepare(digest)
            mark = self.upstream.log_mark()
            r = fn()
            peer.settle(digest)
            if test == "single":
                time.sleep(0.2)  # let the access log line land
                r["upstream_x"] = self.upstream.blob_bytes_since(mark) / self.big.size
        except Exception as e:  # noqa: BLE001 - report and carry on
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        self.samples.setdefault(peer.name, {}).setdefault(test, []).append(r)
        nums = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.items() if k != "problems")
        self.log(f"  {peer.name:22} {test:7} {nums}")

    def run(self) -> dict[str, Any]:
        a, big, med = self.args, self.big, self.medium
        t0 = time.monotonic()
        self.log("correctness (ranges, digests)")
        for p in self.peers:
            self.record(p, "check", lambda p=p: measure.correctness(p, big, med, self.manifest), None)
        for rep in range(a.reps):
            self.loadavg.append(os.getloadavg()[0])
            self.log(f"repetition {rep + 1}/{a.reps} (load average {self.loadavg[-1]:.2f})")
            for p in self.peers:
                self.record(p, "single", lambda p=p: measure.single_stream(p, big), big.digest)
            for n in a.parallel:
                for p in self.peers:
                    self.record(p, f"par{n}", lambda p=p, n=n: measure.parallel(p, med, n), med.digest)
            for p in self.peers:
                self.record(p, "wrk", lambda p=p: measure.manifest_wrk(p, a.wrk_seconds, a.wrk_conns),
                            None)
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
                       "cores": os.cpu_count(), "nginx_buffer": a.nginx_buffer or "default",
                       "loadavg_1min_per_rep": self.loadavg, "client": "curl processes, -o /dev/null; wrk -t2"},
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
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        bench = Bench(args, stack)
        bench.start()
        result = bench.run()
    result["seconds_total"] = time.monotonic() - t0
    path = report.write(result, args.out, HERE / "README.md" if args.update_readme else None)
    print()
    print(report.markdown(result))
    print(f"written: {path} (+ .json); server logs in {result['logs']}; "
          f"total {result['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
