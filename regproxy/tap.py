"""The C{twist regproxy} command line and the service it builds.

Without C{--config}, the flags describe one default upstream (Docker Hub unless
C{--upstream} says otherwise). With C{--config FILE}, the file declares the
upstreams; the server-wide flags (listeners, timeouts, limits) still apply and
override the file's values when given.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet import tcp, threads
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from . import config as configuration
from . import tlsrecords
from .accesslog import AccessLog
from .cache.blobs import BlobCache
from .cache.manifests import ManifestCache
from .cache.sendfile import Sendfile
from .cache.store import Store
from .channel import ChannelLimits, Drain, RegistrySite, graceful_sigterm
from .config import Config, ConfigError, UpstreamConfig, parse_size
from .malloc import pin_thresholds
from .metrics import MULTIPROCESS_ENV, Metrics, MetricsPage
from .resource import RegistryProxy, Served, Settings
from .tls import policy_for
from .upstream import OriginEndpoints, Upstream
from .upstream import policy_for as outbound_policy_for
from .upstream.pool import QuietPool
from .upstream.tokens import UpstreamTokens
from .workers import Listener, WorkerSupervisor, enable_reuse_port

DEFAULT_UPSTREAM = configuration.DOCKER_HUB_URL
log = Logger()

__all__ = ["Options", "makeService", "parse_size", "worker_args"]

#: Flags that describe the one upstream of a flag-only configuration.
_UPSTREAM_FLAGS = ("upstream", "upstream-ca", "library-prefix", "realm", "realm-host", "redirect-host",
                   "allow-private-redirects", "upstream-username", "upstream-password-file")
#: Server-wide parameters: flag name -> Config field.
_SERVER_PARAMETERS = {
    "public-url": "public_url",
    "connect-timeout": "connect_timeout",
    "response-timeout": "response_timeout",
    "idle-timeout": "idle_timeout",
    "client-timeout": "client_timeout",
    "header-timeout": "header_timeout",
    "max-redirects": "max_redirects",
    "max-upload-size": "max_upload_size",
    "read-size": "read_size",
    "workers": "workers",
    "max-connections": "max_connections",
    "max-connections-per-client": "max_connections_per_client",
    "rate-limit": "rate_limit",
    "rate-burst": "rate_burst",
    "cache-dir": "cache_dir",
    "cache-max-size": "cache_max_size",
    "prefetch": "prefetch",
    "sendfile-threads": "sendfile_threads",
    "metrics-listen": "metrics_listen",
    "access-log": "access_log",
    "drain-timeout": "drain_timeout",
}
_LIST_OPTIONS = ("cors-origin", "client", "trusted-proxy", "realm-host", "redirect-host", "upstream-ca")


class Options(usage.Options):
    """Options for C{twist regproxy}."""

    synopsis = "[options]"
    longdesc = (
        "A streaming Docker/OCI registry mirror. Point docker's registry-mirrors, "
        "containerd's hosts.toml or podman's registries.conf at it, or pull "
        "PROXY/library/NAME:TAG or PROXY/REGISTRY/NAME:TAG directly. "
        "With --config FILE, the file declares the registries served (see regproxy.example.toml)."
    )
    optParameters: list[Any] = [
        ["config", "c", None, "TOML file declaring listeners, upstreams and rules (regproxy.example.toml)."],
        ["upstream", None, DEFAULT_UPSTREAM, "Upstream registry URL (without --config)."],
        ["upstream-username", None, None, "The proxy's own account at the upstream (without --config)."],
        ["upstream-password-file", None, None, "File holding that account's password (without --config)."],
        ["public-url", None, None, "URL clients use to reach the proxy (default: from each request's Host)."],
        ["connect-timeout", None, 10.0, "Seconds to wait for an upstream connection.", float],
        ["response-timeout", None, 60.0, "Seconds to wait for an upstream response head.", float],
        ["idle-timeout", None, 120.0, "Seconds an upstream body may stay silent.", float],
        ["client-timeout", None, 120.0, "Seconds a client may leave a download unread before it is dropped.", float],
        ["header-timeout", None, 30.0, "Seconds a client may take to send a request head.", float],
        ["max-redirects", None, 5, "Upstream redirects followed per request.", int],
        ["max-upload-size", None, "0", "Largest blob upload request body, e.g. 20G (0: no limit)."],
        ["read-size", None, "256K", "Bytes read from a socket at a time, and buffered per connection before pausing."],
        ["workers", None, 1, "Processes sharing the listening ports (one per core is a good start).", int],
        ["max-connections", None, 4096, "Client connections open at once (0: no limit).", int],
        ["max-connections-per-client", None, 0, "Connections open at once per client address (0: no limit).", int],
        ["rate-limit", None, 0.0, "Requests per second per client address (0: no limit).", float],
        ["rate-burst", None, 0.0, "Requests a client may make at once above the rate (default: twice the rate).", float],
        ["cache-dir", None, None, "Directory of the pull-through blob cache (default: no cache)."],
        ["cache-max-size", None, "0", "Bytes the cache may hold, e.g. 100G (0: as much as the disk takes)."],
        ["prefetch", None, 4, "Blob fills started ahead of clients per image manifest fetched (0: none).", int],
        ["sendfile-threads", None, 64, "Cache hits sent with sendfile(2) at once (more go through the reactor).", int],
        ["metrics-listen", None, None, "Endpoint serving Prometheus /metrics, e.g. tcp:9090:interface=127.0.0.1."],
        ["access-log", None, None, "File for the JSON access log, one line per request (- for stdout)."],
        ["drain-timeout", None, 30.0, "Seconds transfers in flight may take to finish after SIGTERM.", float],
    ]
    optFlags: list[Any] = [
        ["worker", None, "(internal) run as an extra process of a --workers proxy"],
        ["allow-private-redirects", None, "Follow upstream redirects to private and loopback addresses too."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["library-prefix"] = None
        self["realm"] = None
        for name in _LIST_OPTIONS:
            self[name] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:5000 or ssl:443:privateKey=key.pem:certKey=cert.pem (repeatable) [default: tcp:5000]"""
        self["listen"].append(description)

    def opt_upstream_ca(self, path: str) -> None:
        """PEM file of extra CA certificates trusted for outbound TLS, besides the system roots (repeatable)."""
        self["upstream-ca"].append(path)

    def opt_library_prefix(self) -> None:
        """One-component repository names mean library/NAME (default: on for Docker Hub)."""
        self["library-prefix"] = True

    def opt_no_library_prefix(self) -> None:
        """Never add library/ to repository names."""
        self["library-prefix"] = False

    def opt_realm(self, url: str) -> None:
        """Pin the upstream's token realm (default: learnt from the upstream's own challenges)."""
        self["realm"] = url

    def opt_realm_host(self, host: str) -> None:
        """A host (glob) the upstream's token realm may be on, besides the upstream's own domain (repeatable)."""
        self["realm-host"].append(host)

    def opt_redirect_host(self, host: str) -> None:
        """Follow upstream redirects only to hosts matching these globs (repeatable; default: any public host)."""
        self["redirect-host"].append(host)

    def opt_cors_origin(self, origin: str) -> None:
        """A browser origin allowed to read the proxy's answers (CORS), e.g. https://ui.example (repeatable)."""
        self["cors-origin"].append(origin)

    def opt_client(self, network: str) -> None:
        """Serve only clients in this address or CIDR network (repeatable; default: everyone)."""
        self["client"].append(network)

    def opt_trusted_proxy(self, network: str) -> None:
        """Believe X-Forwarded-For from this address or network (a TLS terminator) (repeatable)."""
        self["trusted-proxy"].append(network)

    def postOptions(self) -> None:
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        try:
            self["config"] = self._config()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        try:
            self["tls-policies"] = {u.name: policy_for(list(u.ca)) for u in self["config"].upstreams}
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"CA certificates: {e}") from None

    def _given(self, name: str) -> bool:
        """Whether a flag was given (differs from its default)."""
        if name in _LIST_OPTIONS or name == "listen":
            return bool(self[name])
        if name in ("library-prefix", "realm"):
            return self[name] is not None
        for row in self.optParameters:
            if row[0] == name:
                default = row[2]
                coerce = row[4] if len(row) > 4 else None
                return bool(self[name] != (coerce(default) if coerce and default is not None else default))
        return bool(self[name])

    def _config(self) -> Config:
        """The configuration: the file's (or the flags' one upstream), with server-wide flags on top."""
        changes: dict[str, Any] = {}
        for flag, key in _SERVER_PARAMETERS.items():
            if self._given(flag):
                value = self[flag]
                if flag in ("max-upload-size", "read-size", "cache-max-size"):
                    try:
                        value = parse_size(value)
                    except ValueError:
                        raise ConfigError(f"--{flag}: not a size: {value!r}") from None
                if flag == "public-url":
                    value = configuration.check_url(value, "--public-url")
                if flag == "cache-dir" or (flag == "access-log" and value != "-"):
                    value = os.path.abspath(value)
                changes[key] = value
        if self["listen"]:
            changes["listen"] = tuple(self["listen"])
        if self["cors-origin"]:
            changes["cors_origins"] = tuple(self["cors-origin"])
        if self["client"]:
            changes["clients"] = configuration.parse_networks(self["client"], "--client")
        if self["trusted-proxy"]:
            changes["trusted_proxies"] = configuration.parse_networks(self["trusted-proxy"], "--trusted-proxy")
        path = self["config"]
        if path:
            given = [f for f in _UPSTREAM_FLAGS if self._given(f)]
            if given:
                raise ConfigError(f"--{given[0]} describes the one upstream of a setup without --config: use [[upstream]]")
            config = replace(configuration.load(path), **changes)
        else:
            config = Config(upstreams=(self._flag_upstream(),), **changes)
        configuration.check(config)
        return config

    def _flag_upstream(self) -> UpstreamConfig:
        url = configuration.check_url(self["upstream"], "--upstream")
        if self["realm"] is not None:
            configuration.check_url(self["realm"], "--realm")
        for path in self["upstream-ca"]:
            if not os.path.isfile(path):
                raise ConfigError(f"--upstream-ca: no such file: {path!r}")
        upstream = configuration.single_upstream(
            url,
            library_prefix=self["library-prefix"],
            ca=self["upstream-ca"],
            realm=self["realm"],
            realm_hosts=self["realm-host"],
            redirect_hosts=self["redirect-host"],
            allow_private_redirects=bool(self["allow-private-redirects"]),
        )
        username, password_file = self["upstream-username"], self["upstream-password-file"]
        if (username is None) != (password_file is None):
            raise ConfigError("--upstream-username and --upstream-password-file go together")
        if username is not None:
            try:
                with open(password_file, encoding="utf-8") as f:
                    password = f.read().rstrip("\r\n")
            except OSError as e:
                raise ConfigError(f"--upstream-password-file: cannot read {password_file!r}: {e.strerror}") from None
            upstream = replace(upstream, username=username, password=password)
        return upstream


