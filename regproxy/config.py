"""regproxy's configuration: a TOML file, or command-line flags for one upstream.

Everything the proxy does is fixed here, before the first request: which
registries it serves (a closed list: nothing in a request can add one), under
which names, with which credentials and rules. A mistake in the file stops the
start-up with a message naming the key and the problem; unknown keys are
mistakes too (a typo must not silently mean "default").

Every top-level key is the command-line option of the same name with
underscores (C{read_size} for C{--read-size}); upstreams are C{[[upstream]]}
tables. The example, with every key explained, is C{regproxy.example.toml}.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
DOCKER_HUB_ALIASES = ("registry-1.docker.io", "index.docker.io")


class ConfigError(ValueError):
    """A configuration mistake; the message names the key and the problem."""


def is_registry_name(component: str) -> bool:
    """Docker's reference rule: a first name component is a registry if it has a C{.}
    or a C{:} or is C{localhost}."""
    return "." in component or ":" in component or component == "localhost"


@dataclass(frozen=True)
class TagRule:
    """How long a cached tag of the repositories matching C{repositories} (globs) is trusted.

    @ivar fresh: seconds during which it is served without asking the upstream.
    @ivar stale_while_revalidate: seconds after that during which it is served at
        once while one background HEAD revalidates it.
    @ivar max_stale: seconds it may still be served while the upstream can't answer.
    """

    repositories: tuple[str, ...] = ("**",)
    fresh: float = 0.0
    stale_while_revalidate: float = 0.0
    max_stale: float = 86400.0


@dataclass(frozen=True)
class UpstreamConfig:
    """One registry the proxy serves.

    @ivar name: the registry host clients use (C{ghcr.io}): the path prefix
        (C{/v2/ghcr.io/owner/img/...}) and C{?ns=} value that select it.
    @ivar url: where the proxy reaches it.
    @ivar default: serves names without a registry prefix.
    @ivar hosts: C{Host} header values (without port) that select it.
    @ivar aliases: further names for path prefixes and C{?ns=}.
    @ivar library_prefix: one-component names mean C{library/NAME}.
    @ivar ca: extra CA certificate files for its TLS (its realm, its redirects).
    @ivar username: the proxy's own account there.
    @ivar password: that account's password (read from a file or the environment).
    @ivar allow: repository globs clients may use (all if empty).
    @ivar deny: repository globs clients may not use.
    @ivar realm: its token realm, pinned (else learnt from its challenges).
    @ivar realm_hosts: further hosts a learnt realm may be on.
    @ivar redirect_hosts: hosts (globs) redirects may go to (any public host if empty).
    @ivar allow_private_redirects: redirects may reach private/loopback addresses.
    """

    name: str
    url: str
    default: bool = False
    hosts: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    library_prefix: bool = False
    ca: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    realm: str | None = None
    realm_hosts: tuple[str, ...] = ()
    redirect_hosts: tuple[str, ...] = ()
    allow_private_redirects: bool = False
    tags: tuple[TagRule, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that selects this upstream in a path prefix or C{?ns=}."""
        return (self.name, *self.aliases)

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.username is None or self.password is None:
            return None
        return self.username, self.password


