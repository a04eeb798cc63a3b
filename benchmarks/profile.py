"""Profile regproxy's hot path with py-spy while it streams a big blob.

    python benchmarks/profile.py                     # flame graph SVG
    python benchmarks/profile.py --format speedscope --downloads 3 --tls

Starts a seeded upstream registry and regproxy (same as run.py), attaches
`py-spy record --pid` to the proxy, runs N single-stream downloads (or
--parallel N at once), then stops py-spy and writes the profile into
benchmarks/results/.  Sampling a live process is what shows where real
bytes spend their time; a synthetic microbenchmark would not.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import seed  # noqa: E402
from peers import Peer, Registry, RegProxy, process_tree  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--format", choices=["flamegraph", "speedscope", "raw"], default="flamegraph")
    p.add_argument("--downloads", type=int, default=2, help="sequential big-blob GETs")
    p.add_argument("--parallel", type=int, default=0, help="instead: N concurrent medium GETs")
    p.add_argument("--big-mib", type=int, default=1024)
    p.add_argument("--medium-mib", type=int, default=100)
    p.add_argument("--tls", action="store_true", help="download over regproxy's TLS listener")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/regproxy-bench"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    ext = {"flamegraph": "svg", "speedscope": "speedscope.json", "raw": "txt"}[a.format]
    out = a.out / f"profile-{stamp}.{ext}"
    rundir = a.workdir / f"profile-{stamp}"
    rundir.mkdir(parents=True)

    with contextlib.ExitStack() as stack:
        big = seed.make_blob(a.workdir, a.big_mib << 20)
        medium = seed.make_blob(a.workdir, a.medium_mib << 20)
        up = Registry("upstream", rundir, a.workdir / "upstream-storage")
        stack.callback(up.proc.stop)
        if err := up.start():
            sys.exit(err)
        for b in (big, medium):
            seed.push_blob(up.url, blob=b)
        rp = RegProxy(rundir, up.url, a.python)
        stack.callback(rp.proc.stop)
        if err := rp.start():
            sys.exit(f"regproxy not available: {err}")
        peer = Peer("regproxy", rp.tls_url if a.tls else rp.url, lambda: process_tree(rp.proc.pid))
        argv = [pyspy, "record", "--pid", str(rp.proc.pid), "--rate", str(a.rate),
                "--format", a.format, "-o", str(out)] + (["--native"] if a.native else [])
        spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # let py-spy attach before traffic starts
        if spy.poll() is not None:
            sys.exit(f"py-spy failed: {spy.communicate()[0].decode(errors='replace')}")
        try:
            for i in range(a.downloads if not a.parallel else 1):
                r = (measure.parallel(peer, medium, a.parallel) if a.parallel
                     else measure.single_stream(peer, big))
                print(f"run {i + 1}: " + ", ".join(f"{k}={v:.3g}" for k, v in r.items()),
                      flush=True)
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                print(spy.communicate(timeout=60)[0].decode(errors="replace")[-500:])
            except subprocess.TimeoutExpired:
                spy.kill()
    print(f"profile: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