def build_upstream(config: UpstreamConfig, settings: Config, tls: Any, reactor: Any) -> Served:
    """One upstream's client side: its own pools, endpoints (under its outbound policy) and tokens."""
    pool = QuietPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 32
    pool.cachedConnectionTimeout = 60
    body_pool = QuietPool(reactor, persistent=False)
    policy = outbound_policy_for(config)
    endpoints = OriginEndpoints(reactor, tls, settings.connect_timeout, policy)

    def agent(pool: HTTPConnectionPool) -> Agent:
        made: Agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        return made

    upstream = Upstream(
        config,
        agent(pool),
        reactor,
        body_agent=agent(body_pool),
        response_timeout=settings.response_timeout,
        max_redirects=settings.max_redirects,
        policy=policy,
        trusted_origins=endpoints.trusted,
    )
    if config.credentials is not None and not config.allow:
        log.warn(
            "upstream {name}: the proxy's own account ({user}) is used for every client that brings no "
            "credentials, on every repository it can read: set allow = [...] to limit that",
            name=config.name,
            user=config.username,
        )
    served = Served(config, upstream, UpstreamTokens(upstream, reactor, config.credentials))
    served.pools = [pool, body_pool]
    return served


def _fsync_in_thread(reactor: Any) -> Callable[[int], Awaitable[None]]:
    """Flush a verified blob to disk before it is renamed into the store, off the reactor thread."""

    async def sync(fd: int) -> None:
        await threads.deferToThreadPool(reactor, reactor.getThreadPool(), os.fsync, fd)

    return sync


