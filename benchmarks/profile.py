"""Profile regproxy's hot paths with py-spy: where real bytes spend their time.

    python benchmarks/profile.py                          # (a) 1 GiB pass-through, plain TCP
    python benchmarks/profile.py --wrk 10                 # (b) manifest pass-through under wrk
    python benchmarks/profile.py --cache --tls            # (c) warm cache hits over the TLS listener
    python benchmarks/profile.py --parallel 64            # the concurrent path
    python benchmarks/profile.py --format flamegraph      # py-spy's own SVG, no summary

Starts a seeded upstream registry and regproxy (as run.py does; --cache gives
it a cache directory and warms the big blob first), attaches `py-spy record
--pid` to the proxy (with --native: C frames too, so syscalls, memcpy and
OpenSSL show up under the Python function that called them), runs the load,
stops py-spy and writes into benchmarks/results/:

  profile-<time>-<label>.svg    a flame graph (root at the top; hover for counts)
  profile-<time>-<label>.txt    py-spy's collapsed stacks (flamegraph.pl input)
  profile-<time>-<label>.md     self time by function and by category

"Self time" of a function is the samples whose deepest *Python* frame is that
function, whatever C code it was in (a socket send() is charged to
Twisted's writeSomeData). py-spy does not sample idle threads (blocked in
epoll_wait), so the fractions are of the CPU the proxy used. Sampling a live
process is what shows where real bytes spend their time; a synthetic
microbenchmark would not.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import html
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import peers  # noqa: E402
import seed  # noqa: E402
from peers import Peer, Registry, RegProxy, process_tree  # noqa: E402

HERE = Path(__file__).resolve().parent

#: (category, test on "function (file)") — first match wins; the deepest Python frame decides.
CATEGORIES: list[tuple[str, Any]] = [
    ("TLS (pyOpenSSL, twisted.protocols.tls)",
     lambda f, p: "OpenSSL/" in p or "protocols/tls.py" in p or "_sslverify" in p),
    ("socket send (syscall, in tcp.writeSomeData)", lambda f, p: p.endswith("internet/tcp.py") and
     f in ("writeSomeData", "_writeSomeData")),
    ("socket recv (syscall, in tcp.doRead)", lambda f, p: p.endswith("internet/tcp.py") and f == "doRead"),
    ("sendfile(2) and its poll (cache hits, threads)", lambda f, p: "cache/sendfile.py" in p),
    ("reactor: epoll and dispatch", lambda f, p: "epollreactor.py" in p or "posixbase.py" in p or
     p.endswith("internet/base.py") or "log.py" in p and f in ("callWithLogger", "callWithContext") or
     "internet/tcp.py" in p),
    ("Twisted write buffer (abstract.FileDescriptor write/doWrite)",
     lambda f, p: p.endswith("internet/abstract.py")),
    ("HTTP client parser (twisted.web._newclient)", lambda f, p: "web/_newclient.py" in p),
    ("HTTP server side (twisted.web.http/server: parsing, Request.write)",
     lambda f, p: "web/http.py" in p or "web/server.py" in p or "web/http_headers.py" in p or
     "protocols/basic.py" in p or "web/_responses" in p or "web/_abnf" in p),
    ("our pipe (regproxy/pipe.py)", lambda f, p: "regproxy/pipe.py" in p),
    ("cache file reader (regproxy/cache/reader.py)", lambda f, p: "regproxy/cache/reader.py" in p),
    ("logging (twisted.logger and its JSON lines, access log)", lambda f, p: "twisted/logger/" in p or
     "regproxy/accesslog.py" in p or "twisted/python/log.py" in p or "json/" in p or
     f == "_access_log"),
    ("Deferreds, DelayedCalls, producers", lambda f, p: "internet/defer.py" in p or
     "internet/task.py" in p or "protocols/policies.py" in p or "web/_producers" in p or
     "internet/_producer_helpers" in p),
    ("metrics (prometheus_client)", lambda f, p: "prometheus_client" in p or "regproxy/metrics.py" in p),
    ("regproxy, the rest", lambda f, p: p.startswith("regproxy/") or "/regproxy/" in p),
    ("Twisted, the rest", lambda f, p: p.startswith("twisted/") or "/twisted/" in p),
    ("threads, interpreter, generated code", lambda f, p: "threading.py" in p or p.startswith("<")),
    ("standard library, other libraries", lambda f, p: p.endswith(".py")),
]

def _category(func: str, path: str) -> str:
    """The category of a deepest Python frame (method names without their class)."""
    name = func.rsplit(".", 1)[-1]
    return next((c for c, test in CATEGORIES if test(name, path)), "other")


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^()]*?)(?::\d+)?\)$")


def _split(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    return (m.group("func"), m.group("path")) if m else (frame, "")


def _is_python(frame: str) -> bool:
    _, path = _split(frame)
    return path.endswith(".py") or path.startswith("<")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return path


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


#: Python leaves that mean "this thread is waiting" (py-spy's idle detection does not
#: catch a thread-pool worker blocked in Queue.get here): left out of the fractions.
_WAITING = {"wait", "get", "join", "sleep", "_wait_for_tstate_lock", "select", "poll"}
#: Helpers whose caller is the interesting frame (untilConcludes(socket.send, ...)).
_HELPERS = {"untilConcludes", "callWithContext", "callWithLogger"}


def _leaf(frames: list[str]) -> str:
    py = [f for f in frames if _is_python(f)]
    while len(py) > 1 and _split(py[-1])[0].rsplit(".", 1)[-1] in _HELPERS and \
            "doPoll" not in py[-2]:
        py.pop()
    return py[-1] if py else frames[-1]


def _waiting(frames: list[str]) -> bool:
    func, path = _split(_leaf(frames))
    return func.rsplit(".", 1)[-1] in _WAITING and ("threading.py" in path or "queue.py" in path
                                                    or "sendfile.py" in path and "poll" in func)


def summarise(stacks: list[tuple[list[str], int]], title: str, top: int = 15) -> str:
    idle = sum(n for frames, n in stacks if _waiting(frames))
    stacks = [(frames, n) for frames, n in stacks if not _waiting(frames)]
    total = sum(n for _, n in stacks) or 1
    by_func: Counter[str] = Counter()
    by_cat: Counter[str] = Counter()
    native: Counter[str] = Counter()
    for frames, n in stacks:
        leaf = _leaf(frames)
        func, path = _split(leaf)
        by_func[f"{func} ({_short(path)})"] += n
        by_cat[_category(func, path)] += n
        last = frames[-1]
        if not _is_python(last):
            lib = _split(last)[1] or last
            lib = re.sub(r"[.-][0-9][0-9.]*.*$", "", lib.rsplit("/", 1)[-1]) or lib
            native[lib] += n
        else:
            native["(Python frame)"] += n
    lines = [f"### {title}", "", f"{total} samples ({idle} more of idle, waiting threads left out).", "",
             "| self time, by deepest Python function | samples | % |", "|---|---|---|"]
    lines += [f"| `{k}` | {v} | {100 * v / total:.1f} |" for k, v in by_func.most_common(top)]
    lines += ["", "| by category | % of samples |", "|---|---|"]
    lines += [f"| {k} | {100 * v / total:.1f} |" for k, v in by_cat.most_common()]
    if any(k != "(Python frame)" for k in native):
        lines += ["", "| innermost native frame (--native) | % of samples |", "|---|---|"]
        lines += [f"| {k} | {100 * v / total:.1f} |" for k, v in native.most_common(8)]
    return "\n".join(lines) + "\n"


def _colour(name: str) -> str:
    func, path = _split(name)
    palette = {"TLS": "#e07070", "socket": "#e0a040", "sendfile": "#e0c040", "reactor": "#d0b070",
               "Twisted write": "#d09050", "HTTP": "#70a0e0", "our pipe": "#60c060",
               "cache file": "#60c0a0", "logging": "#c080d0", "Deferreds": "#a0a0d0",
               "metrics": "#b0b0b0", "regproxy": "#80d080", "Twisted": "#90b0d0"}
    if not _is_python(name):
        return "#d8d8d8"
    cat = _category(func, path)
    return next((v for k, v in palette.items() if cat.startswith(k)), "#c8c8a0")


def flame_svg(stacks: list[tuple[list[str], int]], title: str, width: int = 1400) -> str:
    """A static flame graph (root at the top, hover a box for its counts); idle
    waiting threads left out."""
    stacks = [(frames, n) for frames, n in stacks if not _waiting(frames)]
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for frames, n in stacks:
        node = tree
        node["n"] += n
        while len(frames) > 1 and not _is_python(frames[0]):
            frames = frames[1:]  # the process's native root (libc start), sampled or not
        for f in frames:
            f = re.sub(r":\d+\)$", ")", f)  # merge lines of one function
            node = node["kids"].setdefault(f, {"n": 0, "kids": {}})
            node["n"] += n
    total = tree["n"] or 1
    row, top = 17, 40
    out: list[str] = []
    depth_max = 0

    def walk(node: dict[str, Any], x: float, depth: int) -> None:
        nonlocal depth_max
        for name, kid in sorted(node["kids"].items(), key=lambda kv: -kv[1]["n"]):
            w = kid["n"] / total * (width - 20)
            if w >= 0.3:
                depth_max = max(depth_max, depth)
                y = top + depth * row
                own = kid["n"] - sum(k["n"] for k in kid["kids"].values())
                func, path = _split(name)
                label = f"{func} ({_short(path)})" if path else name
                tip = html.escape(f"{label}: {kid['n']} samples, {100 * kid['n'] / total:.1f}% "
                                  f"(self {100 * own / total:.1f}%)")
                out.append(f'<g><title>{tip}</title><rect x="{10 + x:.1f}" y="{y}" width="{w:.1f}" '
                           f'height="{row - 1}" fill="{_colour(name)}" rx="2"/>')
                chars = int(w / 7)
                if chars >= 4:
                    text = label if len(label) <= chars else label[:chars - 2] + ".."
                    out.append(f'<text x="{12 + x:.1f}" y="{y + 12}">{html.escape(text)}</text>')
                out.append("</g>")
                walk(kid, x, depth + 1)
            x += w

    walk(tree, 0.0, 0)
    height = top + (depth_max + 2) * row
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="monospace" font-size="11">\n'
            f'<rect width="100%" height="100%" fill="#fafaf5"/>\n'
            f'<text x="10" y="22" font-size="15">{html.escape(title)} — {total} samples</text>\n'
            + "\n".join(out) + "\n</svg>\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--format", choices=["summary", "flamegraph", "speedscope", "raw"], default="summary",
                   help="summary (default): collapsed stacks + our SVG + self-time tables; "
                        "the others: py-spy's own output only")
    p.add_argument("--downloads", type=int, default=2, help="sequential big-blob GETs")
    p.add_argument("--parallel", type=int, default=0, help="instead: N concurrent medium GETs")
    p.add_argument("--wrk", type=float, default=0.0,
                   help="instead: wrk on the manifest by tag for this many seconds")
    p.add_argument("--wrk-conns", type=int, default=32)
    p.add_argument("--big-mib", type=int, default=1024)
    p.add_argument("--medium-mib", type=int, default=100)
    p.add_argument("--tls", action="store_true", help="through regproxy's TLS listener")
    p.add_argument("--cache", action="store_true",
                   help="regproxy with a cache directory; the blobs are warmed first (hits)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=True,
                   help="py-spy --native: C frames too (default on)")
    p.add_argument("--label", help="name in the output files (default from the mode)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/regproxy-bench"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--snapshot", action="store_true",
                   help="run regproxy from an export of HEAD, not the work tree (see run.py)")
    p.add_argument("--regproxy-tree", type=Path, help="run regproxy from this source tree")
    p.add_argument("--summarise", type=Path, metavar="TXT",
                   help="only redo the .svg and .md of an earlier profile from its collapsed stacks")
    p.add_argument("--title", help="with --summarise: the title")
    a = p.parse_args()
    if a.summarise:
        stacks = read_collapsed(a.summarise)
        title = a.title or a.summarise.stem
        old = a.summarise.with_suffix(".md")
        load = old.read_text().rsplit("\nLoad: ", 1)[-1] if old.exists() and "\nLoad: " in old.read_text() else ""
        if old.exists() and not a.title:
            title = old.read_text().split("\n", 1)[0].removeprefix("### ")
        a.summarise.with_suffix(".svg").write_text(flame_svg(stacks, f"regproxy: {title}"))
        md = summarise(stacks, title) + (f"\nLoad: {load}" if load else "")
        a.summarise.with_suffix(".md").write_text(md)
        print(md)
        return 0
    if a.regproxy_tree:
        peers.REGPROXY_TREE = a.regproxy_tree.resolve()
    elif a.snapshot:
        a.workdir.mkdir(parents=True, exist_ok=True)
        peers.REGPROXY_TREE, sha = peers.snapshot_tree(a.workdir)
        print(f"regproxy from a snapshot of {sha[:12]}", flush=True)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists() and not shutil.which("py-spy"):
        sys.exit("py-spy not found: pip install py-spy (into the interpreter running this)")
    a.out.mkdir(parents=True, exist_ok=True)
    mode = ("manifest-wrk" if a.wrk else f"parallel{a.parallel}" if a.parallel else "stream")
    label = a.label or "-".join([mode] + (["cache"] if a.cache else []) + (["tls"] if a.tls else ["tcp"]))
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    base = a.out / f"profile-{stamp}-{label}"
    spy_format = "raw" if a.format == "summary" else a.format
    spy_out = base.with_suffix({"raw": ".txt", "flamegraph": ".svg",
                                "speedscope": ".speedscope.json"}[spy_format])
    rundir = a.workdir / f"profile-{stamp}-{label}"
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
        seed.push_manifest(up.url, [big, medium])
        rp = RegProxy(rundir, up.url, a.python, cache=a.cache)
        stack.callback(rp.proc.stop)
        if err := rp.start():
            sys.exit(f"regproxy not available: {err}")
        if a.cache:
            for b in (big, medium):
                path = f"/v2/{seed.REPO}/blobs/{b.digest}"
                subprocess.run(["curl", "-s", "-o", "/dev/null", rp.url + path], check=True)
                deadline = time.monotonic() + 120
                while "hit" not in rp.cache_status(path) and time.monotonic() < deadline:
                    time.sleep(0.2)
                print(f"warmed {b.digest[:19]}: {rp.cache_status(path)}", flush=True)
        peer = Peer("regproxy", rp.tls_url if a.tls else rp.url, lambda: process_tree(rp.proc.pid))
        argv = [pyspy, "record", "--pid", str(rp.proc.pid), "--rate", str(a.rate),
                "--format", spy_format, "-o", str(spy_out)] + (["--native"] if a.native else [])
        spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # let py-spy attach before traffic starts
        if spy.poll() is not None:
            sys.exit(f"py-spy failed: {spy.communicate()[0].decode(errors='replace')}")
        results = []
        try:
            if a.wrk:
                r = measure.manifest_wrk(peer, a.wrk, a.wrk_conns)
                results.append(r)
                print("wrk: " + ", ".join(f"{k}={v:.3g}" for k, v in r.items()), flush=True)
            else:
                for i in range(a.downloads if not a.parallel else 1):
                    r = (measure.parallel(peer, medium, a.parallel) if a.parallel
                         else measure.single_stream(peer, big))
                    results.append(r)
                    print(f"run {i + 1}: " + ", ".join(f"{k}={v:.3g}" for k, v in r.items()), flush=True)
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                print(spy.communicate(timeout=120)[0].decode(errors="replace")[-300:])
            except subprocess.TimeoutExpired:
                spy.kill()
    peers.discard_data(rundir)  # the cache directory: gigabytes
    if a.format == "summary":
        stacks = read_collapsed(spy_out)
        what = {"stream": f"{a.downloads} x {a.big_mib} MiB single-stream pass-through",
                "manifest-wrk": f"manifest by tag pass-through, wrk -c{a.wrk_conns} {a.wrk:g} s"}.get(
                    mode, f"{a.parallel} parallel {a.medium_mib} MiB downloads")
        if a.cache:
            what = what.replace("pass-through", "warm cache hits")
        title = f"{what}, {'TLS listener' if a.tls else 'plain TCP'}"
        base.with_suffix(".svg").write_text(flame_svg(stacks, f"regproxy: {title}"))
        loads = "; ".join(", ".join(f"{k}={v:.3g}" for k, v in r.items()) for r in results)
        md = summarise(stacks, title) + f"\nLoad: {loads}.\n"
        base.with_suffix(".md").write_text(md)
        print(md)
        print(f"profile: {base}.svg, .txt, .md")
    else:
        print(f"profile: {spy_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
