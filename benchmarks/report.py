"""Turn raw samples into medians, ratio tables, Markdown and JSON.

Nothing here judges a run as passed or failed: the target column only says
how regproxy compares to the figures issue 4 asks for.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

# (row label, test, key, format, higher_is_better or None for "not a ratio row")
ROWS: list[tuple[str, str, str, str, bool | None]] = [
    ("single stream, big blob (MB/s)", "single", "mbps", "{:.0f}", True),
    ("server CPU per GiB, single stream (s)", "single", "cpu_s_per_gib", "{:.2f}", False),
    ("upstream bytes per big-blob fetch (x blob)", "single", "upstream_x", "{:.2f}", None),
    ("16 parallel, medium blob, aggregate (MB/s)", "par16", "mbps", "{:.0f}", True),
    ("64 parallel, medium blob, aggregate (MB/s)", "par64", "mbps", "{:.0f}", True),
    ("  server CPU during 64 parallel (% of all cores)", "par64", "server_cpu_pct", "{:.0f}", None),
    ("  client (curl) CPU during 64 parallel (% of all cores)", "par64", "client_cpu_pct",
     "{:.0f}", None),
    ("manifest GET (req/s)", "wrk", "rps", "{:.0f}", True),
    ("manifest p50 (ms)", "wrk", "p50_ms", "{:.2f}", False),
    ("manifest p99 (ms)", "wrk", "p99_ms", "{:.2f}", False),
    ("manifest non-2xx responses", "wrk", "non2xx", "{:.0f}", None),
    ("peak RSS growth, rate-limited client (MiB)", "rss", "peak_growth_mib", "{:.1f}", None),
    ("range requests correct", "check", "ranges", "{}", None),
    ("sha256 of bodies = digest", "check", "digests_ok", "{}", None),
]

TARGETS = [  # (label, test, key, factor, vs, higher_is_better)
    ("single stream >= 0.9x nginx", "single", "mbps", 0.9, "nginx", True),
    ("CPU per GiB <= 1.5x nginx", "single", "cpu_s_per_gib", 1.5, "nginx", False),
    ("64 parallel >= 1.0x nginx", "par64", "mbps", 1.0, "nginx", True),
    ("manifest req/s >= nginx", "wrk", "rps", 1.0, "nginx", True),
    ("manifest p99 <= nginx", "wrk", "p99_ms", 1.0, "nginx", False),
]


def _targets(med: dict[str, dict[str, Any]], live: list[str], cand: str, base: str) -> list[str]:
    """The issue-4 targets for one regproxy column against one nginx column."""
    rp, ng = med.get(cand), med.get(base)
    if cand not in live or base not in live or rp is None or ng is None:
        return []
    lines = ["", f"{cand} against the issue-4 targets, baseline {base} (informational, not assertions):", "",
             f"| target | {cand} | {base} | ratio | met |", "|---|---|---|---|---|"]
    for label, test, key, factor, _vs, higher in TARGETS:
        a, b = rp.get(f"{test}.{key}"), ng.get(f"{test}.{key}")
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
            lines.append(f"| {label} | — | — | — | — |")
            continue
        met = a >= factor * b if higher else a <= factor * b
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f} | {'yes' if met else 'no'} |")
    g = rp.get("rss.peak_growth_mib")
    if isinstance(g, (int, float)):
        lines.append(f"| RSS growth <= 16 MiB | {g:.1f} MiB | — | — | {'yes' if g <= 16 else 'no'} |")
    return lines


def medians(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """peer -> "test.key" -> median over repetitions (numbers only)."""
    out: dict[str, dict[str, Any]] = {}
    for peer, tests in samples.items():
        m: dict[str, Any] = {}
        for test, runs in tests.items():
            keys = {k for r in runs for k, v in r.items() if isinstance(v, (int, float))
                    and not isinstance(v, bool)}
            for k in keys:
                m[f"{test}.{k}"] = statistics.median(r[k] for r in runs if k in r)
            for r in runs:
                for k, v in r.items():
                    if not isinstance(v, (int, float)) or isinstance(v, bool):
                        m.setdefault(f"{test}.{k}", v)
        out[peer] = m
    return out


def _cell(med: dict[str, Any], test: str, key: str, fmt: str) -> str:
    if f"{test}.error" in med:
        return "error"
    if test == "check" and key == "ranges":
        if "check.ranges_ok" not in med:
            return "—"
        return f"{med['check.ranges_ok']:.0f}/{med['check.ranges_total']:.0f}"
    v = med.get(f"{test}.{key}")
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return fmt.format(v)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "—"
    return f"{a / b:.2f}"


def markdown(result: dict[str, Any]) -> str:
    peers: list[str] = result["peers"]
    med: dict[str, dict[str, Any]] = result["medians"]
    unavailable: dict[str, str] = result["unavailable"]
    live = [p for p in peers if p not in unavailable]
    cfg = result["config"]
    lines = [f"Run {result['started']} on {cfg['cores']} cores, {cfg['reps']} repetitions "
             f"(medians), big blob {cfg['big_mib']} MiB, medium blob {cfg['medium_mib']} MiB"
             f"{', QUICK mode' if cfg['quick'] else ''}; took {result['seconds']:.0f} s. "
             f"MB = 10^6 bytes. nginx proxy_buffer_size: {cfg.get('nginx_buffer')}. "
             f"1-min load average at each repetition: "
             f"{', '.join(f'{x:.1f}' for x in cfg.get('loadavg_1min_per_rep', []))}.", ""]
    lines += ["| metric | " + " | ".join(live) + " |", "|---" * (len(live) + 1) + "|"]
    for label, test, key, fmt, _ in ROWS:
        if test == "rss":
            label += f" (client {cfg['rss_rate']}/s, " + (
                f"cut after {cfg['rss_seconds']:.0f} s)" if cfg["rss_seconds"] else "full blob)")
        lines.append(f"| {label} | " + " | ".join(_cell(med[p], test, key, fmt)
                                                   for p in live) + " |")
    lines += ["", "Ratios (peer / direct, peer / nginx; for CPU and latency lower is better):", ""]
    lines += ["| metric | " + " | ".join(live) + " |", "|---" * (len(live) + 1) + "|"]
    for label, test, key, _, better in ROWS:
        if better is None:
            continue
        k = f"{test}.{key}"
        cells = []
        for p in live:
            d = _ratio(med[p].get(k), med.get("direct", {}).get(k))
            n = _ratio(med[p].get(k), med.get("nginx", {}).get(k))
            cells.append(f"{d} / {n}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for p, why in unavailable.items():
        lines += ["", f"**{p}: not available** — {why}"]
    rp = med.get("regproxy")
    for cand in ("regproxy", "regproxy (2 workers)"):
        for base in ("nginx", "nginx (64k)"):
            lines += _targets(med, live, cand, base)
    tls = med.get("regproxy (TLS)")
    if rp is not None and tls is not None and "regproxy (TLS)" in live:
        lines += ["", "regproxy TLS listener / plain TCP: " + ", ".join(
            f"{label.split(' (')[0]} {_ratio(tls.get(f'{t}.{k}'), rp.get(f'{t}.{k}'))}"
            for label, t, k, _, better in ROWS if better is not None) + "."]
    errors = [(p, k, v) for p in live for k, v in med[p].items()
              if k.endswith(".error") or (k == "check.problems" and v)]
    if errors:
        lines += ["", "Problems seen:", ""]
        lines += [f"- {p} {k.split('.')[0]}: {v}" for p, k, v in errors]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], outdir: Path, readme: Path | None) -> Path:
    """JSON + Markdown into outdir; the table also replaces README's results block."""
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = result["started"].replace(":", "").replace("-", "")
    md = markdown(result)
    (outdir / f"{stamp}.json").write_text(json.dumps(result, indent=2, default=str))
    (outdir / f"{stamp}.md").write_text(md)
    (outdir / "latest.md").write_text(md)
    if readme is not None and readme.exists():
        text = readme.read_text()
        start, end = "<!-- results:start -->", "<!-- results:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            readme.write_text(head + start + "\n" + md + end + rest.split(end, 1)[1])
    return outdir / f"{stamp}.md"
