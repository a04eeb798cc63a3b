"""Paired A/B of regproxy source trees: one upstream, every variant running at once, measurements interleaved.

    python benchmarks/ab.py --tree before=/var/tmp/tree-old --tree after=. single
    python benchmarks/ab.py --tree before=... --tree after=. --tls single      # over each one's TLS listener
    python benchmarks/ab.py --tree before=... --tree after=. --cache single    # warm cache hits
    python benchmarks/ab.py --tree before=... --tree after=. --cache digest    # cached manifest by digest, wrk
    python benchmarks/ab.py --tree before=... --tree after=. --cache par64     # 64 clients of a warm 100 MiB blob
    python benchmarks/ab.py --tree before=... --tree after=. --tls-upstream single   # pass-through from an https upstream

Make a "before" tree with ``git archive <commit> | tar -x -C DIR``. A variant
may also differ by environment: ``--tree nopin=.:GLIBC_TUNABLES=glibc.malloc.check=0``.

On this 2-core VM one measurement of a full run moves by 20-50% with
whatever else the machine does; a change that moves a median by less than
that is only visible when both sides run side by side, in turns, which is
what this does (A B A B ...). It prints, per variant, the median and every
sample of the figure that matters for the row. Bounded: loopback only, a
fixed number of repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import peers  # noqa: E402
import seed  # noqa: E402
from peers import Peer, Registry, RegProxy, process_tree  # noqa: E402


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    """NAME=TREE[:VAR=VALUE...]"""
    name, _, rest = text.partition("=")
    tree, *env = rest.split(":")
    return name, Path(tree).resolve(), dict(e.split("=", 1) for e in env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("row", choices=["single", "digest", "tag", "par64"])
    p.add_argument("--tree", action="append", required=True, type=parse_variant, metavar="NAME=TREE[:VAR=VALUE]")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tls", action="store_true", help="through each regproxy's TLS listener")
    p.add_argument("--cache", action="store_true", help="regproxy with a cache, content warmed first")
    p.add_argument("--tls-upstream", action="store_true", help="regproxy's upstream over https (a second registry)")
    p.add_argument("--seconds", type=float, default=4.0, help="wrk duration per measurement")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/regproxy-bench"))
    a = p.parse_args()
    rundir = a.workdir / f"ab-{datetime.datetime.now():%Y%m%dT%H%M%S}"
    rundir.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        blob = seed.make_blob(a.workdir, (1024 if a.row == "single" else 100) << 20)
        upstream = Registry("upstream", rundir, a.workdir / "upstream-storage")
        stack.callback(upstream.proc.stop)
        error = upstream.start()
        if error:
            sys.exit(error)
        seed.push_blob(upstream.url, blob=blob)
        manifest = seed.push_manifest(upstream.url, [blob])
        upstream_url, upstream_ca = upstream.url, None
        if a.tls_upstream:
            key, cert = peers.make_cert(rundir)
            secure = Registry("upstream-tls", rundir, a.workdir / "upstream-storage", tls=(key, cert))
            stack.callback(secure.proc.stop)
            error = secure.start()
            if error:
                sys.exit(error)
            upstream_url, upstream_ca = secure.url, cert
        proxies: dict[str, RegProxy] = {}
        for name, tree, env in a.tree:
            peers.REGPROXY_TREE = tree
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                proxy = RegProxy(
                    rundir, upstream_url, sys.executable, name=name, cache=a.cache, upstream_ca=upstream_ca
                )
                error = proxy.start()
            finally:
                os.environ.clear()
                os.environ.update(saved)
            stack.callback(proxy.proc.stop)
            if error:
                sys.exit(f"{name}: {error}")
            if a.cache:
                warm(proxy, blob, manifest)
            proxies[name] = proxy
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in proxies}
        for _ in range(a.reps):
            for name, proxy in proxies.items():
                samples[name].append(measure_once(a, proxy, blob, manifest))
        key = {"single": "cpu_s_per_gib", "par64": "cpu_s_per_gib"}.get(a.row, "server_cpu_ms_per_req")
        rate = "mbps" if a.row in ("single", "par64") else "rps"
        for name, xs in samples.items():
            figures = [x[key] for x in xs]
            print(
                f"{name:12s} {key} median {statistics.median(figures):.3f} (all {[round(f, 3) for f in figures]}), "
                f"{rate} median {statistics.median(x[rate] for x in xs):.0f}"
            )
    peers.discard_data(rundir)


def warm(proxy: RegProxy, blob: seed.Blob, manifest: seed.Manifest) -> None:
    """The blob and the manifest (by digest and tag) cached before any measurement."""
    path = f"/v2/{seed.REPO}/blobs/{blob.digest}"
    subprocess.run(["curl", "-s", "-o", "/dev/null", proxy.url + path], check=True)
    deadline = time.monotonic() + 120
    while "hit" not in proxy.cache_status(path):
        if time.monotonic() > deadline:
            sys.exit(f"{proxy.name}: the blob never became a hit")
        time.sleep(0.2)
    for ref in (manifest.digest, seed.TAG):
        url = seed.Manifest.url(proxy.url, ref)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", f"Accept: {seed.MANIFEST_TYPE}", url], check=True)


def measure_once(a: argparse.Namespace, proxy: RegProxy, blob: seed.Blob, manifest: seed.Manifest) -> dict[str, Any]:
    peer = Peer(proxy.name, proxy.tls_url if a.tls else proxy.url, lambda: process_tree(proxy.proc.pid))
    if a.row == "single":
        return measure.single_stream(peer, blob)
    if a.row == "par64":
        return measure.parallel(peer, blob, 64)
    ref = manifest.digest if a.row == "digest" else seed.TAG
    return measure.manifest_wrk(peer, a.seconds, 32, seed.Manifest.url(peer.url, ref))


if __name__ == "__main__":
    main()
