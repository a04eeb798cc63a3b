"""Parse: which configured upstream a request is for, and under which names.

A closed-world lookup, in this order: the C{Host} header names an upstream; the
first path component is a registry name (C{/v2/ghcr.io/owner/img/...}, what
containerd's C{override_path}, registries.conf path mirrors and C{docker pull
proxy/ghcr.io/owner/img} send); containerd's C{?ns=}; the default upstream.
Nothing a client sends is ever dialled: an unknown name is a 404 that lists
what the proxy serves. Conflicting selectors are refused.

The L{NameMap} owns every rename between the client's spelling of a repository
and the upstream's (C{ghcr.io/owner/img} <-> C{owner/img}, C{alpine} <->
C{library/alpine}), so the spelling a client used is the one it sees back in
challenges, C{Link}, C{Location} and mount sources.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import parse_qsl

from . import errors, routes
from .config import UpstreamConfig, is_registry_name
from .names import upstream_name

U = TypeVar("U")


@dataclass
class NameMap:
    """Renames between the client's spelling and the upstream's, for one request.

    @ivar prefix: the registry prefix the client put before names (C{"ghcr.io/"}), or C{""}.
    @ivar library_prefix: the upstream's C{library/} rule.
    @ivar spelled: upstream name -> the exact spelling this client used for it.
    """

    prefix: str = ""
    library_prefix: bool = False
    spelled: dict[str, str] = field(default_factory=dict)
    #: For URLs handed back (Location, Link) when the client named the registry
    #: only in C{?ns=}: a path prefix, since clients don't add C{ns} to every
    #: request (containerd's pushes don't) and the URL must still select it.
    url_prefix: str | None = None

    def to_upstream(self, client_name: str) -> str:
        """The upstream's name for a name the client sent (path, scope, mount source)."""
        name = client_name
        if self.prefix and name.startswith(self.prefix):
            name = name[len(self.prefix) :]
        renamed = upstream_name(name, self.library_prefix)
        self.spelled.setdefault(renamed, client_name)
        return renamed

    def to_client(self, name: str) -> str:
        """The client's spelling of an upstream name (what it sent, else prefix + name)."""
        known = self.spelled.get(name)
        if known is not None:
            return known
        return self.prefix + name


@dataclass(frozen=True)
class Selection(Generic[U]):
    """The upstream a request is for and how the client named it."""

    upstream: U
    names: NameMap
    #: The client reached this upstream through its own Host name.
    by_host: bool = False