@dataclass(frozen=True)
class Config:
    """The whole configuration; see C{regproxy.example.toml} for each key."""

    upstreams: tuple[UpstreamConfig, ...]
    listen: tuple[str, ...] = ("tcp:5000",)
    public_url: str | None = None
    clients: tuple[Network, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()
    cors_origins: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    response_timeout: float = 60.0
    idle_timeout: float = 120.0
    client_timeout: float = 120.0
    header_timeout: float = 30.0
    max_redirects: int = 5
    max_upload_size: int = 0
    read_size: int = 256 << 10
    workers: int = 1
    max_connections: int = 4096
    max_connections_per_client: int = 0
    rate_limit: float = 0.0
    rate_burst: float = 0.0
    #: The pull-through cache's directory (none: no cache) and its size limit (0: none).
    cache_dir: str | None = None
    cache_max_size: int = 0
    #: Blob fills started at once ahead of clients when an image manifest is fetched (0: no prefetch).
    prefetch: int = 4
    #: Threads sending cache hits with sendfile(2) at once; more hits at once go
    #: out through the reactor. 16 held 64 warm clients to 2,960 MB/s, 64 gave
    #: 4,290 MB/s at a third of the CPU (benchmarks/README.md).
    sendfile_threads: int = 64
    #: Operations: the Prometheus listener, the JSON access log, the drain on SIGTERM.
    metrics_listen: str | None = None
    access_log: str | None = None
    drain_timeout: float = 30.0
    #: The file this came from, if any (workers re-read it).
    path: str | None = None

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        for upstream in self.upstreams:
            if upstream.default:
                return upstream
        return None


# sizes

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """C{"20G"} -> bytes; binary units, optional trailing C{B} / C{iB}."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(text)
        return text
    value = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    number = int(value[: len(value) - len(unit)])
    if number < 0:
        raise ValueError(text)
    return number * _SIZE_UNITS[unit]


# reading the file


def parse_networks(items: Sequence[str], key: str) -> tuple[Network, ...]:
    """Addresses or CIDR networks (C{10.0.0.0/8}, C{::1})."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{key}: not an address or CIDR network: {item!r}") from None
    return tuple(out)


def check_url(value: str, key: str) -> str:
    """An http(s) URL without query or fragment, without a trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{key}: not an http(s) URL without query: {value!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{key}: bad port in {value!r}") from None
    return value.rstrip("/")


class _Table:
    """A TOML table being read: typed getters that name the key on error, and a check for leftovers."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self._data = dict(data)
        self._where = where

    def _key(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self._key(key)}: {problem}")

    def take(self, key: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in self._data:
            return default
        value = self._data.pop(key)
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            raise self.error(key, f"expected {_kind_names(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {_kind_names(kinds)}, got {type(value).__name__}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.take(key, (list, str), [])
        items = [value] if isinstance(value, str) else value
        for item in items:
            if not isinstance(item, str):
                raise self.error(key, "expected a list of strings")
        return tuple(items)

    def number(self, key: str, default: float, minimum: float = 0) -> float:
        value = self.take(key, (int, float), default)
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}")
        return float(value)

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.take(key, int, default)
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}")
        return int(value)

    def size(self, key: str, default: int) -> int:
        value = self.take(key, (int, str), default)
        try:
            return parse_size(value)
        except ValueError:
            raise self.error(key, f"not a size: {value!r} (e.g. 512M, 20G)") from None

    def networks(self, key: str) -> tuple[Network, ...]:
        return parse_networks(self.strings(key), self._key(key))

    def finish(self) -> None:
        for key in self._data:
            raise self.error(key, "unknown key")


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        list: "a list",
        dict: "a table",
    }
    seq = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(names.get(k, k.__name__) for k in seq)


def _url(table: _Table, key: str, value: str | None) -> str | None:
    return None if value is None else check_url(value, table._key(key))


