"""Pure header plumbing between client, proxy and upstream.

Kept free of I/O so every rule (hop-by-hop, what may cross to another host, how
URLs the upstream hands out are made to point at the proxy) is unit-testable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from twisted.web.http_headers import Headers

#: RFC 9110 hop-by-hop headers plus the ones the Agent/Site frame themselves.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Never copied from the client: the Agent sets Host and frames the body itself.
_NOT_FORWARDED = _HOP_BY_HOP | {b"host", b"content-length", b"expect"}
#: Headers that are about the upstream's own domain or origin, not about the
#: content: passed on, they would set cookies, pin HSTS, advertise QUIC or grant
#: CORS on the proxy's domain in the upstream's name.
UPSTREAM_DOMAIN_HEADERS = frozenset(
    {
        b"set-cookie",
        b"set-cookie2",
        b"strict-transport-security",
        b"alt-svc",
        b"public-key-pins",
        b"public-key-pins-report-only",
        b"expect-ct",
        b"nel",
        b"report-to",
        b"reporting-endpoints",
        b"clear-site-data",
        b"content-security-policy",
        b"content-security-policy-report-only",
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-expose-headers",
        b"access-control-max-age",
    }
)
#: Never copied from the upstream response: twisted.web frames the answer itself.
_NOT_RETURNED = _HOP_BY_HOP | {b"content-length"} | UPSTREAM_DOMAIN_HEADERS
#: Credentials that must not follow a redirect to another origin (presigned
#: blob-store URLs reject them, and they belong to the registry only).
CREDENTIAL_HEADERS = frozenset({b"authorization", b"cookie", b"proxy-authorization"})


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def filtered(headers: Headers, drop: Iterable[bytes]) -> Headers:
    """A copy of C{headers} without C{drop} and without what C{Connection} names."""
    dropped = set(drop) | _connection_tokens(headers)
    out = Headers()
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in dropped:
            out.setRawHeaders(name, list(values))
    return out


def upstream_request_headers(client: Headers) -> Headers:
    """Headers to send upstream for a client request: all end-to-end headers, every value kept.

    Docker sends six separate C{Accept} headers; dropping all but one makes the
    registry answer with a different manifest (and digest), so values are copied
    one for one.
    """
    return filtered(client, _NOT_FORWARDED)


def client_response_headers(upstream: Headers) -> Headers:
    """Headers to return to the client from an upstream response."""
    out = filtered(upstream, _NOT_RETURNED)
    # Never pass on an empty Content-Encoding (some HTTP stacks invent one);
    # a real one stays, the bytes are passed through untouched anyway.
    encodings = [v for v in out.getRawHeaders(b"content-encoding", []) if v.strip()]
    if encodings:
        out.setRawHeaders(b"content-encoding", encodings)
    else:
        out.removeHeader(b"content-encoding")
    return out


def without_credentials(headers: Headers) -> Headers:
    """A copy of C{headers} fit to send to a host other than the registry."""
    return filtered(headers, CREDENTIAL_HEADERS)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an absolute http(s) URL, or C{None}."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def rename_path(path: str, renames: dict[str, str], name_prefix: str = "") -> str:
    """Give C{/v2/<upstream name>/...} paths the name the client used.

    C{renames} holds the exact spellings this client used; any other name of
    the upstream gets the registry prefix the client put before names
    (C{ghcr.io/}), if any.
    """
    for upstream_name, client_name in renames.items():
        prefix = f"/v2/{upstream_name}/"
        if path.startswith(prefix):
            return f"/v2/{client_name}/" + path[len(prefix) :]
    if name_prefix and path.startswith("/v2/") and len(path) > 4 and not path.startswith("/v2/_catalog"):
        return "/v2/" + name_prefix + path[4:]
    return path


def rewrite_url(
    url: str,
    upstream_origin: tuple[str, str, int],
    upstream_prefix: str,
    public_base: str,
    renames: dict[str, str],
    name_prefix: str = "",
) -> str:
    """Make a URL the upstream handed out (Location, Link) point at the proxy.

    Absolute URLs at the upstream's origin become absolute URLs at C{public_base};
    relative ones stay relative. Only the path changes: the query (an upload's
    C{_state}) is kept byte for byte. URLs for other hosts, and URLs too
    malformed to parse (an unbalanced C{[}), are returned as they are. The URL
    is cut into parts here rather than by C{urlsplit}, which silently drops
    tabs and newlines and would shift everything after them.
    """
    authority = _authority_start(url)
    if authority is not None:
        try:
            if origin(url) != upstream_origin:
                return url
        except ValueError:
            return url
        path_start = _first_of(url, "/?#", authority)
        head = public_base.rstrip("/")
    else:
        path_start = 0
        head = ""
    path_end = _first_of(url, "?#", path_start)
    path = url[path_start:path_end]
    if upstream_prefix and path.startswith(upstream_prefix + "/"):
        path = path[len(upstream_prefix) :]
    return head + rename_path(path, renames, name_prefix) + url[path_end:]


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _authority_start(url: str) -> int | None:
    """Where the host of an absolute (C{scheme://}) or network-path (C{//}) URL starts; C{None} if relative."""
    if url.startswith("//"):
        return 2
    scheme, sep, _ = url.partition("://")
    if sep and _SCHEME.fullmatch(scheme):
        return len(scheme) + 3
    return None


def _first_of(text: str, characters: str, start: int) -> int:
    found = [i for i in (text.find(c, start) for c in characters) if i >= 0]
    return min(found) if found else len(text)


def rewrite_link(value: str, rewrite: Callable[[str], str]) -> str:
    """Rewrite the URI references C{<...>} of an RFC 8288 C{Link} header value."""
    out = []
    rest = value
    while True:
        start = rest.find("<")
        end = rest.find(">", start + 1)
        if start < 0 or end < 0:
            out.append(rest)
            break
        out.append(rest[: start + 1])
        out.append(rewrite(rest[start + 1 : end]))
        rest = rest[end:]
    return "".join(out)
