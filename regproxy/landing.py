"""The landing page (C{GET /}): what this proxy serves, and how to point each client at it.

Self-contained HTML (no external assets: the proxy may have no internet), no
JavaScript, every snippet built from this proxy's own URL as the reader
reached it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence

from .config import DOCKER_HUB, UpstreamConfig

_STYLE = """
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:52rem;margin:2rem auto;
padding:0 1rem;color:#1d232a;background:#fbfbfa}
h1{font-size:1.8rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin:1.2rem 0 .3rem}
code,pre{font:14px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#f0f1f3;padding:.7rem .9rem;border-radius:6px;overflow-x:auto}
.lead{color:#555;margin-top:0}.tag{font-size:.8rem;background:#e6eefc;color:#1a4fb5;border-radius:4px;padding:0 .4rem}
table{border-collapse:collapse}td,th{text-align:left;padding:.2rem .8rem .2rem 0}
"""


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _upstream_section(config: UpstreamConfig, base: str, host: str, scheme: str) -> str:
    name = config.name
    parts = [f"<h2 id='{html.escape(name)}'>{html.escape(name)}"]
    if config.default:
        parts.append(" <span class='tag'>default</span>")
    parts.append("</h2>")
    example = "library/alpine:latest" if config.library_prefix else "OWNER/IMAGE:TAG"
    short = "alpine:latest" if config.library_prefix else example
    parts.append("<h3>docker</h3>")
    if name == DOCKER_HUB or DOCKER_HUB in config.aliases:
        parts.append("<p><code>/etc/docker/daemon.json</code>, then restart dockerd:</p>")
        parts.append(_pre(json.dumps({"registry-mirrors": [base]}, indent=2)))
    pulls = [f"docker pull {host}/{name}/{example}"]
    if config.default:
        pulls.insert(0, f"docker pull {host}/{short}")
    for alias in config.hosts:
        pulls.append(f"docker pull {alias}/{example}")
    parts.append(_pre("\n".join(pulls)))
    parts.append(f"<h3>containerd</h3><p><code>/etc/containerd/certs.d/{html.escape(name)}/hosts.toml</code>:</p>")
    upstream_server = "https://registry-1.docker.io" if name == DOCKER_HUB else f"https://{name}"
    parts.append(
        _pre(
            f'server = "{upstream_server}"\n\n[host."{base}"]\n  capabilities = ["pull", "resolve"]\n\n'
            f'# or, with the registry in the path:\n# [host."{base}/v2/{name}"]\n'
            f'#   capabilities = ["pull", "resolve"]\n#   override_path = true'
        )
    )
    parts.append("<h3>podman, CRI-O, skopeo</h3><p><code>/etc/containers/registries.conf</code>:</p>")
    parts.append(
        _pre(
            f'[[registry]]\nprefix = "{name}"\nlocation = "{name}"\n\n'
            f'[[registry.mirror]]\nlocation = "{host}/{name}"'
        )
    )
    return "".join(parts)


def render(configs: Sequence[UpstreamConfig], base: str, figures: Mapping[str, object] | None = None) -> bytes:
    """The page for a reader who reached the proxy at C{base}."""
    scheme, _, host = base.partition("://")
    served = "".join(
        f"<tr><td><a href='#{html.escape(c.name)}'><code>{html.escape(c.name)}</code></a></td>"
        f"<td>{'default' if c.default else ''}</td></tr>"
        for c in configs
    )
    sections = "".join(_upstream_section(c, base, host, scheme) for c in configs)
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>regproxy at {html.escape(host)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>regproxy</h1><p class='lead'>A registry mirror at <code>{html.escape(base)}</code>. It serves:</p>"
        f"<table>{served}</table>"
        "<p>Names without a registry go to the default registry; any other registry is named in the path "
        f"(<code>{html.escape(host)}/REGISTRY/NAME</code>), by containerd's <code>?ns=</code>, or by a host name "
        "of its own.</p>"
        f"{sections}"
        "<h2>Health</h2><p><a href='/healthz'>/healthz</a></p>"
        "</body></html>\n"
    )
    return page.encode("utf-8")
