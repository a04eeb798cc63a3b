"""Turn raw samples into medians, tables per issue, the targets table, Markdown and JSON.

Nothing here judges a run as passed or failed: the targets table only says how
regproxy's figures compare to what the issues ask for, against references
measured in the same run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str, bool | None]  # label, test, key, format, higher_is_better (None: no ratio)


def _wrk_rows(test: str, title: str) -> list[Row]:
    """The rows of one wrk measurement (manifest by tag or by digest)."""
    return [
        (f"{title}, wrk (req/s)", test, "rps", "{:.0f}", True),
        ("  p50 (ms)", test, "p50_ms", "{:.2f}", False),
        ("  p99 (ms)", test, "p99_ms", "{:.2f}", False),
        ("  server CPU per request (ms)", test, "server_cpu_ms_per_req", "{:.3f}", False),
        ("  non-2xx responses / socket errors", test, "errors", "{}", None),
        ("  upstream manifest HEAD / GET per 1,000 requests", test, "up_per_1000", "{}", None),
    ]


def rows(parallel: list[int]) -> dict[str, list[Row]]:
    """Row groups by measurement."""
    par: list[Row] = []
    for n in parallel:
        par += [
            (f"{n} clients of one blob (medium), aggregate (MB/s)", f"par{n}", "mbps", "{:.0f}", True),
            (f"  upstream bytes per blob, {n} clients (x blob)", f"par{n}", "upstream_x", "{:.2f}", None),
            (f"  peak RSS growth, {n} clients (MiB)", f"par{n}", "peak_rss_growth_mib", "{:.1f}", None),
            (f"  server CPU during {n} clients (% of all cores)", f"par{n}", "server_cpu_pct", "{:.0f}", None),
            (f"  client (curl) CPU during {n} clients (% of all cores)", f"par{n}", "client_cpu_pct",
             "{:.0f}", None),
        ]
    return {
        "single": [
            ("single stream, big blob (MB/s)", "single", "mbps", "{:.0f}", True),
            ("server CPU per GiB, single stream (s)", "single", "cpu_s_per_gib", "{:.2f}", False),
            ("  server minor page faults per GiB (thousands)", "single", "kminflt_per_gib", "{:.1f}", None),
            ("upstream bytes per big-blob fetch (x blob)", "single", "upstream_x", "{:.2f}", None),
        ],
        "par": par,
        "wrk": _wrk_rows("wrk", "manifest by tag"),
        "wrk-digest": _wrk_rows("wrk-digest", "manifest by digest"),
        "tags": [
            ("upstream manifest HEAD per 1,000 tag pulls", "tags", "up_head_per_1000", "{:.0f}", None),
            ("upstream manifest GET per 1,000 tag pulls", "tags", "up_get_per_1000", "{:.0f}", None),
            ("  Cache-Status of the pulls", "tags", "cache_status", "{}", None),
        ],
        "pull": [
            ("cold pull, wall time (s)", "pull", "seconds", "{:.2f}", False),
            ("  manifest by tag answered after (ms)", "pull", "manifest_ms", "{:.0f}", False),
            ("  Cache-Status of the blob GETs", "pull", "cache_status", "{}", None),
            ("the same pull again, wall time (s)", "pull", "warm_seconds", "{:.2f}", False),
            ("  Cache-Status of its blob GETs", "pull", "warm_cache_status", "{}", None),
            ("upstream blob bytes, both pulls (x image)", "pull", "upstream_x", "{:.2f}", None),
        ],
        "docker": [
            ("real `docker pull`, cold (s)", "docker", "seconds", "{:.2f}", False),
            ("real `docker pull`, again (s)", "docker", "warm_seconds", "{:.2f}", False),
            ("  upstream blob bytes, both pulls (x image)", "docker", "upstream_x", "{:.2f}", None),
        ],
        "rss": [("peak RSS growth, rate-limited client (MiB)", "rss", "peak_growth_mib", "{:.1f}", None)],
        "check": [
            ("range requests correct", "check", "ranges", "{}", None),
            ("sha256 of bodies = digest", "check", "digests_ok", "{}", None),
        ],
    }


#: One table per issue: (title, peers (display names), row groups).
SECTIONS: list[tuple[str, list[str], list[str]]] = [
    ('Streaming (issue "Streaming at wire speed")',
     ["direct", "nginx", "nginx (64k)", "twisted naive", "regproxy", "regproxy (TLS)",
      "regproxy (2 workers)", "regproxy (TLS upstream)"],
     ["single", "par", "wrk", "rss", "check"]),
    ('Blob cache (issue "pull-through blob cache")',
     ["nginx (static file)", "distribution (cold)", "distribution (warm)", "regproxy (cache, warm)",
      "regproxy (cache, warm, TLS)", "regproxy (cache, cold)"],
     ["single", "par", "rss", "check"]),
    ('Manifests and tags (issue "Manifests and tags from the cache")',
     ["direct", "nginx", "twisted naive", "distribution (warm)", "regproxy", "regproxy (cache, warm)",
      "regproxy (cache, fresh 1h)"],
     ["wrk", "wrk-digest", "tags"]),
    ("Cold docker-pull-like fetch, upstream 50 ms away",
     ["direct (50 ms away)", "regproxy pass-through (50 ms)", "regproxy --prefetch 0 (50 ms)",
      "regproxy --prefetch 4 (50 ms)"],
     ["pull", "docker"]),
]

NG, NG64, STATIC, NAIVE = "nginx", "nginx (64k)", "nginx (static file)", "twisted naive"
RP, RPT, RP2, RPU = "regproxy", "regproxy (TLS)", "regproxy (2 workers)", "regproxy (TLS upstream)"
WARM, WARMT, COLD, FRESH = ("regproxy (cache, warm)", "regproxy (cache, warm, TLS)",
                            "regproxy (cache, cold)", "regproxy (cache, fresh 1h)")
DW, DC = "distribution (warm)", "distribution (cold)"

# (issue, target label, candidate, metric "test.key", reference peer or None, factor, kind)
# kind: ">=" / "<=" relative to factor x reference (or to factor itself when reference is None).
Target = tuple[str, str, str, str, str | None, float, str]


def targets(parallel: list[int]) -> list[Target]:
    cold = [n for n in parallel if n in (16, 64)] or parallel
    big = max(parallel) if parallel else 64
    t: list[Target] = [
        ("blob cache", "warm blob, single stream >= 1.0x nginx static", WARM, "single.mbps", STATIC, 1.0, ">="),
        ("blob cache", "warm blob, single stream >= 1.0x distribution warm", WARM, "single.mbps", DW, 1.0, ">="),
        ("blob cache", "warm blob, CPU per GiB <= 1.5x nginx static", WARM, "single.cpu_s_per_gib", STATIC,
         1.5, "<="),
    ]
    for n in cold:
        t += [
            ("blob cache", f"cold blob, {n} clients: upstream bytes per blob = 1.0 (distribution cold for "
             "reference)", COLD, f"par{n}.upstream_x", None, 1.0, "<="),
            ("blob cache", f"cold blob, {n} clients: aggregate >= 1.0x distribution cold", COLD,
             f"par{n}.mbps", DC, 1.0, ">="),
        ]
    t += [
        ("blob cache", f"cold blob, {big} clients: RSS growth <= 64 MiB", COLD,
         f"par{big}.peak_rss_growth_mib", None, 64.0, "<="),
        ("manifests", "cached manifest by digest: req/s >= 2x nginx pass-through", WARM, "wrk-digest.rps", NG,
         2.0, ">="),
        ("manifests", "cached manifest by digest: p99 <= nginx pass-through", WARM, "wrk-digest.p99_ms", NG,
         1.0, "<="),
        ("manifests", "tag, HEAD revalidation (default rules): req/s >= 1.0x nginx pass-through", WARM,
         "wrk.rps", NG, 1.0, ">="),
        ("manifests", "1,000 tag pulls of an unchanged image: upstream HEADs <= 1,000", WARM,
         "tags.up_head_per_1000", None, 1000.0, "<="),
        ("manifests", "1,000 tag pulls of an unchanged image: upstream GETs = 0", WARM,
         "tags.up_get_per_1000", None, 0.0, "<="),
        ("manifests", "1,000 tag pulls, fresh window configured: upstream requests ~0 (<= 1)", FRESH,
         "tags.up_manifest_per_1000", None, 1.0, "<="),
        ("streaming", "plain TCP 1 GiB single stream: CPU per GiB <= 1.0x naive", RP, "single.cpu_s_per_gib",
         NAIVE, 1.0, "<="),
        ("streaming", "plain TCP 1 GiB single stream: CPU per GiB <= 2x nginx", RP, "single.cpu_s_per_gib",
         NG, 2.0, "<="),
        ("streaming", "  the same against nginx (64k)", RP, "single.cpu_s_per_gib", NG64, 2.0, "<="),
        ("streaming", "plain TCP 1 GiB single stream: MB/s >= 0.9x nginx", RP, "single.mbps", NG, 0.9, ">="),
        ("streaming", "  the same against nginx (64k)", RP, "single.mbps", NG64, 0.9, ">="),
        ("streaming", f"{big} parallel downloads: aggregate >= 1.0x nginx", RP, f"par{big}.mbps", NG, 1.0, ">="),
        ("streaming", "  the same against nginx (64k)", RP, f"par{big}.mbps", NG64, 1.0, ">="),
        ("streaming", f"{big} parallel downloads, --workers 2: aggregate >= 1.0x nginx", RP2, f"par{big}.mbps",
         NG, 1.0, ">="),
        ("streaming", "  the same against nginx (64k)", RP2, f"par{big}.mbps", NG64, 1.0, ">="),
        ("streaming", "own TLS listener: single stream >= 0.8x plain TCP", RPT, "single.mbps", RP, 0.8, ">="),
        ("streaming", "own TLS listener: CPU per GiB <= 1.5x plain TCP", RPT, "single.cpu_s_per_gib", RP,
         1.5, "<="),
        ("streaming", "TLS upstream: CPU per GiB <= 1.5x plain upstream", RPU, "single.cpu_s_per_gib", RP,
         1.5, "<="),
        ("streaming", "manifest pass-through: proxy CPU per request <= 0.3 ms", RP, "wrk.server_cpu_ms_per_req",
         None, 0.3, "<="),
        ("streaming", "manifest pass-through: req/s >= 1.0x naive", RP, "wrk.rps", NAIVE, 1.0, ">="),
        ("streaming", "slow client: RSS growth <= 16 MiB", RP, "rss.peak_growth_mib", None, 16.0, "<="),
    ]
    return t


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3f}"


def target_lines(med: dict[str, dict[str, Any]], parallel: list[int]) -> list[str]:
    lines = ["| issue | target | candidate | measured | reference | reference value | ratio | met |",
             "|---|---|---|---|---|---|---|---|"]
    for issue, label, cand, metric, ref, factor, kind in targets(parallel):
        if cand not in med:
            continue  # not in this run (a --peers subset)
        a = _num(med.get(cand, {}).get(metric))
        if a is None:
            lines.append(f"| {issue} | {label} | {cand} | — | {ref or '—'} | — | — | not measured |")
            continue
        if ref is None:
            # The cold-blob upstream rows show distribution (cold) for reference.
            shown = "distribution (cold)" if metric.endswith("upstream_x") else "—"
            b = _num(med.get(shown, {}).get(metric)) if shown != "—" else None
            met = a <= factor + 0.005 if kind == "<=" else a >= factor
            lines.append(f"| {issue} | {label} | {cand} | {_fmt(a)} | {shown} | "
                         f"{_fmt(b) if b is not None else '—'} | — | {'met' if met else '**missed**'} |")
            continue
        b = _num(med.get(ref, {}).get(metric))
        if b is None or not b:
            lines.append(f"| {issue} | {label} | {cand} | {_fmt(a)} | {ref} | — | — | no reference |")
            continue
        ratio = a / b
        met = ratio >= factor if kind == ">=" else ratio <= factor
        lines.append(f"| {issue} | {label} | {cand} | {_fmt(a)} | {ref} | {_fmt(b)} | {ratio:.2f} | "
                     f"{'met' if met else '**missed**'} |")
    pp = med.get("regproxy pass-through (50 ms)", {})
    for key, what in (("pull.seconds", "cold pull"), ("pull.warm_seconds", "the same pull again"),
                      ("docker.seconds", "real docker pull, cold"),
                      ("docker.warm_seconds", "real docker pull, again")):
        ref = _num(pp.get(key))
        if not ref:
            continue
        for p in ("regproxy --prefetch 0 (50 ms)", "regproxy --prefetch 4 (50 ms)", "direct (50 ms away)"):
            v = _num(med.get(p, {}).get(key))
            if v is not None:
                lines.append(f"| manifests | {what}, upstream 50 ms away (no target set) | {p} | "
                             f"{_fmt(v)} s | regproxy pass-through (50 ms) | {_fmt(ref)} s | {v / ref:.2f} | "
                             f"informational |")
    return lines


def medians(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """peer -> "test.key" -> median over repetitions (numbers only; other values: the first)."""
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
    if f"{test}.error" in med and f"{test}.{key}" not in med and key not in ("errors", "up_per_1000"):
        return "error"
    if test == "check" and key == "ranges":
        if "check.ranges_ok" not in med:
            return "—"
        return f"{med['check.ranges_ok']:.0f}/{med['check.ranges_total']:.0f}"
    if key == "errors":
        a, b = med.get(f"{test}.non2xx"), med.get(f"{test}.socket_errors")
        return "—" if a is None else f"{a:.0f} / {b or 0:.0f}"
    if key == "up_per_1000":
        a, b = med.get(f"{test}.up_head_per_1000"), med.get(f"{test}.up_get_per_1000")
        return "—" if a is None else f"{a:.0f} / {b:.0f}"
    if key == "kminflt_per_gib":
        v = med.get(f"{test}.minflt_per_gib")
        return "—" if v is None else f"{v / 1000:.1f}"
    v = med.get(f"{test}.{key}")
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return fmt.format(v)


def _ratio(a: Any, b: Any) -> str:
    a, b = _num(a), _num(b)
    if a is None or b is None or not b:
        return "—"
    return f"{a / b:.2f}"


def _table(med: dict[str, dict[str, Any]], peers: list[str], groups: list[str],
           allrows: dict[str, list[Row]], cfg: dict[str, Any]) -> list[str]:
    lines = ["| metric | " + " | ".join(peers) + " |", "|---" * (len(peers) + 1) + "|"]
    for g in groups:
        for label, test, key, fmt, _ in allrows[g]:
            cells = [_cell(med[p], test, key, fmt) for p in peers]
            if all(c == "—" for c in cells):
                continue
            if test == "rss":
                label += f" (client {cfg['rss_rate']}/s, " + (
                    f"cut after {cfg['rss_seconds']:.0f} s)" if cfg["rss_seconds"] else "full blob)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    peers: list[str] = result["peers"]
    med: dict[str, dict[str, Any]] = result["medians"]
    unavailable: dict[str, str] = result["unavailable"]
    live = [p for p in peers if p not in unavailable]
    cfg = result["config"]
    allrows = rows(cfg["parallel"])
    foreign = cfg.get("foreign_cpu_pct_per_rep", [])
    lines = [f"Run {result['started']} on {cfg['cores']} cores, {cfg['reps']} repetitions "
             f"(medians), big blob {cfg['big_mib']} MiB, medium blob {cfg['medium_mib']} MiB"
             f"{', QUICK mode' if cfg['quick'] else ''}; took {result['seconds']:.0f} s. "
             f"MB = 10^6 bytes. nginx proxy_buffer_size: {cfg.get('nginx_buffer')}. "
             f"1-min load average at the start of each repetition: "
             f"{', '.join(f'{x:.1f}' for x in cfg.get('loadavg_1min_per_rep', []))}; "
             f"CPU used by other processes during each repetition: "
             f"{', '.join(f'{x:.0f}%' for x in foreign) or '—'} of all cores. "
             f"regproxy {cfg.get('regproxy_version', '?')}.", ""]
    if cfg.get("pull_layers"):
        lines += [f"Cold pull: an image of {cfg['pull_layers']} layers + config "
                  f"({cfg['pull_mib']:.1f} MiB), upstream {cfg['pull_rtt_ms']:.0f} ms RTT away, "
                  f"{cfg['pull_parallel']} blobs at a time; tag pulls: {cfg['tag_pulls']} sequential "
                  f"GETs.", ""]
    if cfg.get("docker_unavailable"):
        lines += [f"Real `docker pull` row left out: {cfg['docker_unavailable']}", ""]
    for title, section_peers, groups in SECTIONS:
        shown = [p for p in section_peers if p in live and any(
            _cell(med[p], t, k, f) != "—" for g in groups for _, t, k, f, _ in allrows[g])]
        if not shown:
            continue
        lines += [f"**{title}**", ""] + _table(med, shown, groups, allrows, cfg) + [""]
    # ratios for the streaming peers, as before: peer / direct, peer / nginx
    stream = [p for p in SECTIONS[0][1] if p in live]
    if stream and ("nginx" in live or "direct" in live):
        lines += ["Streaming ratios (peer / direct, peer / nginx; for CPU and latency lower is better):", ""]
        lines += ["| metric | " + " | ".join(stream) + " |", "|---" * (len(stream) + 1) + "|"]
        for g in ("single", "par", "wrk"):
            for label, test, key, _, better in allrows[g]:
                if better is None:
                    continue
                k = f"{test}.{key}"
                cells = [f"{_ratio(med[p].get(k), med.get('direct', {}).get(k))} / "
                         f"{_ratio(med[p].get(k), med.get('nginx', {}).get(k))}" for p in stream]
                if all(c == "— / —" for c in cells):
                    continue
                lines.append(f"| {label.strip()} | " + " | ".join(cells) + " |")
        lines.append("")
    for p, why in unavailable.items():
        lines += [f"**{p}: not available** — {why}", ""]
    lines += ["Targets of the three issues (informational, not assertions; every reference measured "
              "in this run):", ""]
    lines += target_lines(med, cfg["parallel"])
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
