"""packaging/: the Dockerfile, the systemd unit, the Kubernetes example.

Fast tests read the files: the Dockerfile's instructions, .dockerignore's
rules, the unit through ``systemd-analyze verify`` and ``security
--offline``, the Kubernetes objects with PyYAML; every command line in them
(the image's ENTRYPOINT+CMD, the unit's ExecStart, the Deployment's args) is
parsed by ``twist`` itself against the TOML it would run with.

Slow tests build and run for real, offline but for Debian's and PyPI's
mirrors: debootstrap a minimal Debian 12 (cached as a tarball next to pytest's
temporary directories), import it into a private dockerd (tests/clients/daemons.py)
as the base image, ``docker build`` packaging/Dockerfile on it (BuildKit), run the
image with its default command and from the host's network, then boot systemd
in a container with packaging/regproxy.service enabled and a TLS upstream.
Timings go to ``<basetemp>/packaging-timings.json``.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from regproxy import config as configuration
from tests.proxyproc import free_port

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
DOCKERFILE = PACKAGING / "Dockerfile"
UNIT = PACKAGING / "regproxy.service"
KUBERNETES = PACKAGING / "kubernetes.yaml"
HEALTHCHECK = PACKAGING / "healthcheck.py"
SYSTEMD_IMAGE = Path(__file__).resolve().parent / "systemd_image"

UID = 10001
REGISTRY_PORT = 5000
METRICS_PORT = 9090
CACHE_DIR = "/var/cache/regproxy"

TIMINGS: dict[str, float] = {}


# ----------------------------------------------------------------------------
# helpers: reading the files


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped (as docker does)."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not buf and not stripped):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def instruction(instructions: list[tuple[str, str]], name: str) -> list[str]:
    return [args for word, args in instructions if word == name]


def exec_form(args: str) -> list[str]:
    """A JSON (exec form) argument list; fails on the shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def healthcheck_cmd(args: str) -> list[str]:
    """The CMD of a HEALTHCHECK instruction (after its --options)."""
    _, _, cmd = args.partition("CMD ")
    return exec_form(cmd.strip())


def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """systemd unit file: section -> [(key, value)], continuation lines joined, in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped[0] in "#;"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf.startswith("[") and buf.endswith("]"):
            current = buf[1:-1]
            sections[current] = []
        else:
            assert current is not None, buf
            key, _, value = buf.partition("=")
            sections[current].append((key.strip(), value.strip()))
        buf = ""
    return sections


def unit_values(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]


def kubernetes_objects() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d]
    by_kind: dict[str, dict] = {}
    for d in docs:
        assert d["kind"] not in by_kind, f"two {d['kind']} objects"
        by_kind[d["kind"]] = d
    return by_kind


def regproxy_container(deployment: dict) -> dict:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "regproxy"]
    return container


def option_value(argv: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in argv (exactly once)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    values += [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {argv}"
    return values[0]


def twist_parse(argv: list[str]) -> dict:
    """Parse ``twist ARGV`` (twist's own options, then ``regproxy`` and its options, the
    --config file loaded and checked) in a subprocess, as ``twist`` would at start-up;
    return a summary of the resulting configuration."""
    code = r"""
import json, sys
from twisted.application.twist._options import TwistOptions
o = TwistOptions()
o.parseOptions(sys.argv[1:])
c = o.subOptions["config"]
print(json.dumps({"command": o.subCommand, "log_format": o["logFormat"], "listen": list(c.listen),
                  "cache_dir": c.cache_dir, "metrics_listen": c.metrics_listen, "access_log": c.access_log,
                  "drain_timeout": c.drain_timeout, "upstreams": [u.name for u in c.upstreams]}))
"""
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, f"twist {' '.join(argv)}: {res.stderr[-2000:]}"
    return json.loads(res.stdout.splitlines()[-1])


def dockerignore_excluded(path: str, patterns: list[str]) -> bool:
    """Whether docker leaves ``path`` (relative, '/'-separated) out of the build context.

    Docker's rules: patterns in order, the last one matching the path or one of
    its parent directories decides; ``!`` re-includes; ``**`` spans directories.
    """
    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        rx = regex(pattern)
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


# ----------------------------------------------------------------------------
# Dockerfile (static)


def test_dockerfile_base_is_a_build_argument() -> None:
    """Every FROM is the BASE build argument (default debian:12-slim) or a stage of this file."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    assert instructions[0] == ("ARG", "BASE=debian:12-slim")
    froms = instruction(instructions, "FROM")
    assert froms and all(f.split()[0] == "${BASE}" for f in froms), froms
    # the runtime stage copies the virtualenv from the build stage, nothing from elsewhere
    copies_from = [c for c in instruction(instructions, "COPY") if c.startswith("--from=")]
    assert copies_from == ["--from=build /opt/regproxy /opt/regproxy"]
    assert "AS build" in froms[0]


