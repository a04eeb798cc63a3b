"""regproxy with a TOML configuration serving several test upstreams at once.

:func:`write_config` writes a ``--config`` file from plain dicts (one per
``[[upstream]]``); :func:`many_upstreams` is the three-registry setup the
many-registries tests share: the Docker-Hub-like ``hub`` as ``docker.io`` (the
default, ``library/`` rule on), the ghcr.io-like registry as ``ghcr.io`` (also
selected by the host name ``ghcr.mirror.test``) and the company registry as
``registry.corp.test`` (``team/**`` only, ``team/secret*`` denied).
:func:`tokens_since` reads a token server's request log once it has caught up.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.integration.http import request
from tests.proxyproc import ProxyProcess
from tests.upstream.hub import Registry

#: The host name that selects the ghcr.io upstream by ``Host`` header.
GHCR_HOST = "ghcr.mirror.test"
#: The company registry's name at the proxy.
CORP = "registry.corp.test"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write_config(path: Path, upstreams: Sequence[Mapping[str, Any]], **top: Any) -> Path:
    """A regproxy TOML file: top-level keys, then one ``[[upstream]]`` table per mapping."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in top.items()]
    for upstream in upstreams:
        lines += ["", "[[upstream]]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in upstream.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def hub_upstream(hub: Registry, **extra: Any) -> dict[str, Any]:
    return {
        "name": "docker.io",
        "url": hub.registry_url,
        "default": True,
        "library_prefix": True,
        "ca": [str(hub.ca_pem)],
        **extra,
    }


def many_upstreams(hub: Registry, ghcr: Registry, company: Registry) -> list[dict[str, Any]]:
    return [
        hub_upstream(hub),
        {"name": "ghcr.io", "url": ghcr.registry_url, "ca": [str(ghcr.ca_pem)], "hosts": [GHCR_HOST]},
        {
            "name": CORP,
            "url": company.registry_url,
            "ca": [str(company.ca_pem)],
            "allow": ["team/**"],
            "deny": ["team/secret*"],
        },
    ]


def config_proxy(workdir: Path, upstreams: Sequence[Mapping[str, Any]], args: Sequence[str] = ()) -> ProxyProcess:
    """A (not yet started) plain-HTTP regproxy on 127.0.0.1 reading ``workdir/regproxy.toml``."""
    config = write_config(workdir / "regproxy.toml", upstreams)
    return ProxyProcess(workdir, "", list(args), tls=False, config=config)


SENTINEL_SCOPE = "repository:regproxy-tests/sentinel:pull"


def tokens_since(registry: Registry, since: int) -> list[dict[str, Any]]:
    """The token-server log entries after index ``since``, once the log has caught up.

    The token server logs a request after answering it; a request of our own,
    straight to its realm, is waited for, so every request the proxy made before
    is in the log by then. The sentinel entries themselves are left out.
    """
    count = sum(SENTINEL_SCOPE in e["scopes_requested"] for e in registry.token_log())
    query = urlencode([("service", registry.service), ("scope", SENTINEL_SCOPE)])
    assert request("GET", f"{registry.token_realm}?{query}", ca=registry.ca_pem).status == 200
    deadline = time.monotonic() + 5
    while sum(SENTINEL_SCOPE in e["scopes_requested"] for e in registry.token_log()) <= count:
        assert time.monotonic() < deadline, f"{registry.label}: the token log never showed the sentinel"
        time.sleep(0.02)
    return [e for e in registry.token_log()[since:] if SENTINEL_SCOPE not in e["scopes_requested"]]
