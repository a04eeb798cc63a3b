"""The landing page (``GET /``): plain HTTP checks, then headless Chromium.

One ``twist regproxy --config`` with three upstreams and a cache: ``docker.io``
is the Hub stand-in (the default, so a blob and a manifest pulled twice give the
page real figures), ``ghcr.io`` and ``registry.corp.test`` point at a loopback
port nobody listens on (the page never contacts upstreams). The Chromium tests
load the page with Debian's ``chromium`` (``--dump-dom`` for the rendered DOM,
``--screenshot`` for a picture kept at ``<basetemp>/landing.png``).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from regproxy.config import UpstreamConfig
from regproxy.landing import render
from tests.integration.http import Reply, connect, request
from tests.manyconfig import hub_upstream, write_config
from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Hub

NOWHERE = "http://127.0.0.1:1"
GHCR_HOST = "ghcr.mirror.test"
CORP = "registry.corp.test"
NAMES = ("docker.io", "ghcr.io", CORP)
HOSTILE = "<script>alert(1)</script>"


# a small DOM, for the page as served and as Chromium serialises it


_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        """Every descendant with this tag (any, if None) whose attributes include C{attrs} (C{class_} for class)."""
        want = {k.rstrip("_"): v for k, v in attrs.items()}
        found = []
        for child in self.children:
            if isinstance(child, Node):
                classes = child.attrs.get("class", "").split()
                if (tag is None or child.tag == tag) and all(
                    (v in classes) if k == "class" else child.attrs.get(k) == v for k, v in want.items()
                ):
                    found.append(child)
                found += child.all(tag, **attrs)
        return found

    def one(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}>"
        return found[0]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(page: str) -> Node:
    builder = _Builder()
    builder.feed(page)
    builder.close()
    return builder.root


def snippets(section: Node) -> dict[str, list[str]]:
    """The code blocks of a section by their C{data-kind} (daemon.json, pull, hosts-ns, ...)."""
    out: dict[str, list[str]] = {}
    for figure in section.all("figure", class_="snippet"):
        out.setdefault(figure.attrs.get("data-kind", ""), []).append(figure.one("pre").text())
    return out


def figure_value(doc: Node, key: str) -> str:
    """The big value of one figure card (C{data-figure}: hit-ratio, cache-size, bytes-served, active)."""
    return doc.one("div", **{"data-figure": key}).one("div", class_="value").text().strip()


# the proxy


@pytest.fixture(scope="module")
def landing_proxy(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """regproxy --config with docker.io (the Hub stand-in, default), ghcr.io (also Host ghcr.mirror.test) and registry.corp.test, a 1 GiB cache; a blob and a manifest pulled twice."""
    work = tmp_path_factory.mktemp("landing")
    config = write_config(
        work / "regproxy.toml",
        [
            hub_upstream(hub),
            {"name": "ghcr.io", "url": NOWHERE, "hosts": [GHCR_HOST]},
            {"name": CORP, "url": NOWHERE, "aliases": ["corp.registry.test"]},
        ],
    )
    args = ["--cache-dir", str(work / "cache"), "--cache-max-size", "1G"]
    with ProxyProcess(work, "", args, tls=False, config=config) as proxy:
        reply = request("GET", proxy.url + "/token?scope=repository:library/alpine:pull")
        auth = {"Authorization": "Bearer " + json.loads(reply.body)["token"]}
        image = hub.images["library/alpine:3.19"]
        for _ in range(2):
            got = request("GET", f"{proxy.url}/v2/library/alpine/blobs/{image.layers[0].digest}", auth)
            assert got.status == 200
            got = request(
                "GET", f"{proxy.url}/v2/library/alpine/manifests/{image.digest}", {**auth, "Accept": image.media_type}
            )
            assert got.status == 200
        yield proxy


def landing(proxy: ProxyProcess, host: str | None = None) -> Reply:
    """GET / (a 200), with exactly one Host header: C{host}, or the proxy's address."""
    conn = connect(proxy.url)
    conn.putrequest("GET", "/", skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", proxy.host if host is None else host)
    conn.endheaders()
    response = conn.getresponse()
    reply = Reply(response.status, response.headers, response.read())
    conn.close()
    assert reply.status == 200, reply.body[:500]
    return reply


def registry_section(doc: Node, name: str) -> Node:
    return doc.one("section", id=f"r-{name}")


# plain HTTP


def test_landing_is_a_self_contained_html_page(landing_proxy: ProxyProcess) -> None:
    """GET / is a 200 text/html UTF-8 page with a viewport, light and dark colours and a CSP that loads nothing."""
    reply = landing(landing_proxy)
    assert reply.header("Content-Type") == "text/html; charset=utf-8"
    page = reply.body.decode("utf-8")
    assert page.lower().startswith("<!doctype html>")
    assert "width=device-width" in page and "prefers-color-scheme:dark" in page
    doc = parse(page)
    csp = [m.attrs["content"] for m in doc.all("meta") if m.attrs.get("http-equiv", "").lower() == "content-security-policy"]
    assert csp and "default-src 'none'" in csp[0] and "script-src" not in csp[0]
    assert doc.one("title").text() == f"regproxy · {landing_proxy.host}"


def test_every_upstream_has_a_section_and_a_link(landing_proxy: ProxyProcess) -> None:
    """Each configured upstream has an h2 section (default first) and a link to it in the header."""
    doc = parse(landing(landing_proxy).body.decode())
    headings = [s.one("h2").one("code").text() for s in doc.all("section", class_="registry")]
    assert headings == list(NAMES)
    links = [a.attrs["href"] for a in doc.one("nav").all("a")]
    assert links == [f"#r-{name}" for name in NAMES]
    assert "default" in registry_section(doc, "docker.io").one("h2").text()
    assert "corp.registry.test" in registry_section(doc, CORP).text()
    assert f"{GHCR_HOST}:{landing_proxy.port}" in registry_section(doc, "ghcr.io").text()


def test_snippets_use_the_proxys_own_url(landing_proxy: ProxyProcess) -> None:
    """daemon.json (Docker Hub only), docker pull by prefix and Host, both hosts.toml variants, registries.conf and config_path carry the proxy's URL."""
    url, host = landing_proxy.url, landing_proxy.host
    doc = parse(landing(landing_proxy).body.decode())
    hub = snippets(registry_section(doc, "docker.io"))
    daemon = json.loads(hub["daemon.json"][0])
    assert daemon == {"registry-mirrors": [url], "insecure-registries": [host]}
    assert f"docker pull {host}/alpine:latest" in hub["pull"][0]
    assert f"docker pull {host}/docker.io/library/alpine:latest" in hub["pull"][0]
    assert 'server = "https://registry-1.docker.io"' in hub["hosts-ns"][0]
    for name in NAMES:
        found = snippets(registry_section(doc, name))
        assert ("daemon.json" in found) == (name == "docker.io")
        pull = found["pull"][0]
        assert f"docker pull {host}/{name}/" in pull
        ns, path = found["hosts-ns"][0], found["hosts-path"][0]
        assert f'[host."{url}"]' in ns and "override_path" not in ns
        assert f'[host."{url}/v2/{name}"]' in path and "override_path = true" in path
        assert 'capabilities = ["pull", "resolve"]' in ns and 'capabilities = ["pull", "resolve"]' in path
        conf = found["registries.conf"][0]
        assert f'prefix = "{name}"' in conf and f'location = "{host}/{name}"' in conf and "insecure = true" in conf
    assert f"docker pull {GHCR_HOST}:{landing_proxy.port}/" in snippets(registry_section(doc, "ghcr.io"))["pull"][0]
    assert 'server = "https://ghcr.io"' in snippets(registry_section(doc, "ghcr.io"))["hosts-ns"][0]
    hint = snippets(doc.one("section", id="kubernetes"))["config_path"][0]
    assert '[plugins."io.containerd.grpc.v1.cri".registry]' in hint
    assert 'config_path = "/etc/containerd/certs.d"' in hint
    everything = snippets(doc.one("section", id="everything"))
    assert all(f"/etc/containerd/certs.d/{name}/hosts.toml" in everything["all-hosts"][0] for name in NAMES)
    assert everything["all-registries"][0].count("[[registry]]") == len(NAMES)


def test_snippets_follow_the_host_the_reader_used(landing_proxy: ProxyProcess) -> None:
    """Reached as mirror.example.com:5000, every snippet names that host, none the listening address."""
    page = landing(landing_proxy, "mirror.example.com:5000").body.decode()
    doc = parse(page)
    assert doc.one("p", class_="url").text() == "http://mirror.example.com:5000"
    code = "\n".join(pre.text() for pre in doc.all("pre"))
    assert '[host."http://mirror.example.com:5000"]' in code
    assert "docker pull mirror.example.com:5000/ghcr.io/" in code
    assert landing_proxy.host not in page


def test_a_registrys_own_host_name_gets_snippets_without_prefix(landing_proxy: ProxyProcess) -> None:
    """Reached as ghcr.mirror.test (which selects ghcr.io whatever the path), ghcr.io's snippets drop the prefix and the others name PROXY, never that host."""
    own = f"{GHCR_HOST}:{landing_proxy.port}"
    doc = parse(landing(landing_proxy, own).body.decode())
    assert "host name of ghcr.io" in doc.one("p", class_="notice").text()
    ghcr = snippets(registry_section(doc, "ghcr.io"))
    assert f"docker pull {own}/OWNER/IMAGE:TAG" in ghcr["pull"][0] and f"{own}/ghcr.io" not in ghcr["pull"][0]
    assert f'[host."http://{own}"]' in ghcr["hosts-ns"][0]
    assert f'[host."http://{own}/v2"]' in ghcr["hosts-path"][0]
    assert f'location = "{own}"' in ghcr["registries.conf"][0]
    for name in ("docker.io", CORP):
        text = "\n".join(t for texts in snippets(registry_section(doc, name)).values() for t in texts)
        assert own not in text and f"PROXY:{landing_proxy.port}/{name}" in text, name
    hub = json.loads(snippets(registry_section(doc, "docker.io"))["daemon.json"][0])
    assert hub["registry-mirrors"] == [f"http://PROXY:{landing_proxy.port}"]


def test_no_script_and_no_other_origin(landing_proxy: ProxyProcess) -> None:
    """No <script>, no event handlers, no external stylesheet, font or image: every href/src is on this page or this proxy."""
    page = landing(landing_proxy).body.decode()
    assert "<script" not in page.lower() and "javascript:" not in page.lower()
    assert "@import" not in page and "url(" not in page and "@font-face" not in page
    doc = parse(page)
    assert doc.all("script") == [] and doc.all("img") == [] and doc.all("iframe") == []
    for node in doc.all():
        for name, value in node.attrs.items():
            assert not name.startswith("on"), (node.tag, name)
            if name in ("href", "src", "action", "srcset", "poster", "data", "xlink:href"):
                assert value == "data:," or (value.startswith(("#", "/")) and not value.startswith("//")), value
    assert [(n.attrs.get("rel"), n.attrs.get("href")) for n in doc.all("link")] == [("icon", "data:,")]
    # "http" appears only in the text of code blocks and the proxy's own URL
    outside = re.sub(r"<pre>.*?</pre>", "", page, flags=re.S)
    others = set(re.findall(r"https?://[^\s\"'<>]+", outside)) - {landing_proxy.url}
    assert others == set(), others


def test_hostile_host_header_is_not_reflected(landing_proxy: ProxyProcess) -> None:
    """A Host header with markup never reaches the page raw: the proxy falls back to its own address."""
    for host in (f'x"><b>{HOSTILE}', f"{HOSTILE}:5000", "a.example.com/<x>"):
        page = landing(landing_proxy, host).body.decode()
        assert "<script" not in page and "<b>" not in page and "<x>" not in page
        assert f'[host."{landing_proxy.url}"]' in page.replace("&quot;", '"')


def test_figures_are_live(landing_proxy: ProxyProcess) -> None:
    """After a blob and a manifest pulled twice the page shows a hit ratio in %, the cache size against its 1 GiB limit, the bytes served, the budgets card."""
    doc = parse(landing(landing_proxy).body.decode())
    ratio = figure_value(doc, "hit-ratio")
    assert re.fullmatch(r"\d{1,3}%", ratio), ratio
    assert 0 < int(ratio[:-1]) < 100
    hit = doc.one("div", **{"data-figure": "hit-ratio"}).text()
    assert re.search(r"\d+ of \d+ lookups", hit), hit
    cache = doc.one("div", **{"data-figure": "cache-size"})
    assert re.fullmatch(r"[\d.]+ (B|KiB|MiB)", figure_value(doc, "cache-size"))
    assert "of 1 GiB" in cache.text()
    assert figure_value(doc, "bytes-served") != "—"
    assert figure_value(doc, "active").isdigit()
    assert "Rate-limit budgets" in doc.one("div", **{"data-figure": "budgets"}).text()
    counters = doc.one("details", **{"data-figure": "counters"}).text()
    assert "blob hits" in counters and "manifest hits" in counters


# render() itself: what the live proxy can't be made to show


def _configs() -> list[UpstreamConfig]:
    return [
        UpstreamConfig("docker.io", "https://registry-1.docker.io", default=True, library_prefix=True),
        UpstreamConfig("ghcr.io", "https://ghcr.io", hosts=("ghcr.mirror.example.com",)),
        UpstreamConfig("quay.io", "https://quay.io"),
    ]


def test_render_escapes_names_from_the_configuration() -> None:
    """Upstream, alias, Host and user names with markup, and a base with quotes, come out escaped everywhere."""
    evil = UpstreamConfig(
        f"{HOSTILE}.io",
        NOWHERE,
        hosts=(f"<img src=x onerror=alert(1)>.{'h'}",),
        aliases=("'><i>.io",),
        username="<u>",
        allow=("<a href=//evil>/**",),
    )
    figures = {"active": 1, "draining": False, "cache": {"hit": 1}, "cache_size": 1, "cache_limit": 0,
               "budgets": {f"{HOSTILE}.io (proxy:<u>)": (1, 2)}}
    page = render([*_configs(), evil], 'https://x.example"><script>1</script>', figures).decode()
    assert "<script" not in page and "<img" not in page and "<i>" not in page and "<u>" not in page
    assert "<a href=//evil>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.io" in page
    doc = parse(page)
    assert [s.attrs["id"] for s in doc.all("section", class_="registry")][-1] == f"r-{HOSTILE}.io"


def test_render_without_cache_and_while_draining() -> None:
    """Without a cache the page says so instead of figures; draining shows a badge; no budgets is said in words."""
    doc = parse(render(_configs(), "http://127.0.0.1:5000", {"active": 7, "draining": True}).decode())
    assert figure_value(doc, "cache-size") == "off"
    assert doc.all("div", **{"data-figure": "hit-ratio"}) == []
    assert figure_value(doc, "active") == "7"
    assert "draining" in doc.one("h2", id="figures-h").text()
    assert "No upstream has sent rate-limit figures" in doc.one("div", **{"data-figure": "budgets"}).text()


def test_render_figures_arithmetic() -> None:
    """Hit ratio = (hit + manifest_hit + manifest_revalidated) / every lookup; sizes in binary units; each budget as remaining of limit; bytes_served when given."""
    counts = {"hit": 6, "stored": 2, "collapsed": 1, "passed": 1, "resumed": 5, "manifest_hit": 3,
              "manifest_revalidated": 1, "manifest_stored": 1, "manifest_stale": 0, "manifest_coalesced": 0,
              "manifest_passed": 0}
    figures = {"active": 0, "draining": False, "cache": counts, "cache_size": 3 << 29, "cache_limit": 4 << 30,
               "budgets": {"docker.io (proxy:anonymous)": (12, 100), "docker.io (proxy:bot)": (None, None)}}
    doc = parse(render(_configs(), "http://127.0.0.1:5000", figures).decode())
    assert figure_value(doc, "hit-ratio") == "67%"  # 10 of 15
    assert "10 of 15 lookups" in doc.one("div", **{"data-figure": "hit-ratio"}).text()
    assert figure_value(doc, "cache-size") == "1.5 GiB"
    assert "of 4 GiB (38% full)" in doc.one("div", **{"data-figure": "cache-size"}).text()
    rows = [r.text() for r in doc.one("div", **{"data-figure": "budgets"}).all("tr")[1:]]
    assert "12 of 100" in rows[0] and "anonymous" in rows[0]
    assert "bot" in rows[1] and "—" in rows[1]
    assert figure_value(doc, "bytes-served") == "—"
    doc = parse(render(_configs(), "http://127.0.0.1:5000", {**figures, "bytes_served": 5 << 30}).decode())
    assert figure_value(doc, "bytes-served") == "5 GiB"


def test_daemon_json_only_where_registry_mirrors_can_work() -> None:
    """daemon.json for Docker Hub as the default (or on a Host name of its own), never for another registry; https adds no insecure-registries."""
    doc = parse(render(_configs(), "https://mirror.example.com", {}).decode())
    assert json.loads(snippets(registry_section(doc, "docker.io"))["daemon.json"][0]) == {
        "registry-mirrors": ["https://mirror.example.com"]
    }
    assert all("daemon.json" not in snippets(registry_section(doc, n)) for n in ("ghcr.io", "quay.io"))
    assert "insecure = true" not in page_text(doc)
    hub = UpstreamConfig("docker.io", "https://registry-1.docker.io", hosts=("hub.example.com",))
    other = UpstreamConfig("quay.io", "https://quay.io", default=True)
    doc = parse(render([other, hub], "https://mirror.example.com", {}).decode())
    assert json.loads(snippets(registry_section(doc, "docker.io"))["daemon.json"][0]) == {
        "registry-mirrors": ["https://hub.example.com"]
    }


def page_text(doc: Node) -> str:
    return "\n".join(pre.text() for pre in doc.all("pre"))


def test_render_is_fast() -> None:
    """Rendering the page for six upstreams with figures takes well under 10 ms (it is rendered per request)."""
    configs = [*_configs(), *(UpstreamConfig(f"r{i}.example.com", NOWHERE) for i in range(3))]
    figures = {"active": 1, "draining": False, "cache": {"hit": 1}, "cache_size": 1, "cache_limit": 0, "budgets": {}}
    render(configs, "http://127.0.0.1:5000", figures)
    start = time.perf_counter()
    for _ in range(100):
        render(configs, "http://127.0.0.1:5000", figures)
    assert (time.perf_counter() - start) / 100 < 0.010


# headless Chromium


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium binary (tests/run installs it)."""
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium as root, a fresh profile, nothing in the background; C{args} end with the URL."""
    profile.mkdir(parents=True, exist_ok=True)
    argv = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_chromium_renders_the_page(landing_proxy: ProxyProcess, chromium: str, tmp_path: Path) -> None:
    """Chromium's DOM of GET /: the proxy URL in the header, an h2 and code blocks per upstream, the figures, no script."""
    dom = run_chromium(chromium, tmp_path / "profile", "--dump-dom", landing_proxy.url + "/").stdout
    assert "<script" not in dom
    doc = parse(dom)
    assert doc.one("header").one("p", class_="url").text() == landing_proxy.url
    sections = doc.all("section", class_="registry")
    assert [s.one("h2").one("code").text() for s in sections] == list(NAMES)
    for name, section in zip(NAMES, sections, strict=True):
        blocks = section.all("pre")
        assert len(blocks) >= 4, name
        assert all(landing_proxy.host in b.text() for b in blocks if "docker pull" in b.text() or "[host." in b.text())
        kinds = {f.attrs.get("data-kind") for f in section.all("figure")}
        assert {"pull", "hosts-ns", "hosts-path", "registries.conf"} <= kinds, kinds
    assert re.fullmatch(r"\d{1,3}%", figure_value(doc, "hit-ratio"))
    assert "of 1 GiB" in doc.one("div", **{"data-figure": "cache-size"}).text()
    assert figure_value(doc, "bytes-served") != "—"
    assert doc.one("section", id="kubernetes").one("pre").text().count("config_path") == 2


def test_chromium_screenshot(landing_proxy: ProxyProcess, chromium: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Screenshots at 1280x2000 (light and dark) and 390 wide, kept at <basetemp>/landing*.png; light and dark differ."""
    keep = tmp_path_factory.getbasetemp()
    shots = {
        "landing.png": ("--window-size=1280,2000",),
        "landing-dark.png": ("--window-size=1280,2000", "--force-dark-mode"),
        "landing-narrow.png": ("--window-size=390,2400",),
    }
    for name, options in shots.items():
        path = tmp_path / name
        run_chromium(chromium, tmp_path / f"profile-{name}", f"--screenshot={path}", *options, landing_proxy.url + "/")
        assert path.stat().st_size > 20_000, name
        width, height = png_size(path)
        assert (width, height) == tuple(int(x) for x in options[0].partition("=")[2].split(",")), name
        shutil.copyfile(path, keep / name)
        print(f"landing page screenshot: {keep / name}")
    assert (tmp_path / "landing.png").read_bytes() != (tmp_path / "landing-dark.png").read_bytes()