def test_dockerfile_installs_from_the_source_tree_with_pip() -> None:
    """The build stage pip-installs the build context (the repository) into /opt/regproxy."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    assert ". /src" in instruction(instructions, "COPY")
    runs = " ".join(instruction(instructions, "RUN"))
    assert "python3 -m venv /opt/regproxy" in runs
    assert re.search(r"/opt/regproxy/bin/pip install .*/src\b", runs)
    assert "install -m 0755 /src/packaging/healthcheck.py /opt/regproxy/bin/regproxy-healthcheck" in runs


def test_dockerfile_runs_as_numeric_non_root_user() -> None:
    """The last USER is 10001:10001 (numeric, so Kubernetes' runAsNonRoot can check it) and that user exists."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    users = instruction(instructions, "USER")
    assert users and users[-1] == f"{UID}:{UID}"
    runs = " ".join(instruction(instructions, "RUN"))
    assert f"useradd --uid {UID} --gid {UID}" in runs and f"groupadd --gid {UID}" in runs
    assert f"chown {UID}:{UID} {CACHE_DIR}" in runs


def test_dockerfile_cache_volume_and_ports() -> None:
    """The cache directory is a VOLUME; the registry and metrics ports are EXPOSEd."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    volumes = [v for args in instruction(instructions, "VOLUME") for v in exec_form(args)]
    assert volumes == [CACHE_DIR]
    exposed = {p for args in instruction(instructions, "EXPOSE") for p in args.split()}
    assert exposed == {str(REGISTRY_PORT), str(METRICS_PORT)}


def test_dockerfile_healthcheck_uses_the_bundled_script() -> None:
    """HEALTHCHECK runs regproxy-healthcheck (python, no curl), whose default URL is /healthz on port 5000."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    (check,) = instruction(instructions, "HEALTHCHECK")
    assert healthcheck_cmd(check) == ["/opt/regproxy/bin/regproxy-healthcheck"]
    for opt in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert opt in check
    envs = " ".join(instruction(instructions, "ENV"))
    assert f"REGPROXY_HEALTHCHECK_URL=http://127.0.0.1:{REGISTRY_PORT}/healthz" in envs
    assert f'"http://127.0.0.1:{REGISTRY_PORT}/healthz"' in HEALTHCHECK.read_text()
    assert "curl" not in " ".join(instruction(instructions, "RUN"))


def test_dockerfile_warms_plugin_cache_as_root_before_user() -> None:
    """The Twisted plugin cache is built in the runtime stage as root (the installation's owner), before USER."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    warm = [i for i, (w, a) in enumerate(instructions)
            if w == "RUN" and "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" in a]
    assert len(warm) == 1 and warm[0] > last_from
    user = [i for i, (w, _) in enumerate(instructions) if w == "USER"]
    assert all(u > warm[0] for u in user)
    assert "dropin.cache" in instructions[warm[0]][1]  # and checks that it was written
    # the copy it warms is the final one (a cache warmed in the build stage could be older than the files)
    copy = [i for i, (w, a) in enumerate(instructions) if w == "COPY" and a.startswith("--from=build")]
    assert copy and copy[0] < warm[0]


def test_dockerfile_entrypoint_and_command_parse_as_twist_options(tmp_path: Path) -> None:
    """ENTRYPOINT+CMD is a valid twist regproxy command line: cache dir, metrics listener, access log to stdout, drain timeout."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    (entrypoint,) = instruction(instructions, "ENTRYPOINT")
    (cmd,) = instruction(instructions, "CMD")
    argv = exec_form(entrypoint) + exec_form(cmd)
    assert argv[0] == "/opt/regproxy/bin/twist" and "regproxy" in argv
    assert instruction(instructions, "STOPSIGNAL") == ["SIGTERM"]
    cache = tmp_path / "cache"
    parsed = twist_parse([str(cache) if a == CACHE_DIR else a for a in argv[1:]])
    assert parsed["command"] == "regproxy"
    assert parsed["log_format"] == "text"
    assert parsed["listen"] == [f"tcp:{REGISTRY_PORT}"]
    assert parsed["cache_dir"] == str(cache)
    assert parsed["metrics_listen"] == f"tcp:{METRICS_PORT}"
    assert parsed["access_log"] == "-"
    assert parsed["drain_timeout"] == 30
    assert parsed["upstreams"] == ["docker.io"]


def test_dockerignore_keeps_the_sources_and_drops_the_rest() -> None:
    """.dockerignore leaves out .git, .tox, caches, build output, tests and benchmarks, and keeps what pip install . needs."""
    patterns = dockerignore_patterns()
    for path in (".git/HEAD", ".tox/py311/bin/python", ".tox-venv/bin/tox", "benchmarks/results/run.json",
                 "regproxy/__pycache__/tap.cpython-311.pyc", "twisted/plugins/dropin.cache",
                 "twisted/plugins/__pycache__/regproxy_plugin.cpython-311.pyc", "build/lib/regproxy/tap.py",
                 "regproxy.egg-info/PKG-INFO", ".mypy_cache/3.11/x.json", ".pytest_cache/v/x",
                 ".ruff_cache/x", ".hypothesis/examples/x", "tests/conftest.py", "packaging/Dockerfile",
                 "packaging/kubernetes.yaml"):
        assert dockerignore_excluded(path, patterns), f"{path} would be sent to the build"
    for path in ("setup.py", "README.rst", "regproxy/tap.py", "regproxy/cache/store.py",
                 "twisted/plugins/regproxy_plugin.py", "packaging/healthcheck.py"):
        assert (REPO / path).exists(), path
        assert not dockerignore_excluded(path, patterns), f"{path} would be missing from the build"


# ----------------------------------------------------------------------------
# the health check script


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    server.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _healthcheck(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "REGPROXY_HEALTHCHECK_URL": url, "REGPROXY_HEALTHCHECK_TIMEOUT": "3", **env}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=environ, capture_output=True, text=True, timeout=30)


