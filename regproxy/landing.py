"""The landing page (C{GET /}): what this proxy serves, and how to point each client at it.

Self-contained HTML: inline CSS only (no fonts, images or styles from
elsewhere: the proxy may have no internet), no JavaScript, light and dark by
C{prefers-color-scheme}, readable on a phone. Every snippet is built from this
proxy's own URL as the reader reached it (C{base}), and everything that comes
from the configuration or the request is HTML-escaped.

The page has, in order: a header with the proxy's URL and the registries it
serves; the live figures (cache hit ratio, cache size against its limit, bytes
served, requests in flight, the rate-limit budget of each upstream credential);
one section per registry with copy-paste configuration for docker, containerd
(both C{hosts.toml} variants) and podman/CRI-O/skopeo; the containerd setting
Kubernetes nodes need; and every registry's files at once.

C{figures} is C{RegistryProxy.figures()}; a C{bytes_served} key (bytes sent to
clients) is shown when present, "—" until then. Reached by a registry's own
host name (which selects it whatever the path), that registry's snippets drop
the path prefix and the others name the proxy C{PROXY}, with a notice.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from html import escape

from .config import DOCKER_HUB, DOCKER_HUB_URL, UpstreamConfig

_PALETTE = """
:root{color-scheme:light dark;--bg:#f6f7f9;--card:#fff;--fg:#1b2129;--muted:#5c6673;--line:#e2e5ea;
--code:#f2f4f7;--code-fg:#1b2129;--accent:#1f6feb;--accent-soft:#e8f0fe;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;
--comment:#6e7781;--var:#8250df;--bar:#dde3ea}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--card:#151b23;--fg:#e6edf3;--muted:#9198a1;--line:#2a313c;
--code:#0b0f14;--code-fg:#dfe6ee;--accent:#4493f8;--accent-soft:#142540;--ok:#3fb950;--warn:#d29922;--bad:#f85149;
--comment:#8b949e;--var:#c297ff;--bar:#2a313c}}
"""

_LAYOUT = """
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);
font:16px/1.6 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Helvetica Neue",Arial,sans-serif}
.wrap{max-width:60rem;margin:0 auto;padding:0 1.25rem}
a{color:var(--accent);text-decoration-thickness:1px;text-underline-offset:2px}
code,pre,kbd{font-family:ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,"DejaVu Sans Mono",monospace}
:not(pre)>code{font-size:.9em;background:var(--code);border:1px solid var(--line);border-radius:4px;
padding:.05em .3em;overflow-wrap:anywhere}
h1,h2,h3{line-height:1.25;margin:0}
p{margin:.5rem 0}
.muted{color:var(--muted)}
header.top{background:var(--card);border-top:4px solid var(--accent);border-bottom:1px solid var(--line);padding:1.9rem 0 1.6rem}
.brand{display:flex;align-items:center;gap:.6rem;color:var(--accent)}
.brand h1{font-size:1.1rem;letter-spacing:.02em;color:var(--fg)}
.brand h1 span{color:var(--muted);font-weight:400}
.url{font-size:clamp(1.1rem,4.8vw,2.25rem);font-weight:650;margin:.9rem 0 .3rem;overflow-wrap:anywhere;
font-family:ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,"DejaVu Sans Mono",monospace;letter-spacing:-.01em}
.lead{color:var(--muted);max-width:46rem;margin:0}
.notice{max-width:46rem;margin:.9rem 0 0;padding:.6rem .85rem;border:1px solid var(--warn);border-radius:8px;font-size:.95rem}
nav.served{display:flex;flex-wrap:wrap;gap:.5rem;margin-top:1.1rem;padding:0;list-style:none}
nav.served a{display:inline-flex;align-items:center;gap:.4rem;text-decoration:none;color:var(--fg);
border:1px solid var(--line);background:var(--bg);border-radius:999px;padding:.2rem .75rem;font-size:.92rem}
nav.served a:hover,nav.served a:focus-visible{border-color:var(--accent);color:var(--accent)}
nav.served code{background:none;border:0;padding:0;font-size:inherit}
main.wrap{padding-top:2.25rem;padding-bottom:2rem}
section{margin:0 0 1.5rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:1.25rem 1.4rem}
h2{font-size:1.3rem;margin-bottom:.35rem;display:flex;flex-wrap:wrap;align-items:center;gap:.5rem}
h2 code{font-size:1.2rem;background:none;border:0;padding:0}
h3{font-size:.8rem;text-transform:uppercase;letter-spacing:.08em;color:var(--muted);margin:1.4rem 0 .5rem;
padding-top:1rem;border-top:1px solid var(--line)}
.badge{font-size:.75rem;font-weight:600;line-height:1.5;border-radius:999px;padding:.05rem .55rem;
background:var(--accent-soft);color:var(--accent);white-space:nowrap}
.badge.warn{background:transparent;border:1px solid var(--warn);color:var(--warn)}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;margin:.6rem 0 0;font-size:.95rem}
dl.facts dt{color:var(--muted)}dl.facts dd{margin:0;overflow-wrap:anywhere}
figure.snippet{margin:.6rem 0 .9rem;border:1px solid var(--line);border-radius:8px;overflow:hidden;background:var(--code)}
figure.snippet figcaption{display:flex;flex-wrap:wrap;justify-content:space-between;gap:.2rem 1rem;
padding:.35rem .8rem;font-size:.82rem;color:var(--muted);border-bottom:1px solid var(--line);background:var(--card)}
figure.snippet figcaption code{background:none;border:0;padding:0;color:var(--fg);font-weight:600}
pre{margin:0;padding:.8rem .95rem;overflow-x:auto;font-size:.86rem;line-height:1.55;color:var(--code-fg);
tab-size:2;-webkit-user-select:all;user-select:all}
pre .c{color:var(--comment);font-style:italic}
pre var{color:var(--var);font-style:normal}
.note{font-size:.92rem;color:var(--muted);margin:.4rem 0 .2rem}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,9.5rem),1fr));gap:.9rem}
.stat{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:1rem 1.1rem}
.stat .label{font-size:.8rem;text-transform:uppercase;letter-spacing:.08em;color:var(--muted)}
.stat .value{font-size:1.9rem;font-weight:650;line-height:1.2;margin:.25rem 0;font-variant-numeric:tabular-nums}
.stat .sub{font-size:.88rem;color:var(--muted)}
.bar{height:.45rem;border-radius:999px;background:var(--bar);overflow:hidden;margin:.5rem 0 .35rem}
.bar i{display:block;height:100%;background:var(--accent);border-radius:inherit}
.bar.ok i{background:var(--ok)}.bar.warn i{background:var(--warn)}.bar.bad i{background:var(--bad)}
table{width:100%;border-collapse:collapse;font-size:.95rem;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:.45rem .6rem .45rem 0;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:.8rem;text-transform:uppercase;letter-spacing:.06em;color:var(--muted);font-weight:600}
td.num{white-space:nowrap}
td .bar{margin:.35rem 0 0;max-width:14rem}
details{margin:.6rem 0}
summary{cursor:pointer;font-weight:600}
summary::marker{color:var(--muted)}
details[open]>summary{margin-bottom:.4rem}
dl.counts{display:grid;grid-template-columns:repeat(auto-fill,minmax(13rem,1fr));gap:.1rem 1.2rem;margin:.4rem 0 0;
font-size:.9rem}
dl.counts div{display:flex;justify-content:space-between;border-bottom:1px dotted var(--line);padding:.15rem 0}
dl.counts dt{color:var(--muted)}dl.counts dd{margin:0;font-variant-numeric:tabular-nums}
.section-title{font-size:1.15rem;margin:0 0 .8rem}section+.section-title{margin-top:2.25rem}
.figures .card{margin-top:.9rem}
.figures .card h3{margin-top:0;padding-top:0;border:0}
details.client{border:1px solid var(--line);border-radius:8px;margin:.6rem 0;background:var(--bg)}
details.client>summary{list-style:none;display:flex;flex-wrap:wrap;align-items:center;gap:.2rem .8rem;
padding:.6rem .9rem;border-radius:8px}
details.client>summary::-webkit-details-marker{display:none}
details.client>summary::before{content:"";width:.42rem;height:.42rem;border:solid var(--muted);border-width:0 2px 2px 0;
transform:rotate(-45deg);margin:0 .15rem 0 .1rem;transition:transform .15s}
details.client[open]>summary::before{transform:rotate(45deg)}
details.client>summary:hover{background:var(--card)}
details.client>summary:hover .client-name{color:var(--accent)}
summary:focus-visible{outline:2px solid var(--accent);outline-offset:2px}
.client-name{font-weight:600}
summary .path{font-size:.82rem;color:var(--muted);background:none;border:0;padding:0;margin-left:auto}
.fold{padding:0 .9rem .5rem}
.who{font-size:.85rem;color:var(--muted);margin-top:.1rem}
footer{border-top:1px solid var(--line);color:var(--muted);font-size:.9rem;padding:1.2rem 0 2.5rem}
footer a{color:inherit}
@media (max-width:40rem){.wrap{padding:0 .85rem}.card{padding:1rem .95rem;border-radius:10px}
header.top{padding:1.4rem 0 1.1rem}pre{font-size:.8rem}.stat{padding:.85rem .9rem}.stat .value{font-size:1.5rem}summary .path{margin-left:0}
dl.facts{grid-template-columns:1fr}dl.facts dd{margin-bottom:.35rem}}
@media (prefers-reduced-motion:reduce){*{transition:none!important}}
@media print{pre{white-space:pre-wrap}.bar{border:1px solid #999}}
"""

_STYLE = (_PALETTE + _LAYOUT).replace("\n", "")

#: The page may load nothing and run nothing, whatever ends up in it.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

_LOGO = (
    "<svg width='30' height='30' viewBox='0 0 32 32' aria-hidden='true' focusable='false'>"
    "<rect x='3' y='17' width='12' height='12' rx='2.5' fill='currentColor'/>"
    "<rect x='17' y='17' width='12' height='12' rx='2.5' fill='currentColor' opacity='.55'/>"
    "<rect x='10' y='3' width='12' height='12' rx='2.5' fill='currentColor' opacity='.8'/>"
    "</svg>"
)

#: Real, small images for the well-known registries (pasteable as they are).
_EXAMPLES = {
    DOCKER_HUB: "library/alpine:latest",
    "registry.k8s.io": "pause:3.10",
    "quay.io": "prometheus/prometheus:latest",
    "gcr.io": "distroless/static-debian12:latest",
    "mcr.microsoft.com": "dotnet/runtime:8.0",
    "public.ecr.aws": "docker/library/alpine:latest",
}
_PLACEHOLDERS = re.compile(r"OWNER/IMAGE:TAG|IMAGE:TAG|\bPROXY\b")

_CERTS_D = "/etc/containerd/certs.d"
_DROP_IN = "/etc/containers/registries.conf.d/50-regproxy.conf"

_BLOB_LOOKUPS = ("hit", "stored", "collapsed", "passed")
_MANIFEST_LOOKUPS = ("hit", "stored", "stale", "revalidated", "coalesced", "passed")
_COUNT_LABELS = {
    "hit": "blob hits",
    "stored": "blobs fetched and stored",
    "collapsed": "blob requests joining a fill",
    "passed": "blobs passed through uncached",
    "resumed": "fills resumed after a break",
    "manifest_hit": "manifest hits",
    "manifest_revalidated": "manifests revalidated",
    "manifest_stored": "manifests fetched and stored",
    "manifest_stale": "manifests served stale",
    "manifest_coalesced": "manifest requests joining a fetch",
    "manifest_passed": "manifests passed through",
}


# formatting


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _size(n: int) -> str:
    """Bytes in binary units, three significant figures at most (C{1.5 GiB}, C{512 MiB})."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
    return f"{text.removesuffix('.0')} {unit}"


def _percent(part: int, whole: int) -> float:
    return 0.0 if whole <= 0 else max(0.0, min(100.0, 100.0 * part / whole))


def _share(percent: float) -> str:
    """A percentage for people: never "0%" for something, nor "100%" for not quite all."""
    if 0 < percent < 1:
        return "<1%"
    if 99 < percent < 100:
        return ">99%"
    return f"{percent:.0f}%"


def _bar(percent: float, tone: str = "") -> str:
    return f"<div class='bar {tone}' aria-hidden='true'><i style='width:{percent:.1f}%'></i></div>"


def _code_html(text: str) -> str:
    """A snippet's text as HTML: escaped, comment lines and placeholders marked."""
    lines = _e(text).split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#"):
            lines[i] = f"<span class='c'>{line}</span>"
        else:
            lines[i] = _PLACEHOLDERS.sub(r"<var>\g<0></var>", line)
    return "\n".join(lines)


def _snippet(caption: str, text: str, aside: str = "", kind: str = "") -> str:
    """A copyable block: a caption (a file name, escaped here) over the code."""
    label = f"<code>{_e(caption)}</code>" if caption.startswith("/") else _e(caption)
    extra = f"<span>{aside}</span>" if aside else ""
    data = f" data-kind='{_e(kind)}'" if kind else ""
    return f"<figure class='snippet'{data}><figcaption>{label}{extra}</figcaption><pre>{_code_html(text)}</pre></figure>"


# the reader's view of the proxy


class _Base:
    """The proxy's URL as the reader reached it, in the pieces the snippets need."""

    def __init__(self, base: str, selects: str | None = None, placeholder: bool = False) -> None:
        #: The upstream this host name selects by itself (a registry's own host name), if any.
        self.selects = selects
        #: The host is a placeholder (C{PROXY}): the reader's doesn't work for this registry.
        self.placeholder = placeholder
        self.url = base.rstrip("/")
        scheme, sep, rest = self.url.partition("://")
        if not sep:
            scheme, rest = "http", self.url
        self.scheme = scheme
        self.host = rest.split("/", 1)[0]
        hostname, port = self.host, ""
        if not self.host.endswith("]"):
            left, colon, right = self.host.rpartition(":")
            if colon and right.isdigit():
                hostname, port = left, right
        self.hostname = hostname
        self.port = port
        self.plain = scheme == "http"

    def at(self, hostname: str) -> str:
        """Another host name on this proxy's port (a registry's Host name of its own)."""
        return f"{hostname}:{self.port}" if self.port else hostname

    def prefix(self, config: UpstreamConfig) -> str:
        """The path prefix that selects C{config} here: none when this host name already does."""
        return "" if self.selects == config.name else "/" + config.name


def _json_object(members: Mapping[str, object]) -> str:
    """A JSON object one member a line (short arrays stay on their line)."""
    inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in members.items())
    return "{\n" + inner + "\n}"


def _upstream_server(config: UpstreamConfig) -> str:
    return DOCKER_HUB_URL if config.name == DOCKER_HUB else f"https://{config.name}"


def _is_hub(config: UpstreamConfig) -> bool:
    return config.name == DOCKER_HUB or DOCKER_HUB in config.aliases


def _hosts_toml(config: UpstreamConfig, base: _Base, override: bool) -> str:
    lines = [f"server = {_toml(_upstream_server(config))}", ""]
    if override:
        lines += [
            f"[host.{_toml(base.url + '/v2' + base.prefix(config))}]",
            '  capabilities = ["pull", "resolve"]',
            "  override_path = true",
        ]
    else:
        lines += [f"[host.{_toml(base.url)}]", '  capabilities = ["pull", "resolve"]']
    if not base.plain:
        lines.append("  # ca = \"/etc/containerd/certs.d/regproxy-ca.pem\"  # if its certificate isn't public")
    return "\n".join(lines)


def _registries_conf(config: UpstreamConfig, base: _Base) -> str:
    lines = [
        "[[registry]]",
        f"prefix = {_toml(config.name)}",
        f"location = {_toml(config.name)}",
        "",
        "[[registry.mirror]]",
        f"location = {_toml(base.host + base.prefix(config))}",
    ]
    if base.plain:
        lines.append("insecure = true")
    return "\n".join(lines)


# sections


def _docker(config: UpstreamConfig, base: _Base) -> str:
    parts = ["<h3>Docker</h3>"]
    if _is_hub(config):
        if base.selects == config.name or (config.default and not base.placeholder):
            mirror = base.url
        elif config.hosts:
            mirror = f"{base.scheme}://{base.at(config.hosts[0])}"
        elif config.default:
            mirror = base.url
        else:
            mirror = ""
        if mirror:
            daemon: dict[str, list[str]] = {"registry-mirrors": [mirror]}
            if base.plain:
                daemon["insecure-registries"] = [mirror.partition("://")[2]]
            parts.append(
                _snippet(
                    "/etc/docker/daemon.json",
                    _json_object(daemon),
                    "then <kbd>systemctl restart docker</kbd>",
                    "daemon.json",
                )
            )
            parts.append(
                "<p class='note'>Every <code>docker pull</code> of a Docker Hub image then goes through this "
                "proxy first, with no change to image names.</p>"
            )
        else:
            parts.append(
                "<p class='note'>Docker's <code>registry-mirrors</code> needs a URL without a path: make this "
                "registry the default one or give it a host name of its own to use it there.</p>"
            )
    image = _EXAMPLES.get(config.name) or ("IMAGE:TAG" if config.library_prefix else "OWNER/IMAGE:TAG")
    short = image.removeprefix("library/") if config.library_prefix else image
    pulls: list[str] = []
    if base.selects == config.name:
        pulls += [f"# {base.hostname} selects {config.name}: no registry in the name", f"docker pull {base.host}/{short}"]
    else:
        if config.default:
            pulls += [f"# names without a registry go to {config.name}", f"docker pull {base.host}/{short}", ""]
        pulls += ["# the registry named in the path", f"docker pull {base.host}/{config.name}/{image}"]
    for hostname in config.hosts:
        if hostname.lower() != base.hostname.lower():
            pulls += ["", f"# by its own host name ({hostname} must resolve to this proxy)"]
            pulls.append(f"docker pull {base.at(hostname)}/{short}")
    parts.append(_snippet("docker pull", "\n".join(pulls), "", "pull"))
    if base.plain:
        names = list(dict.fromkeys([base.host, *(base.at(h.lower()) for h in config.hosts)]))
        listed = ", ".join(f"<code>{_e(json.dumps(n))}</code>" for n in names)
        parts.append(
            "<p class='note'>This proxy speaks plain HTTP: outside loopback, docker pulls from it only when "
            f"<code>insecure-registries</code> in <code>daemon.json</code> lists {listed}.</p>"
        )
    return "".join(parts)


def _fold(client: str, file: str, body: str, kind: str) -> str:
    """A client's configuration, folded under a summary naming the client and its file."""
    return (
        f"<details class='client' data-client='{_e(kind)}'><summary><span class='client-name'>{client}</span>"
        f"<code class='path'>{_e(file)}</code></summary><div class='fold'>{body}</div></details>"
    )


def _containerd(config: UpstreamConfig, base: _Base) -> str:
    path = f"{_CERTS_D}/{config.name}/hosts.toml"
    body = "".join(
        [
            "<p class='note'>containerd appends <code>?ns=" + _e(config.name) + "</code> to every request, "
            "which selects this registry:</p>",
            _snippet(path, _hosts_toml(config, base, override=False), "with <code>?ns=</code>", "hosts-ns"),
            "<p class='note'>Or, with the registry in the path (the same file, other contents):</p>",
            _snippet(path, _hosts_toml(config, base, override=True), "with <code>override_path</code>", "hosts-path"),
            "<p class='note'>Read at every pull, no restart needed. Kubernetes nodes read these files only "
            "once <a href='#kubernetes'>containerd's <code>config_path</code></a> is set.</p>",
        ]
    )
    return _fold("containerd, Kubernetes", path, body, "containerd")


def _containers(config: UpstreamConfig, base: _Base) -> str:
    body = _snippet(
        "/etc/containers/registries.conf",
        _registries_conf(config, base),
        "or a file in <code>registries.conf.d/</code>",
        "registries.conf",
    ) + (
        "<p class='note'>Image names stay as they are (<code>" + _e(config.name) + "/…</code>); "
        "the mirror is tried first, the registry itself if it fails.</p>"
    )
    return _fold("podman, CRI-O, skopeo", "/etc/containers/registries.conf", body, "containers")


def _facts(config: UpstreamConfig, base: _Base) -> str:
    if base.selects == config.name:
        rows = [("This address", f"selects it: <code>{_e(base.host)}/<var>NAME</var></code>")]
    else:
        rows = [("Path prefix", f"<code>{_e(base.host)}/{_e(config.name)}/…</code>")]
    if config.default and base.selects is None:
        rows.append(("Default", "names without a registry, e.g. <code>" + _e(base.host) + "/alpine</code>"))
    if config.aliases:
        rows.append(("Also called", ", ".join(f"<code>{_e(a)}</code>" for a in config.aliases)))
    if config.hosts:
        rows.append(("Host names", ", ".join(f"<code>{_e(base.at(h))}</code>" for h in config.hosts)))
    if config.library_prefix:
        rows.append(("Short names", "<code>alpine</code> means <code>library/alpine</code>"))
    if config.allow:
        rows.append(("Only", ", ".join(f"<code>{_e(a)}</code>" for a in config.allow)))
    if config.deny:
        rows.append(("Never", ", ".join(f"<code>{_e(d)}</code>" for d in config.deny)))
    return "<dl class='facts'>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _anchor(config: UpstreamConfig) -> str:
    return "r-" + config.name


def _registry(config: UpstreamConfig, base: _Base) -> str:
    badges = "<span class='badge'>default</span>" if config.default else ""
    if config.username:
        badges += "<span class='badge'>proxy account</span>"
    return (
        f"<section class='card registry' id='{_e(_anchor(config))}' aria-labelledby='{_e(_anchor(config))}-h'>"
        f"<h2 id='{_e(_anchor(config))}-h'><code>{_e(config.name)}</code>{badges}</h2>"
        f"{_facts(config, base)}{_docker(config, base)}<h3>Other clients</h3>{_containerd(config, base)}{_containers(config, base)}"
        "</section>"
    )


def _kubernetes() -> str:
    config = (
        "# containerd 1.x (config version 2)\n"
        '[plugins."io.containerd.grpc.v1.cri".registry]\n'
        f"  config_path = {_toml(_CERTS_D)}\n\n"
        "# containerd 2.x (config version 3)\n"
        '[plugins."io.containerd.cri.v1.images".registry]\n'
        f"  config_path = {_toml(_CERTS_D)}"
    )
    return (
        "<section class='card' id='kubernetes' aria-labelledby='kubernetes-h'>"
        "<h2 id='kubernetes-h'>Kubernetes nodes</h2>"
        "<p>The kubelet pulls through containerd's CRI plugin, which reads the <code>hosts.toml</code> files "
        f"above only when its registry <code>config_path</code> points at <code>{_CERTS_D}</code>. "
        "Set it once per node (a node image or a DaemonSet), restart containerd, then put the files in place:</p>"
        + _snippet("/etc/containerd/config.toml", config, "then <kbd>systemctl restart containerd</kbd>", "config_path")
        + "<p class='note'>Check a node with <code>crictl pull docker.io/library/alpine:latest</code>; the image "
        "names in your pod specs stay as they are.</p></section>"
    )


def _everything(configs: Sequence[UpstreamConfig], bases: Mapping[str, _Base]) -> str:
    script = []
    for config in configs:
        directory = shlex.quote(f"{_CERTS_D}/{config.name}")
        script += [
            f"mkdir -p {directory}",
            f"cat > {directory}/hosts.toml <<'EOF'",
            _hosts_toml(config, bases[config.name], override=False),
            "EOF",
            "",
        ]
    conf = "\n\n".join(_registries_conf(c, bases[c.name]) for c in configs)
    return (
        "<section class='card' id='everything' aria-labelledby='everything-h'>"
        "<h2 id='everything-h'>Every registry at once</h2>"
        f"<p>The same files for all {len(configs)} registries in one go, for a node or an image build.</p>"
        + _fold(
            "containerd, Kubernetes",
            f"{_CERTS_D}/*/hosts.toml",
            _snippet("a shell script, as root", "\n".join(script).rstrip(), "", "all-hosts"),
            "all-containerd",
        )
        + _fold(
            "podman, CRI-O, skopeo",
            _DROP_IN,
            _snippet(_DROP_IN, conf, "", "all-registries"),
            "all-containers",
        )
        + "</section>"
    )


# figures


def _hit_ratio(counts: Mapping[str, object]) -> str:
    def get(key: str) -> int:
        return _int(counts.get(key)) or 0

    blob_hits = get("hit")
    blob_lookups = sum(get(k) for k in _BLOB_LOOKUPS)
    manifest_hits = get("manifest_hit") + get("manifest_revalidated")
    manifest_lookups = sum(get("manifest_" + k) for k in _MANIFEST_LOOKUPS)
    hits, lookups = blob_hits + manifest_hits, blob_lookups + manifest_lookups
    if lookups == 0:
        value, sub, bar = "—", "no lookups yet", _bar(0)
    else:
        percent = _percent(hits, lookups)
        value = _share(percent)
        sub = f"{hits:,} of {lookups:,} lookups"
        bar = _bar(percent, "ok")
    detail = f"blobs {blob_hits:,}/{blob_lookups:,} · manifests {manifest_hits:,}/{manifest_lookups:,}"
    return _stat("Hit ratio", value, f"{sub}<br>{detail}", bar, "hit-ratio")


def _stat(label: str, value: str, sub: str, extra: str = "", key: str = "") -> str:
    return (
        f"<div class='stat' data-figure='{_e(key)}'><div class='label'>{label}</div>"
        f"<div class='value'>{value}</div>{extra}<div class='sub'>{sub}</div></div>"
    )


def _cache_stat(size: int | None, limit: int | None) -> str:
    if size is None:
        return _stat("Cache", "—", "size unknown", "", "cache-size")
    if limit:
        percent = _percent(size, limit)
        tone = "bad" if percent >= 95 else "warn" if percent >= 80 else ""
        return _stat(
            "Cache", _size(size), f"of {_size(limit)} ({_share(percent)} full)", _bar(percent, tone), "cache-size"
        )
    return _stat("Cache", _size(size), "no size limit: as much as the disk takes", "", "cache-size")


def _credential(who: str) -> str:
    """C{proxy:anonymous} or C{proxy:USER}, the budgets' names for the proxy's own credentials, in words."""
    kind, _, user = who.partition(":")
    if kind == "proxy" and user == "anonymous":
        return "anonymous (the proxy's address)"
    if kind == "proxy" and user:
        return f"account <code>{_e(user)}</code>"
    return f"<code>{_e(who)}</code>"


def _budgets(budgets: object) -> str:
    rows = []
    if isinstance(budgets, Mapping):
        for key, value in sorted(budgets.items(), key=lambda item: str(item[0])):
            upstream, sep, who = str(key).rpartition(" (")
            if not sep:
                upstream, who = str(key), ""
            who = who.removesuffix(")")
            remaining = limit = None
            if isinstance(value, Sequence) and len(value) == 2:
                remaining, limit = _int(value[0]), _int(value[1])
            if remaining is not None and limit:
                percent = _percent(remaining, limit)
                tone = "bad" if percent <= 10 else "warn" if percent <= 25 else "ok"
                figure = f"<b>{remaining:,}</b> of {limit:,}{_bar(percent, tone)}"
            elif remaining is not None:
                figure = f"<b>{remaining:,}</b>"
            elif limit:
                figure = f"— of {limit:,}"
            else:
                figure = "—"
            rows.append(
                f"<tr><td><code>{_e(upstream)}</code><div class='who'>{_credential(who)}</div></td>"
                f"<td class='num'>{figure}</td></tr>"
            )
    if not rows:
        body = (
            "<p class='muted'>No upstream has sent rate-limit figures for the proxy's own credentials yet "
            "(Docker Hub does, with every manifest).</p>"
        )
    else:
        body = (
            "<table><thead><tr><th>Registry, credential</th><th>Pulls left</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    return f"<div class='card' data-figure='budgets'><h3>Rate-limit budgets</h3>{body}</div>"


def _counters(counts: Mapping[str, object]) -> str:
    items = []
    for key, label in _COUNT_LABELS.items():
        value = _int(counts.get(key))
        if value is not None:
            items.append(f"<div><dt>{_e(label)}</dt><dd>{value:,}</dd></div>")
    if not items:
        return ""
    return (
        "<details class='client' data-figure='counters'><summary><span class='client-name'>Every counter</span>"
        f"<span class='path'>since this process started</span></summary><div class='fold'><dl class='counts'>{''.join(items)}</dl></div></details>"
    )


def _figures(figures: Mapping[str, object]) -> str:
    active = _int(figures.get("active"))
    draining = bool(figures.get("draining"))
    state = "<span class='badge warn'>draining</span>" if draining else ""
    served = _int(figures.get("bytes_served"))
    served_stat = _stat(
        "Bytes served",
        _size(served) if served is not None else "—",
        "to clients, since start" if served is not None else "not reported by this version",
        "",
        "bytes-served",
    )
    active_stat = _stat(
        "In flight",
        f"{active:,}" if active is not None else "—",
        "requests being answered, this page included" + (" · draining: new connections refused" if draining else ""),
        "",
        "active",
    )
    counts = figures.get("cache")
    if isinstance(counts, Mapping):
        stats = [
            _hit_ratio(counts),
            _cache_stat(_int(figures.get("cache_size")), _int(figures.get("cache_limit"))),
            served_stat,
            active_stat,
        ]
        after = _counters(counts)
    else:
        stats = [
            _stat("Cache", "off", "start with <code>--cache-dir</code> to cache layers", "", "cache-size"),
            served_stat,
            active_stat,
        ]
        after = ""
    return (
        "<section class='figures' id='figures' aria-labelledby='figures-h'>"
        f"<h2 id='figures-h' class='section-title'>Right now {state}</h2>"
        f"<div class='grid'>{''.join(stats)}</div>{_budgets(figures.get('budgets'))}{after}</section>"
    )


# the page


def render(configs: Sequence[UpstreamConfig], base: str, figures: Mapping[str, object] | None = None) -> bytes:
    """The page for a reader who reached the proxy at C{base}."""
    view = _Base(base)
    ordered = sorted(configs, key=lambda c: not c.default)  # the default first, then the file's order
    hostname = view.hostname.lower()
    selected = next((c for c in ordered if hostname in (h.lower() for h in c.hosts)), None)
    general, notice = view, ""
    if selected is not None:
        # Every request to this host name goes to one registry, whatever its path says: its
        # snippets lose the prefix; the others' can't use this name at all.
        view = _Base(base, selects=selected.name)
        general = _Base(f"{view.scheme}://{view.at('PROXY')}", placeholder=True)
        notice = (
            f"<p class='notice'><strong>{_e(view.host)} is the host name of "
            f"<a href='#{_e(_anchor(selected))}'><code>{_e(selected.name)}</code></a></strong>: every request "
            "to it goes there, whatever the path says. The other registries' snippets name the proxy "
            "<code><var>PROXY</var></code>: put its general address there, or open this page at that address.</p>"
        )
    bases = {c.name: view if selected is None or c is selected else general for c in ordered}
    chips = "".join(
        f"<a href='#{_e(_anchor(c))}'><code>{_e(c.name)}</code>"
        + ("<span class='badge'>default</span>" if c.default else "")
        + "</a>"
        for c in ordered
    )
    count = len(ordered)
    default = next((c for c in ordered if c.default), None)
    routing = (
        f"Names without a registry go to <code>{_e(default.name)}</code>; " if default else "There is no default registry: "
    )
    page = "".join(
        [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width,initial-scale=1'>",
            f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">",
            "<meta name='color-scheme' content='light dark'><meta name='referrer' content='no-referrer'>",
            "<link rel='icon' href='data:,'>",
            f"<title>regproxy · {_e(view.host)}</title><style>{_STYLE}</style></head><body>",
            "<header class='top'><div class='wrap'>",
            f"<div class='brand'>{_LOGO}<h1>regproxy <span>· registry mirror</span></h1></div>",
            f"<p class='url'>{_e(view.url)}</p>",
            f"<p class='lead'>A pull-through mirror for {count} registr{'y' if count == 1 else 'ies'}. "
            f"{routing}name any other in the path (<code>{_e(general.host)}/<var>REGISTRY</var>/<var>NAME</var></code>), "
            "with containerd's <code>?ns=</code>, or by a host name of its own. "
            "Click a code block to select all of it.</p>",
            notice,
            f"<nav class='served' aria-label='Registries served'>{chips}</nav>",
            "</div></header><main class='wrap'>",
            _figures(figures or {}),
            "<h2 class='section-title'>Registries</h2>",
            *(_registry(c, bases[c.name]) for c in ordered),
            _kubernetes(),
            _everything(ordered, bases),
            "</main><footer><div class='wrap'>",
            "<a href='/healthz'>/healthz</a> · <a href='/readyz'>/readyz</a> · ",
            "regproxy, a Docker/OCI registry mirror. Unknown registries are refused: this list is all it serves.",
            "</div></footer></body></html>\n",
        ]
    )
    return page.encode("utf-8")