def send_limit(read_size: int) -> int:
    """Bytes a writable socket takes per send(2): four chunks, a full write buffer at once."""
    return 4 * read_size


def makeService(options: Options, reactor: Any = None) -> IService:
    """Build the listening services for the parsed C{options}."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config: Config = options["config"]
    # Twisted reads 64 KiB per recv() and pauses a producer once 64 KiB wait to
    # be written; per-chunk overhead dominates the proxy's CPU per GiB, so fewer,
    # larger chunks are measurably cheaper (benchmarks/README.md). Process-wide:
    # it applies to client and upstream sockets alike.
    tcp.Connection.bufferSize = config.read_size
    # And each writable socket takes up to four chunks per send(2), not
    # Twisted's 128 KiB: a full write buffer drains in one call instead of
    # several reactor rounds (plain-TCP CPU per GiB 0.89 s -> 0.64 s, paired runs).
    tcp.Connection.SEND_LIMIT = send_limit(config.read_size)
    pin_thresholds(config.read_size)
    tlsrecords.install()
    served = [build_upstream(u, config, options["tls-policies"][u.name], reactor) for u in config.upstreams]
    settings = Settings(
        public_url=config.public_url,
        idle_timeout=config.idle_timeout,
        client_timeout=config.client_timeout,
        cors_origins=frozenset(config.cors_origins),
        clients=config.clients,
        trusted_proxies=config.trusted_proxies,
        rate_limit=config.rate_limit,
        rate_burst=config.rate_burst,
    )
    limits = ChannelLimits(
        header_timeout=config.header_timeout,
        max_connections=config.max_connections,
        max_connections_per_client=config.max_connections_per_client,
    )
    if config.metrics_listen and config.workers > 1 and not options["worker"] and MULTIPROCESS_ENV not in os.environ:
        # Before prometheus_client is first imported: every worker writes into this directory.
        os.environ[MULTIPROCESS_ENV] = tempfile.mkdtemp(prefix="regproxy-metrics-")
        atexit.register(shutil.rmtree, os.environ[MULTIPROCESS_ENV], True)
    metrics = Metrics() if config.metrics_listen or options["worker"] and os.environ.get(MULTIPROCESS_ENV) else None
    cache = manifests = None
    if config.cache_dir:
        store = Store(config.cache_dir, config.cache_max_size)
        cache = BlobCache(
            store,
            reactor,
            config.idle_timeout,
            sync=_fsync_in_thread(reactor),
            response_timeout=config.response_timeout,
            sender=Sendfile(reactor, threads_max=config.sendfile_threads, stall_timeout=config.client_timeout),
        )
        manifests = ManifestCache(store, cache, reactor, prefetch=config.prefetch)
    access_log = AccessLog(config.access_log) if config.access_log else None
    proxy = RegistryProxy(served, reactor, settings, cache, manifests, metrics, access_log)
    if metrics is not None:
        for entry in served:
            entry.upstream.metrics = metrics
            entry.tokens.metrics = metrics
        if cache is not None and manifests is not None:
            cache.metrics = manifests.metrics = manifests.budgets.metrics = metrics
            if cache.sender is not None:
                cache.sender.metrics = metrics
            cache.store.on_evict = metrics.evictions.inc
    site = RegistrySite(proxy, reactor=reactor, limits=limits)
    site.access_log = proxy.channel_answer
    site.max_upload_size = config.max_upload_size
    site.displayTracebacks = False
    parent = MultiService()
    if config.workers > 1 or options["worker"]:
        enable_reuse_port()
    drain = Drain(reactor, proxy, site, config.drain_timeout, [p for entry in served for p in entry.pools])
    if hasattr(reactor, "addSystemEventTrigger"):
        reactor.addSystemEventTrigger("after", "startup", graceful_sigterm, reactor)
    drain.setServiceParent(parent)
    listeners = [Listener(reactor, description, site) for description in config.listen]
    for listener in listeners:
        listener.setServiceParent(parent)
    proxy.readiness.append(lambda: None if all(each.port is not None for each in listeners) else "not listening yet")
    if cache is not None:
        directory = cache.store.root
        proxy.readiness.append(lambda: None if os.access(directory, os.W_OK) else f"cache directory {directory} not writable")
    if config.metrics_listen and not options["worker"]:
        assert metrics is not None
        page = MetricsPage(metrics, before=(lambda: metrics.cache_size.set(cache.store.total_size())) if cache else None)
        Listener(reactor, config.metrics_listen, Site(page)).setServiceParent(parent)
    if config.workers > 1 and not options["worker"]:
        WorkerSupervisor(
            reactor, listeners, config.workers, lambda listen: worker_args(options, listen)
        ).setServiceParent(parent)
    return parent


def worker_args(options: Options, listen: list[str]) -> list[str]:
    """The command line of an extra worker: this process's options, bound ports instead of --listen."""
    args: list[str] = []
    for description in listen:
        args += ["--listen", description]
    config: Config = options["config"]
    if config.path:
        args += ["--config", config.path]
    for row in Options.optParameters:
        name = row[0]
        if name in ("config", "workers") or not options._given(name):
            continue
        value = options[name]
        if name == "metrics-listen":
            continue  # the first process alone serves the workers' metrics
        if name.endswith("-file") or name in ("upstream-ca", "cache-dir") or (name == "access-log" and value != "-"):
            value = os.path.abspath(value)
        args += [f"--{name}", str(value)]
    for name in _LIST_OPTIONS:
        for value in options[name]:
            args += [f"--{name}", os.path.abspath(value) if name == "upstream-ca" else value]
    if options["library-prefix"] is not None:
        args.append("--library-prefix" if options["library-prefix"] else "--no-library-prefix")
    if options["realm"]:
        args += ["--realm", options["realm"]]
    if options["allow-private-redirects"]:
        args.append("--allow-private-redirects")
    return args + ["--worker"]