def test_healthcheck_script_exit_status(answering: http.server.HTTPServer) -> None:
    """regproxy-healthcheck: 0 on a 200 (even with an http_proxy set), 1 on a 503 and on a closed port."""
    url = f"http://127.0.0.1:{answering.server_address[1]}/healthz"
    res = _healthcheck(url, http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    assert res.returncode == 0, res.stderr
    assert "healthy" in res.stdout
    answering.status = 503  # type: ignore[attr-defined]
    res = _healthcheck(url)
    assert res.returncode == 1 and "503" in res.stderr
    res = _healthcheck(f"http://127.0.0.1:{free_port()}/healthz")
    assert res.returncode == 1 and "unhealthy" in res.stderr


# ----------------------------------------------------------------------------
# systemd unit (static, systemd-analyze)


def _unit_execstart() -> list[str]:
    sections = unit_sections(UNIT.read_text())
    (execstart,) = unit_values(sections, "Service", "ExecStart")
    return shlex.split(execstart)


def test_unit_directives() -> None:
    """The unit: DynamicUser with Cache/State/ConfigurationDirectory, SIGTERM with a stop timeout above the drain timeout, Restart=on-failure, the capability for port 443 only."""
    sections = unit_sections(UNIT.read_text())

    def one(key: str) -> str:
        values = unit_values(sections, "Service", key)
        assert len(values) == 1, f"{key}: {values}"
        return values[0]

    assert one("DynamicUser") == "yes"
    assert one("CacheDirectory") == "regproxy"
    assert one("StateDirectory") == "regproxy"
    assert one("ConfigurationDirectory") == "regproxy"
    assert one("KillSignal") == "SIGTERM"
    assert one("Restart") == "on-failure"
    assert one("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert one(key) == "yes"
    assert one("ProtectSystem") == "strict"
    assert unit_values(sections, "Service", "SystemCallFilter")[0] == "@system-service"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # pyOpenSSL's callbacks need writable+executable memory (see test_systemd_unit_sandbox_and_tls)
    assert one("MemoryDenyWriteExecute") == "no"
    argv = _unit_execstart()
    assert argv[:3] == ["/opt/regproxy/bin/twist", "--log-format=text", "regproxy"]
    assert option_value(argv, "--config") == "/etc/regproxy/regproxy.toml"
    assert option_value(argv, "--cache-dir") == "${CACHE_DIRECTORY}"
    drain = float(option_value(argv, "--drain-timeout"))
    assert float(one("TimeoutStopSec")) > drain
    assert unit_values(sections, "Install", "WantedBy") == ["multi-user.target"]


def test_unit_execstart_parses_as_twist_options(tmp_path: Path) -> None:
    """The unit's ExecStart (with regproxy.example.toml as its config) is a valid twist regproxy command line."""
    config = tmp_path / "regproxy.toml"
    shutil.copy(REPO / "regproxy.example.toml", config)
    cache = tmp_path / "cache"
    argv = [str(config) if a == "/etc/regproxy/regproxy.toml" else a.replace("${CACHE_DIRECTORY}", str(cache))
            for a in _unit_execstart()]
    parsed = twist_parse(argv[1:])
    assert parsed["cache_dir"] == str(cache)
    assert parsed["metrics_listen"] == f"tcp:{METRICS_PORT}:interface=127.0.0.1"
    assert parsed["access_log"] == "-"
    assert "docker.io" in parsed["upstreams"]


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd; tests/run installs it)")
    return path


def test_unit_verifies_with_systemd_analyze(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without a single warning (in a scratch root holding the unit, the stock units and an executable /opt/regproxy/bin/twist)."""
    analyze = _systemd_analyze()
    # verify needs no running systemd, but it does check that ExecStart= is
    # executable and that the units it depends on exist: a scratch root gives
    # it both without touching /opt or /etc/systemd.
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    stock = Path("/usr/lib/systemd/system") if Path("/usr/lib/systemd/system").is_dir() else Path("/lib/systemd/system")
    shutil.copytree(stock, root / "usr/lib/systemd/system", symlinks=True)
    twist = root / "opt/regproxy/bin/twist"
    twist.parent.mkdir(parents=True)
    twist.write_text("#!/bin/sh\n")
    twist.chmod(0o755)
    shutil.copy(UNIT, root / "etc/systemd/system/regproxy.service")
    res = subprocess.run([analyze, "verify", f"--root={root}", "--man=no", "/etc/systemd/system/regproxy.service"],
                         capture_output=True, text=True, timeout=120)
    # systemd-analyze exits 0 on unknown keys and bad values ("..., ignoring"): any output is a failure
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr

    # and it does notice mistakes
    (root / "etc/systemd/system/regproxy.service").write_text(
        UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt"))
    res = subprocess.run([analyze, "verify", f"--root={root}", "--man=no", "/etc/systemd/system/regproxy.service"],
                         capture_output=True, text=True, timeout=120)
    assert "strikt" in res.stderr


def test_unit_security_exposure_is_ok() -> None:
    """systemd-analyze security --offline=yes rates the unit's exposure at most 2.0 ("OK")."""
    analyze = _systemd_analyze()
    res = subprocess.run([analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(UNIT)],
                         capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for regproxy\.service: (\d+\.\d+) (\w+)", res.stdout)
    assert match, res.stdout[-2000:] + res.stderr
    assert float(match.group(1)) <= 2.0 and match.group(2) == "OK", match.group(0)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------
# Kubernetes (static)


def test_kubernetes_objects_and_labels() -> None:
    """kubernetes.yaml holds a ConfigMap, a Deployment and a Service whose selectors match the pod labels."""
    objects = kubernetes_objects()
    assert set(objects) == {"ConfigMap", "Deployment", "Service"}
    deployment, service = objects["Deployment"], objects["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert 1 <= deployment["spec"]["replicas"] <= 2


def test_kubernetes_deployment_probes_ports_and_shutdown() -> None:
    """readinessProbe on /readyz, livenessProbe on /healthz, named ports 5000/9090, grace period above preStop + drain timeout."""
    deployment = kubernetes_objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = regproxy_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"registry": REGISTRY_PORT, "metrics": METRICS_PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "registry"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "registry"}
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "/bin/sleep"
    drain = float(option_value(container["args"], "--drain-timeout"))
    assert pod["terminationGracePeriodSeconds"] > float(prestop[1]) + drain


def test_kubernetes_security_context_and_resources() -> None:
    """The pod runs as 10001 non-root, read-only root, no privilege escalation, no capabilities; requests and limits set."""
    deployment = kubernetes_objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = regproxy_container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["fsGroup"] == UID
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/regproxy"]]["configMap"]["name"] == kubernetes_objects()["ConfigMap"]["metadata"]["name"]
    assert "emptyDir" in volumes[mounts[CACHE_DIR]] or "persistentVolumeClaim" in volumes[mounts[CACHE_DIR]]
    assert "emptyDir" in volumes[mounts["/tmp"]]  # the only other writable place on the read-only root


def test_kubernetes_service_ports() -> None:
    """The Service exposes the registry (5000) and metrics (9090) ports by the container's port names."""
    service = kubernetes_objects()["Service"]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"registry": (REGISTRY_PORT, "registry"), "metrics": (METRICS_PORT, "metrics")}


def test_kubernetes_configmap_toml_is_a_valid_config(tmp_path: Path) -> None:
    """The ConfigMap's regproxy.toml parses (tomllib) and passes regproxy.config.from_mapping."""
    cm = kubernetes_objects()["ConfigMap"]
    assert set(cm["data"]) == {"regproxy.toml"}
    data = tomllib.loads(cm["data"]["regproxy.toml"])
    cfg = configuration.from_mapping(data, base=tmp_path, path=str(tmp_path / "regproxy.toml"))
    assert [u.name for u in cfg.upstreams if u.default] == ["docker.io"]
    assert cfg.listen == (f"tcp:{REGISTRY_PORT}",)
    # below the cache volume's size
    cache_volume = next(v for v in kubernetes_objects()["Deployment"]["spec"]["template"]["spec"]["volumes"]
                        if v["name"] == "cache")
    limit = configuration.parse_size(cache_volume["emptyDir"]["sizeLimit"].replace("Gi", "G"))
    assert 0 < cfg.cache_max_size < limit


def test_kubernetes_args_parse_with_the_configmap(tmp_path: Path) -> None:
    """The Deployment's args, with the ConfigMap mounted as --config, are a valid twist regproxy command line."""
    objects = kubernetes_objects()
    container = regproxy_container(objects["Deployment"])
    config = tmp_path / "regproxy.toml"
    config.write_text(objects["ConfigMap"]["data"]["regproxy.toml"])
    cache = tmp_path / "cache"
    args = [str(config) if a == "/etc/regproxy/regproxy.toml" else str(cache) if a == CACHE_DIR else a
            for a in container["args"]]
    assert "command" not in container  # the image's ENTRYPOINT (twist --log-format=text regproxy)
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    (entrypoint,) = instruction(instructions, "ENTRYPOINT")
    parsed = twist_parse(exec_form(entrypoint)[1:] + args)
    assert parsed["cache_dir"] == str(cache)
    assert parsed["metrics_listen"] == f"tcp:{METRICS_PORT}"
    assert parsed["access_log"] == "-"
    assert parsed["upstreams"] == ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"]


# ----------------------------------------------------------------------------
# building and running (slow)

DEBIAN_MIRROR = os.environ.get("REGPROXY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_TAG = "regproxy-base:test"
IMAGE_TAG = "regproxy:test"
SYSTEMD_TAG = "regproxy-systemd:test"
#: a cached debootstrap tarball older than this is made again
BASE_MAX_AGE = 7 * 24 * 3600

_CAPS = ("CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
         "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT "
         "SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE "
         "AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ").split()


def _timing(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 1)
    print(f"[timing] {name}: {seconds:.1f}s")


@pytest.fixture(scope="module", autouse=True)
def _timing_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    if TIMINGS:
        out = tmp_path_factory.getbasetemp() / "packaging-timings.json"
        out.write_text(json.dumps(TIMINGS, indent=2))
        print("\n[timing] packaging:", json.dumps(TIMINGS))


def _run(argv: list[str], *, timeout: float, log: Path | None = None, env: dict[str, str] | None = None,
         stdin: object = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                         stdin=stdin if stdin is not None else subprocess.DEVNULL)  # type: ignore[arg-type]
    if log is not None:
        log.write_text(f"$ {' '.join(argv)}\n--- stdout ---\n{res.stdout}\n--- stderr ---\n{res.stderr}\n")
    if res.returncode != 0:
        where = f" (log {log})" if log else ""
        raise AssertionError(f"{' '.join(argv[:3])}... exited {res.returncode}{where}:\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _debootstrap_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minbase Debian 12 root as a tar, cached next to pytest's temporary directories."""
    if os.geteuid() != 0:
        pytest.skip("debootstrap and dockerd need root (tests/run runs as root)")
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        pytest.skip("debootstrap not installed (tests/run installs it)")
    version = _run([debootstrap, "--version"], timeout=30).stdout.split()[-1]
    cache_dir = tmp_path_factory.getbasetemp().parent / "regproxy-packaging-cache"
    cache_dir.mkdir(exist_ok=True)
    tarball = cache_dir / f"bookworm-minbase-{version}.tar"
    if tarball.exists() and time.time() - tarball.stat().st_mtime < BASE_MAX_AGE:
        TIMINGS["debootstrap (cached tarball)"] = 0.0
        return tarball
    work = tmp_path_factory.mktemp("debootstrap")
    root = work / "root"
    t0 = time.monotonic()
    # In a mount namespace of its own: the /proc, /sys, ... debootstrap mounts
    # in the target vanish with it, even when it fails halfway.
    _run(["unshare", "--mount", "--propagation", "private",
          debootstrap, "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR],
         timeout=900, log=work / "debootstrap.log")
    _timing("debootstrap", time.monotonic() - t0)
    # Like debian:12-slim: no downloaded packages or lists, deb822 sources with updates and security.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / junk).glob("*"):
            if p.is_file():
                p.unlink()
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    security = DEBIAN_MIRROR.rstrip("/") + "-security" if "deb.debian.org" in DEBIAN_MIRROR else DEBIAN_MIRROR
    (root / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {DEBIAN_MIRROR}\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: bookworm-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    # This machine's local CAs (a TLS-intercepting egress proxy's, say): the
    # build's ca-certificates picks them up, so pip trusts PyPI as the host does.
    local_cas = root / "usr/local/share/ca-certificates"
    local_cas.mkdir(parents=True, exist_ok=True)
    for crt in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
        shutil.copy(crt, local_cas / crt.name)
    partial = tarball.with_suffix(".partial")
    with tarfile.open(partial, "w") as tar:
        tar.add(root, arcname=".")
    os.replace(partial, tarball)
    shutil.rmtree(root, ignore_errors=True)
    return tarball


@dataclass
class Built:
    """The private dockerd with the base image and packaging/Dockerfile's image in it."""

    dockerd: object
    workdir: Path
    logs: dict[str, Path] = field(default_factory=dict)

    def docker(self, *args: str, timeout: float = 300, check: bool = True, input: str | None = None,
               **env: str) -> subprocess.CompletedProcess[str]:
        d = self.dockerd
        environ = {**d.env(), **env}  # type: ignore[attr-defined]
        res = subprocess.run([d.docker_bin, *args], env=environ, capture_output=True, text=True,  # type: ignore[attr-defined]
                             timeout=timeout, input=input, stdin=subprocess.DEVNULL if input is None else None)
        if check and res.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {res.returncode}:\n{res.stdout[-3000:]}\n"
                                 f"{res.stderr[-3000:]}\n--- dockerd log ---\n{d.log_tail()}")  # type: ignore[attr-defined]
        return res

    def build(self, name: str, context: Path, dockerfile: Path, tag: str, **build_args: str) -> None:
        log = self.workdir / f"build-{name}.log"
        argv = ["build", "--progress=plain", "--network=host", "-f", str(dockerfile), "-t", tag]
        for k, v in build_args.items():
            argv += ["--build-arg", f"{k}={v}"]
        res = self.docker(*argv, str(context), timeout=1200, check=False, DOCKER_BUILDKIT="1")
        log.write_text(res.stdout + res.stderr)
        self.logs[name] = log
        assert res.returncode == 0, f"docker build {name} failed (log {log}):\n{res.stderr[-4000:]}"

    def inspect(self, what: str) -> dict:
        return json.loads(self.docker("inspect", what).stdout)[0]

    def wait_health(self, container: str, timeout: float = 90) -> float:
        """Seconds until the container's HEALTHCHECK reports healthy."""
        t0 = time.monotonic()
        status = None
        while time.monotonic() - t0 < timeout:
            state = self.inspect(container)["State"]
            status = (state.get("Health") or {}).get("Status")
            if status == "healthy":
                return time.monotonic() - t0
            assert state["Status"] == "running", f"container exited: {state}\n{self.docker('logs', container).stderr[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"not healthy after {timeout}s ({status}): {self.inspect(container)['State'].get('Health')}")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """debootstrap → docker import → docker build packaging/Dockerfile (BASE overridden), in a private dockerd."""
    from tests.clients.daemons import Dockerd

    tarball = _debootstrap_tarball(tmp_path_factory)
    workdir = tmp_path_factory.mktemp("packaging-docker")
    d = Dockerd(workdir / "dockerd")
    d.start()
    b = Built(d, workdir)
    try:
        t0 = time.monotonic()
        with open(tarball, "rb") as f:
            res = subprocess.run([d.docker_bin, "import", "-", BASE_TAG], stdin=f, env=d.env(),
                                 capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        _timing("docker import", time.monotonic() - t0)
        t0 = time.monotonic()
        b.build("image", REPO, DOCKERFILE, IMAGE_TAG, BASE=BASE_TAG)
        _timing("docker build packaging/Dockerfile", time.monotonic() - t0)
        yield b
    finally:
        b.docker("rm", "--force", "--volumes", *b.docker("ps", "-aq", check=False).stdout.split(), check=False)
        d.stop()
        # vfs keeps a full copy of the filesystem per layer: gigabytes
        shutil.rmtree(d.data_root, ignore_errors=True)


def _container_get(b: Built, container: str, url: str) -> tuple[int, str]:
    code = ("import sys, urllib.request as u\n"
            "r = u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=10)\n"
            "sys.stdout.write(f'{r.status}\\n' + r.read().decode())")
    out = b.docker("exec", container, "/opt/regproxy/bin/python", "-c", code, url).stdout
    status, _, body = out.partition("\n")
    return int(status), body


@pytest.mark.slow
def test_image_default_command(built: Built) -> None:
    """The image with its default command (own empty network, read-only root): healthy, /readyz and /metrics answer, uid 10001, the cache volume used, JSON access log, docker stop exits 0."""
    b = built
    image = b.inspect(IMAGE_TAG)["Config"]
    assert image["User"] == f"{UID}:{UID}"
    assert set(image["ExposedPorts"]) == {f"{REGISTRY_PORT}/tcp", f"{METRICS_PORT}/tcp"}
    assert set(image["Volumes"]) == {CACHE_DIR}
    assert image["Healthcheck"]["Test"] == ["CMD", "/opt/regproxy/bin/regproxy-healthcheck"]

    t0 = time.monotonic()
    cid = b.docker("run", "--detach", "--network=none", "--read-only", "--tmpfs=/tmp",
                   "--health-interval=1s", IMAGE_TAG).stdout.strip()
    healthy = b.wait_health(cid)
    _timing("container start to healthy (default command)", time.monotonic() - t0)
    assert healthy < 60

    assert b.docker("exec", cid, "id", "-u").stdout.strip() == str(UID)
    assert _container_get(b, cid, f"http://127.0.0.1:{REGISTRY_PORT}/readyz") == (200, "ok\n")
    status, metrics = _container_get(b, cid, f"http://127.0.0.1:{METRICS_PORT}/metrics")
    assert status == 200 and "regproxy_requests_total" in metrics
    # the warmed plugin cache is fresh: finding the plugin writes nothing (the root is read-only anyway)
    code = ("import sys\nfrom twisted.python import log\nlog.startLogging(sys.stdout)\n"
            "from twisted.plugin import getPlugins\nfrom twisted.application.service import IServiceMaker\n"
            "print('PLUGINS', sorted(p.tapname for p in getPlugins(IServiceMaker)))")
    out = b.docker("exec", cid, "/opt/regproxy/bin/python", "-c", code).stdout
    assert "regproxy" in out.split("PLUGINS", 1)[1] and "Unable to write" not in out, out
    mounts = {m["Destination"]: m for m in b.inspect(cid)["Mounts"]}
    assert mounts[CACHE_DIR]["Type"] == "volume"
    files = b.docker("exec", cid, "ls", CACHE_DIR).stdout.split()
    assert "index.sqlite" in files

    t0 = time.monotonic()
    b.docker("stop", "--time=40", cid)
    stopped = time.monotonic() - t0
    _timing("docker stop (idle)", stopped)
    state = b.inspect(cid)["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert stopped < 30
    logs = b.docker("logs", cid)
    access = [json.loads(line) for line in logs.stdout.splitlines() if line.startswith('{"time"')]
    assert any(e["path"] == "/healthz" and e["status"] == 200 for e in access), logs.stdout[-2000:]
    assert "SIGTERM" in logs.stdout + logs.stderr


@pytest.mark.slow
def test_image_healthz_from_the_host_network(built: Built) -> None:
    """The image on the host's network (arguments replacing CMD, free ports): /healthz answers ok to this process, the HEALTHCHECK follows REGPROXY_HEALTHCHECK_URL."""
    b = built
    port, metrics_port = free_port(), free_port()
    cid = b.docker("run", "--detach", "--network=host", "--health-interval=1s",
                   f"--env=REGPROXY_HEALTHCHECK_URL=http://127.0.0.1:{port}/healthz", IMAGE_TAG,
                   "--listen", f"tcp:{port}:interface=127.0.0.1", "--cache-dir", CACHE_DIR,
                   "--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1", "--access-log", "-").stdout.strip()
    try:
        b.wait_health(cid)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
        with opener.open(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            assert r.status == 200
        with opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200 and b"regproxy_requests_total" in r.read()
    finally:
        b.docker("stop", "--time=40", cid, check=False)
    assert b.inspect(cid)["State"]["ExitCode"] == 0


# ---- systemd


def _missing_capabilities() -> list[str]:
    """Capabilities not in this process's bounding set: docker run --cap-add ALL would fail on them."""
    with open("/proc/self/status") as f:
        bounding = int(next(line for line in f if line.startswith("CapBnd:")).split()[1], 16)
    return [name for bit, name in enumerate(_CAPS) if not bounding & (1 << bit)]


@dataclass
class SystemdContainer:
    built: Built
    cid: str

    def sh(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.built.docker("exec", self.cid, "sh", "-c", command, check=check, timeout=timeout)

    def write(self, path: str, text: str) -> None:
        """Write a file inside the container (its directory created)."""
        self.built.docker("exec", "-i", self.cid, "sh", "-c", 'mkdir -p "$(dirname "$0")" && cat > "$0"', path,
                          input=text)

    def observe(self) -> dict:
        return json.loads(self.sh("python3 /usr/local/lib/regproxy-test/observe.py").stdout)

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh("systemctl show regproxy.service " + " ".join(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, last_run: bool = False) -> str:
        """The unit's journal (only its last run's with C{last_run})."""
        match = ""
        if last_run:
            match = " _SYSTEMD_INVOCATION_ID=" + self.show("InvocationID")["InvocationID"]
        return self.sh("journalctl --unit=regproxy.service --output=cat --no-pager" + match).stdout

    def wait_active(self, timeout: float = 60) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            res = self.sh("systemctl is-active regproxy.service && python3 -c "
                          "\"import urllib.request as u; u.urlopen('http://127.0.0.1:5000/healthz', timeout=2)\"",
                          check=False)
            if res.returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"regproxy.service not up after {timeout}s:\n"
                             + self.sh("systemctl status regproxy.service --no-pager; journalctl -b --no-pager | tail -50",
                                       check=False).stdout)


@pytest.fixture(scope="module")
def systemd_container(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdContainer]:
    """systemd 252 as PID 1 in a container, packaging/regproxy.service enabled, a TLS upstream on 127.0.0.1:8443."""
    from tests.upstream.pki import make_pki

    context = tmp_path_factory.mktemp("systemd-image")
    for p in SYSTEMD_IMAGE.iterdir():
        if p.is_file():
            shutil.copy(p, context / p.name)
    shutil.copy(UNIT, context / "regproxy.service")
    pki = make_pki(context / "pki")
    shutil.copy(pki.ca_cert, context / "ca.pem")
    shutil.copy(pki.server_cert, context / "server.pem")
    shutil.copy(pki.server_key, context / "server.key")
    (context / "regproxy.toml").write_text(
        # a name, not an address: resolving it (getaddrinfo, in a thread) is part of what the sandbox must allow
        '[[upstream]]\nname = "docker.io"\nurl = "https://localhost:8443"\ndefault = true\n'
        'ca = ["/etc/regproxy/ca.pem"]\n')
    t0 = time.monotonic()
    built.build("systemd-image", context, context / "Dockerfile", SYSTEMD_TAG, BASE=BASE_TAG, APP=IMAGE_TAG)
    _timing("docker build systemd test image", time.monotonic() - t0)
    # systemd needs CAP_SYS_ADMIN & co. and its own seccomp needs; not --privileged,
    # which fails where this machine's bounding set lacks a capability.
    caps = ["--cap-add=ALL", *(f"--cap-drop={c}" for c in _missing_capabilities())]
    t0 = time.monotonic()
    cid = built.docker("run", "--detach", "--network=none", "--cgroupns=private", *caps,
                       "--security-opt=seccomp=unconfined", "--security-opt=apparmor=unconfined",
                       "--tmpfs=/run", "--tmpfs=/run/lock", "--tmpfs=/tmp", SYSTEMD_TAG).stdout.strip()
    c = SystemdContainer(built, cid)
    try:
        c.wait_active()
        _timing("systemd boot to regproxy.service up", time.monotonic() - t0)
        yield c
    finally:
        (context / "journal.log").write_text(c.sh("journalctl -b --no-pager", check=False).stdout)
        built.docker("rm", "--force", "--volumes", cid, check=False)


@pytest.mark.slow
def test_systemd_unit_sandbox_and_tls(systemd_container: SystemdContainer) -> None:
    """Under systemd 252 the unit runs as a dynamic non-root user with only CAP_NET_BIND_SERVICE, no new privileges, seccomp on, the cache in /var/cache/private/regproxy; /healthz, /readyz, /metrics answer and an upstream HTTPS request succeeds."""
    c = systemd_container
    seen = c.observe()
    http = seen["http"]
    assert http["healthz"] == [200, "ok\n"]
    assert http["readyz"] == [200, "ok\n"]
    assert http["v2"] == [200, "{}"], http["v2"]  # through TLS to the upstream, inside the sandbox
    assert http["metrics"][0] == 200 and "regproxy_requests_total" in http["metrics"][1]
    status = seen["status"]
    uid = int(status["Uid"].split()[0])
    assert uid != 0 and uid == int(seen["unit"]["UID"]) and all(int(u) == uid for u in status["Uid"].split())
    cap_net_bind_service = 1 << 10
    for cap in ("CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == cap_net_bind_service, (cap, status[cap])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # filter mode: SystemCallFilter is applied
    assert seen["cmdline"][2:4] == ["--log-format=text", "regproxy"]
    assert option_value(seen["cmdline"], "--cache-dir") == CACHE_DIR  # ${CACHE_DIRECTORY} expanded
    cache = seen["cache"]
    assert cache["islink"] and cache["target"] == "/var/cache/private/regproxy"
    assert cache["uid"] == uid
    assert {"index.sqlite", "blobs"} <= set(cache["files"])
    access = [json.loads(line) for line in c.journal().splitlines() if line.startswith('{"time"')]
    assert any(e["path"] == "/v2/" and e["upstream_status"] == 200 for e in access)


@pytest.mark.slow
def test_systemd_stop_drains_and_succeeds(systemd_container: SystemdContainer) -> None:
    """systemctl stop: SIGTERM, the proxy drains and exits 0 well inside TimeoutStopSec (Result=success); it starts again."""
    c = systemd_container
    t0 = time.monotonic()
    c.sh("systemctl stop regproxy.service")
    _timing("systemctl stop (idle)", time.monotonic() - t0)
    shown = c.show("Result", "ExecMainStatus", "ExecMainCode", "ActiveState")
    assert shown == {"Result": "success", "ExecMainStatus": "0", "ExecMainCode": "1", "ActiveState": "inactive"}, shown
    assert time.monotonic() - t0 < 30
    assert "SIGTERM: draining" in c.journal()
    c.sh("systemctl start regproxy.service")
    c.wait_active()


@pytest.mark.slow
def test_systemd_memory_deny_write_execute_breaks_tls(systemd_container: SystemdContainer) -> None:
    """Why the unit says MemoryDenyWriteExecute=no: in the unit's sandbox with it on, starting a Twisted client TLS handshake fails in cffi; with it off, it works."""
    c = systemd_container
    dropin = "/etc/systemd/system/regproxy.service.d/probe.conf"
    try:
        results = {}
        for mdwe in ("yes", "no"):
            c.sh("systemctl stop regproxy.service")
            c.write(dropin, "[Service]\nType=oneshot\nRestart=no\nExecStart=\n"
                    f"ExecStart=/usr/local/lib/regproxy-test/tls_probe.py\nMemoryDenyWriteExecute={mdwe}\n")
            c.sh("systemctl daemon-reload; systemctl reset-failed regproxy.service")
            c.sh("systemctl start regproxy.service", check=False)
            results[mdwe] = (c.show("Result")["Result"], c.journal(last_run=True))
        assert results["yes"][0] == "exit-code"
        assert "Cannot allocate write+execute memory for ffi.callback()" in results["yes"][1]
        assert results["no"][0] == "success", results["no"][1][-2000:]
        assert "client TLS handshake started" in results["no"][1]
    finally:
        c.sh(f"rm -f {dropin}; systemctl daemon-reload; systemctl reset-failed regproxy.service; "
             "systemctl start regproxy.service", check=False)
    c.wait_active()


@pytest.mark.slow
def test_systemd_unit_with_workers(systemd_container: SystemdContainer) -> None:
    """The unit's ExecStart plus --workers 2 (a drop-in): both processes serve in the sandbox, one scrape counts both, stop succeeds."""
    c = systemd_container
    dropin = "/etc/systemd/system/regproxy.service.d/workers.conf"
    sections = unit_sections(UNIT.read_text())
    (execstart,) = unit_values(sections, "Service", "ExecStart")
    try:
        c.write(dropin, f"[Service]\nExecStart=\nExecStart={execstart} --workers 2\n")
        c.sh("systemctl daemon-reload; systemctl restart regproxy.service")
        c.wait_active()
        deadline = time.monotonic() + 30
        while c.observe()["workers"] != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert c.observe()["workers"] == 1
        for _ in range(6):
            assert c.observe()["http"]["v2"] == [200, "{}"]
        metrics = c.observe()["http"]["metrics"][1]
        pings = [line for line in metrics.splitlines()
                 if line.startswith("regproxy_requests_total{") and 'kind="ping"' in line and 'status="2xx"' in line]
        assert pings and sum(float(line.rsplit(" ", 1)[1]) for line in pings) >= 6, pings
        c.sh("systemctl stop regproxy.service")
        assert c.show("Result", "ExecMainStatus") == {"Result": "success", "ExecMainStatus": "0"}
        assert c.observe()["workers"] == 0
    finally:
        c.sh(f"rm -f {dropin}; systemctl daemon-reload; systemctl reset-failed regproxy.service; "
             "systemctl start regproxy.service", check=False)
    c.wait_active()