class UpstreamTable(Generic[U]):
    """The configured upstreams, indexed by every name and host that selects one."""

    def __init__(self, entries: Iterable[tuple[UpstreamConfig, U]]) -> None:
        self._entries = list(entries)
        self._by_name: dict[str, tuple[UpstreamConfig, U]] = {}
        self._by_host: dict[str, tuple[UpstreamConfig, U]] = {}
        self._default: tuple[UpstreamConfig, U] | None = None
        for config, upstream in self._entries:
            for name in config.names:
                self._by_name[name] = (config, upstream)
            for host in config.hosts:
                self._by_host[host] = (config, upstream)
            if config.default:
                self._default = (config, upstream)

    @property
    def upstreams(self) -> Sequence[U]:
        return [u for _, u in self._entries]

    @property
    def configs(self) -> Sequence[UpstreamConfig]:
        return [c for c, _ in self._entries]

    @property
    def default(self) -> U | None:
        return None if self._default is None else self._default[1]

    def served(self) -> str:
        names = [c.name + (" (default)" if c.default else "") for c, _ in self._entries]
        return ", ".join(names)

    def by_name(self, name: str) -> tuple[UpstreamConfig, U] | None:
        return self._by_name.get(name.lower())

    def by_host(self, host_header: bytes | None) -> tuple[UpstreamConfig, U] | None:
        if not host_header or not self._by_host:
            return None
        host = host_header.decode("latin-1").strip().lower()
        found = self._by_host.get(host)
        if found is None and not host.startswith("["):
            found = self._by_host.get(host.rpartition(":")[0] or host)
        elif found is None:
            found = self._by_host.get(host.partition("]")[0] + "]")
        return found

    def unknown(self, name: str) -> errors.RegistryError:
        return errors.RegistryError(
            404, "NAME_UNKNOWN", f"this proxy does not serve the registry {name!r}; it serves: {self.served()}"
        )

    # selection

    def select(self, host_header: bytes | None, route: routes.Route, query: bytes) -> tuple[Selection[U], routes.Route]:
        """The upstream for a registry API request, and the route with the upstream-side name.

        @raise errors.RegistryError: unknown registry name, conflicting selectors, no default.
        """
        chosen = self.by_host(host_header)
        by_host = chosen is not None
        prefix = ""
        name = route.name
        if chosen is None and name is not None:
            first, sep, rest = name.partition("/")
            if sep and is_registry_name(first):
                chosen = self.by_name(first)
                if chosen is None:
                    raise self.unknown(first)
                prefix = first + "/"
        namespace = _namespace(query)
        by_namespace = False
        if namespace is not None:
            named = self.by_name(namespace)
            if named is None:
                raise self.unknown(namespace)
            if chosen is not None and named[1] is not chosen[1]:
                raise errors.RegistryError(
                    400,
                    "DENIED",
                    f"?ns={namespace} names {named[0].name!r} but the request is for {chosen[0].name!r}",
                )
            by_namespace = chosen is None
            chosen = named
        if chosen is None:
            chosen = self._default
            if chosen is None:
                raise errors.RegistryError(
                    404,
                    "NAME_UNKNOWN",
                    f"name the registry in the path (/v2/REGISTRY/NAME/...); this proxy serves: {self.served()}",
                )
        config, upstream = chosen
        names = NameMap(prefix, config.library_prefix)
        if by_namespace and not config.default:
            names.url_prefix = config.name + "/"
        if name is not None:
            up = names.to_upstream(name)
            route = routes.Route(route.kind, up, route.reference)
        return Selection(upstream, names, by_host), route

    def select_for_token(
        self, host_header: bytes | None, suffix: str, scope_names: Sequence[str]
    ) -> tuple[Selection[U], set[str]]:
        """The upstream a token request is for: Host, C{/token/<name>}, the first scope's prefix, the default.

        @return: the selection, and the scope names that belong to another upstream (to be dropped).
        """
        chosen = self.by_host(host_header)
        by_host = chosen is not None
        if suffix:
            named = self.by_name(suffix)
            if named is None:
                raise self.unknown(suffix)
            if chosen is not None and named[1] is not chosen[1]:
                raise errors.RegistryError(400, "DENIED", f"/token/{suffix} is not for this host's registry")
            chosen = named
        prefixed: dict[str, tuple[UpstreamConfig, U] | None] = {}
        for name in scope_names:
            first, sep, _ = name.partition("/")
            if sep and is_registry_name(first):
                prefixed[name] = self.by_name(first)
        if chosen is None and scope_names:
            # The first scope names the registry (docker puts a mount's target
            # first, its source after); an unprefixed one means the default.
            first_name = scope_names[0]
            if first_name in prefixed:
                chosen = prefixed[first_name]
                if chosen is None:
                    raise self.unknown(first_name.partition("/")[0])
        if chosen is None:
            chosen = self._default
            if chosen is None:
                raise errors.RegistryError(404, "NAME_UNKNOWN", f"no registry named; this proxy serves: {self.served()}")
        config, upstream = chosen
        foreign = set()
        prefix = ""
        for name in scope_names:
            if name in prefixed:
                if prefixed[name] is None or prefixed[name][1] is not upstream:  # type: ignore[index]
                    foreign.add(name)
                else:
                    prefix = name.partition("/")[0] + "/"
            elif not config.default and not by_host and not suffix:
                foreign.add(name)  # an unprefixed name is the default upstream's
        names = NameMap(prefix if not by_host else "", config.library_prefix)
        return Selection(upstream, names, by_host), foreign


def _namespace(query: bytes) -> str | None:
    """containerd's C{?ns=} (the registry it mirrors), if given."""
    if b"ns=" not in query:
        return None
    for key, value in parse_qsl(query.decode("latin-1")):
        if key == "ns":
            return value.lower()
    return None
