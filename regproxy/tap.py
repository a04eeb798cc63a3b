"""The C{twist regproxy} command line and the service it builds."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet import tcp
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from .channel import ChannelLimits, RegistrySite
from .headers import origin
from .outbound import OutboundPolicy
from .resource import RegistryProxy, Settings
from .tls import policy_for
from .upstream import OriginEndpoints, Upstream
from .workers import Listener, WorkerSupervisor, enable_reuse_port

DEFAULT_UPSTREAM = "https://registry-1.docker.io"


class Options(usage.Options):
    """Options for C{twist regproxy}."""

    synopsis = "[options]"
    longdesc = (
        "A streaming Docker/OCI registry proxy. Point docker's registry-mirrors, "
        "containerd's hosts.toml or podman's registries.conf at it, or pull "
        "PROXY/library/NAME:TAG directly."
    )
    optParameters: list[Any] = [
        ["upstream", None, DEFAULT_UPSTREAM, "Upstream registry URL."],
        ["public-url", None, None, "URL clients use to reach the proxy (default: from each request's Host)."],
        ["connect-timeout", None, 10.0, "Seconds to wait for an upstream connection.", float],
        ["response-timeout", None, 60.0, "Seconds to wait for an upstream response head.", float],
        ["idle-timeout", None, 120.0, "Seconds an upstream body may stay silent.", float],
        ["max-redirects", None, 5, "Upstream redirects followed per request.", int],
        ["max-upload-size", None, "0", "Largest blob upload request body, e.g. 20G (0: no limit)."],
        ["read-size", None, "256K", "Bytes read from a socket at a time, and buffered per connection before pausing."],
        ["workers", None, 1, "Processes sharing the listening ports (one per core is a good start).", int],
        ["client-timeout", None, 120.0, "Seconds a client may leave a download unread before it is dropped.", float],
        ["header-timeout", None, 30.0, "Seconds a client may take to send a request head.", float],
        ["max-connections", None, 4096, "Client connections open at once (0: no limit).", int],
        ["max-connections-per-client", None, 0, "Connections open at once per client address (0: no limit).", int],
    ]
    optFlags: list[Any] = [
        ["worker", None, "(internal) run as an extra process of a --workers proxy"],
        ["allow-private-redirects", None, "Follow upstream redirects to private and loopback addresses too."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["upstream-ca"] = []
        self["library-prefix"] = None
        self["realm"] = None
        self["realm-host"] = []
        self["redirect-host"] = []
        self["cors-origin"] = []

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

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"].append("tcp:5000")
        if not self["upstream"].startswith(("http://", "https://")):
            raise usage.UsageError(f"--upstream must be an http(s) URL: {self['upstream']!r}")
        if self["public-url"] and not self["public-url"].startswith(("http://", "https://")):
            raise usage.UsageError("--public-url must be an http(s) URL")
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        for name in ("max-upload-size", "read-size"):
            try:
                self[name] = parse_size(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name}: not a size: {self[name]!r}") from None
        if not 4096 <= self["read-size"] <= 16 << 20:
            raise usage.UsageError("--read-size must be between 4K and 16M")
        try:
            self["tls-policy"] = policy_for(self["upstream-ca"])
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--upstream-ca: {e}") from None
        self["outbound"] = OutboundPolicy(
            self["upstream"],
            realm_hosts=tuple(self["realm-host"]),
            pinned_realm=self["realm"],
            redirect_hosts=tuple(self["redirect-host"]),
            allow_private_redirects=bool(self["allow-private-redirects"]),
        )
        if self["realm"] is not None:
            problem = self["outbound"].realm_problem(self["realm"])
            if problem is not None and (origin(self["realm"]) is None or not self["realm"].isascii()):
                raise usage.UsageError(f"--realm: {problem}")


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """C{"20G"} -> bytes; binary units, optional trailing C{B} / C{iB}."""
    value = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    number = int(value[: len(value) - len(unit)])
    if number < 0:
        raise ValueError(text)
    return number * _SIZE_UNITS[unit]


class _QuietFactory(_HTTP11ClientFactory):
    """The pool's per-connection factory, minus a log line per upstream connection."""

    noisy = False


class QuietPool(HTTPConnectionPool):
    _factory = _QuietFactory


def makeService(options: Options, reactor: Any = None) -> IService:
    """Build the listening services for the parsed C{options}."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    # Twisted reads 64 KiB per recv() and pauses a producer once 64 KiB wait to
    # be written; per-chunk overhead dominates the proxy's CPU per GiB, so fewer,
    # larger chunks are measurably cheaper (benchmarks/README.md). Process-wide:
    # it applies to client and upstream sockets alike.
    tcp.Connection.bufferSize = options["read-size"]
    pool = QuietPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 32
    pool.cachedConnectionTimeout = 60

    endpoints = OriginEndpoints(reactor, options["tls-policy"], options["connect-timeout"], options["outbound"])

    def agent(pool: HTTPConnectionPool) -> Agent:
        made: Agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        return made

    upstream = Upstream.configured(
        options["upstream"],
        options["library-prefix"],
        agent(pool),
        reactor,
        body_agent=agent(QuietPool(reactor, persistent=False)),
        response_timeout=options["response-timeout"],
        max_redirects=options["max-redirects"],
        policy=options["outbound"],
        trusted_origins=endpoints.trusted,
    )
    settings = Settings(
        public_url=options["public-url"],
        idle_timeout=options["idle-timeout"],
        client_timeout=options["client-timeout"],
        cors_origins=frozenset(options["cors-origin"]),
    )
    limits = ChannelLimits(
        header_timeout=options["header-timeout"],
        max_connections=options["max-connections"],
        max_connections_per_client=options["max-connections-per-client"],
    )
    site = RegistrySite(RegistryProxy(upstream, reactor, settings), reactor=reactor, limits=limits)
    site.max_upload_size = options["max-upload-size"]
    site.displayTracebacks = False
    parent = MultiService()
    if options["workers"] > 1 or options["worker"]:
        enable_reuse_port()
    listeners = [Listener(reactor, description, site) for description in options["listen"]]
    for listener in listeners:
        listener.setServiceParent(parent)
    if options["workers"] > 1 and not options["worker"]:
        WorkerSupervisor(
            reactor, listeners, options["workers"], lambda listen: worker_args(options, listen)
        ).setServiceParent(parent)
    return parent


def worker_args(options: Options, listen: list[str]) -> list[str]:
    """The command line of an extra worker: this process's configuration, bound ports."""
    args: list[str] = []
    for description in listen:
        args += ["--listen", description]
    args += ["--upstream", options["upstream"]]
    for path in options["upstream-ca"]:
        args += ["--upstream-ca", os.path.abspath(path)]
    if options["public-url"]:
        args += ["--public-url", options["public-url"]]
    if options["library-prefix"] is not None:
        args.append("--library-prefix" if options["library-prefix"] else "--no-library-prefix")
    if options["realm"]:
        args += ["--realm", options["realm"]]
    for name in ("realm-host", "redirect-host", "cors-origin"):
        for value in options[name]:
            args += [f"--{name}", value]
    if options["allow-private-redirects"]:
        args.append("--allow-private-redirects")
    # Every other option, from the table itself, so a new one can't be forgotten here.
    handled = {"upstream", "public-url", "workers"}
    for name, *_ in Options.optParameters:
        if name not in handled:
            args += [f"--{name}", str(options[name])]
    return args + ["--worker"]