def _path(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    return str(Path(value) if os.path.isabs(value) else base / value)


def _log_path(value: str | None, base: Path) -> str | None:
    return value if value in (None, "-") else _path(value, base)


def _password(table: _Table, base: Path) -> str | None:
    path = table.take("password_file", str)
    env = table.take("password_env", str)
    if path is not None and env is not None:
        raise table.error("password_file", "give password_file or password_env, not both")
    if path is not None:
        full = (base / path) if not os.path.isabs(path) else Path(path)
        try:
            return full.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise table.error("password_file", f"cannot read {str(full)!r}: {e.strerror}") from None
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise table.error("password_env", f"the environment variable {env!r} is not set")
        return value
    return None


def _upstream(data: Any, where: str, base: Path) -> UpstreamConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table ([[upstream]])")
    t = _Table(data, where)
    if "password" in data:
        raise t.error("password", "passwords are not read from the config file: use password_file or password_env")
    name = t.take("name", str)
    if not name:
        raise t.error("name", "required (the registry host clients use, e.g. ghcr.io)")
    name = name.lower()
    if not is_registry_name(name) or "/" in name:
        raise t.error("name", f"{name!r} is not a registry host name (it needs a '.' or a ':', or is 'localhost')")
    hub = name == DOCKER_HUB
    url = _url(t, "url", t.take("url", str, DOCKER_HUB_URL if hub else None))
    if url is None:
        raise t.error("url", "required (where the proxy reaches this registry)")
    aliases = tuple(a.lower() for a in t.strings("aliases"))
    for alias in aliases:
        if not is_registry_name(alias):
            raise t.error("aliases", f"{alias!r} is not a registry host name")
    if hub:
        aliases = tuple(dict.fromkeys(aliases + DOCKER_HUB_ALIASES))
    ca = tuple(str((base / p) if not os.path.isabs(p) else Path(p)) for p in t.strings("ca"))
    for path in ca:
        if not Path(path).is_file():
            raise t.error("ca", f"no such file: {path!r}")
    username = t.take("username", str)
    password = _password(t, base)
    if (username is None) != (password is None):
        raise t.error("username", "username and password_file (or password_env) go together")
    realm = t.take("realm", str)
    if realm is not None:
        _url(t, "realm", realm)
    config = UpstreamConfig(
        name=name,
        url=url,
        default=t.take("default", bool, False),
        hosts=tuple(h.lower() for h in t.strings("hosts")),
        aliases=aliases,
        library_prefix=t.take("library_prefix", bool, hub),
        ca=ca,
        username=username,
        password=password,
        allow=t.strings("allow"),
        deny=t.strings("deny"),
        realm=realm,
        realm_hosts=tuple(h.lower() for h in t.strings("realm_hosts")),
        redirect_hosts=tuple(h.lower() for h in t.strings("redirect_hosts")),
        allow_private_redirects=t.take("allow_private_redirects", bool, False),
        tags=_tag_rules(t),
    )
    t.finish()
    return config


def _tag_rules(table: _Table) -> tuple[TagRule, ...]:
    rules = []
    for i, raw in enumerate(table.take("tags", list, [])):
        if not isinstance(raw, dict):
            raise table.error(f"tags[{i}]", "expected a table {repositories = [...], fresh = ..., ...}")
        t = _Table(raw, table._key(f"tags[{i}]"))
        default = TagRule()
        rule = TagRule(
            repositories=t.strings("repositories") or default.repositories,
            fresh=t.number("fresh", default.fresh),
            stale_while_revalidate=t.number("stale_while_revalidate", default.stale_while_revalidate),
            max_stale=t.number("max_stale", default.max_stale),
        )
        t.finish()
        rules.append(rule)
    return tuple(rules)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and check a configuration file.

    @raise ConfigError: naming the file, the key and the problem.
    """
    source = Path(path)
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        return from_mapping(data, source.resolve().parent, str(source.resolve()))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def from_mapping(data: Mapping[str, Any], base: Path = Path("."), path: str | None = None) -> Config:
    """A checked configuration from parsed TOML (relative paths are below C{base})."""
    t = _Table(data, "")
    raw_upstreams = t.take("upstream", list, None)
    if not raw_upstreams:
        raise t.error("upstream", "at least one [[upstream]] table is required")
    upstreams = tuple(_upstream(u, f"upstream[{i}]", base) for i, u in enumerate(raw_upstreams))
    listen = t.strings("listen") or ("tcp:5000",)
    public_url = _url(t, "public_url", t.take("public_url", str))
    defaults = Config(upstreams=())
    config = Config(
        upstreams=upstreams,
        listen=listen,
        public_url=public_url,
        clients=t.networks("clients"),
        trusted_proxies=t.networks("trusted_proxies"),
        cors_origins=t.strings("cors_origins"),
        connect_timeout=t.number("connect_timeout", defaults.connect_timeout),
        response_timeout=t.number("response_timeout", defaults.response_timeout),
        idle_timeout=t.number("idle_timeout", defaults.idle_timeout),
        client_timeout=t.number("client_timeout", defaults.client_timeout),
        header_timeout=t.number("header_timeout", defaults.header_timeout),
        max_redirects=t.integer("max_redirects", defaults.max_redirects),
        max_upload_size=t.size("max_upload_size", defaults.max_upload_size),
        read_size=t.size("read_size", defaults.read_size),
        workers=t.integer("workers", defaults.workers, minimum=1),
        max_connections=t.integer("max_connections", defaults.max_connections),
        max_connections_per_client=t.integer("max_connections_per_client", defaults.max_connections_per_client),
        rate_limit=t.number("rate_limit", defaults.rate_limit),
        rate_burst=t.number("rate_burst", defaults.rate_burst),
        cache_dir=_path(t.take("cache_dir", str), base),
        cache_max_size=t.size("cache_max_size", defaults.cache_max_size),
        prefetch=t.integer("prefetch", defaults.prefetch),
        sendfile_threads=t.integer("sendfile_threads", defaults.sendfile_threads, minimum=1),
        metrics_listen=t.take("metrics_listen", str),
        access_log=_log_path(t.take("access_log", str), base),
        drain_timeout=t.number("drain_timeout", defaults.drain_timeout),
        path=path,
    )
    t.finish()
    check(config)
    return config


def check(config: Config) -> None:
    """Rules across keys: one default, no name or host claimed twice, sane sizes."""
    if not 4096 <= config.read_size <= 16 << 20:
        raise ConfigError("read_size: must be between 4K and 16M")
    if config.sendfile_threads < 1:
        raise ConfigError("sendfile_threads: must be at least 1")
    defaults = [u.name for u in config.upstreams if u.default]
    if len(defaults) > 1:
        raise ConfigError(f"upstream: only one may be the default, not {', '.join(defaults)}")
    seen: dict[str, str] = {}
    for upstream in config.upstreams:
        for name in dict.fromkeys(upstream.names):
            if name in seen:
                raise ConfigError(f"upstream {upstream.name!r}: the name {name!r} already selects {seen[name]!r}")
            seen[name] = upstream.name
    hosts: dict[str, str] = {}
    for upstream in config.upstreams:
        for host in upstream.hosts:
            if host in hosts:
                raise ConfigError(f"upstream {upstream.name!r}: host {host!r} already selects {hosts[host]!r}")
            hosts[host] = upstream.name


def single_upstream(
    url: str,
    *,
    library_prefix: bool | None = None,
    ca: Sequence[str] = (),
    realm: str | None = None,
    realm_hosts: Sequence[str] = (),
    redirect_hosts: Sequence[str] = (),
    allow_private_redirects: bool = False,
) -> UpstreamConfig:
    """The default upstream the command-line flags describe (no config file).

    Docker Hub is named C{docker.io}; any other registry by its URL's host and
    port. With the C{library/} rule on, the upstream also answers for Docker
    Hub's names in C{?ns=} (it stands in for Docker Hub).
    """
    parts = urlsplit(url)
    host = (parts.netloc or "").lower()
    hub = host in (DOCKER_HUB, *DOCKER_HUB_ALIASES)
    prefix = hub if library_prefix is None else library_prefix
    name = DOCKER_HUB if hub else host
    aliases: tuple[str, ...] = ()
    if hub:
        aliases = DOCKER_HUB_ALIASES
    else:
        hostname = (parts.hostname or "").lower()
        if hostname and hostname != host and is_registry_name(hostname):
            aliases = (hostname,)
        if prefix:
            aliases += (DOCKER_HUB, *DOCKER_HUB_ALIASES)
    return UpstreamConfig(
        name=name,
        url=url.rstrip("/"),
        default=True,
        aliases=aliases,
        library_prefix=prefix,
        ca=tuple(ca),
        realm=realm,
        realm_hosts=tuple(realm_hosts),
        redirect_hosts=tuple(redirect_hosts),
        allow_private_redirects=allow_private_redirects,
    )
