"""Header plumbing: hop-by-hop, credentials across hosts, URL rewriting."""

from __future__ import annotations

from twisted.web.http_headers import Headers

from regproxy.headers import (
    client_response_headers,
    origin,
    rewrite_link,
    rewrite_url,
    upstream_request_headers,
    without_credentials,
)

UP = ("https", "registry.example", 443)


def test_every_accept_value_is_forwarded() -> None:
    """Docker's six separate Accept headers all reach the upstream, in order."""
    accepts = [b"application/vnd.docker.distribution.manifest.v2+json", b"application/vnd.oci.image.index.v1+json", b"*/*"]
    h = Headers({b"Accept": accepts, b"Host": [b"proxy"], b"Connection": [b"close, X-Foo"], b"X-Foo": [b"1"],
                 b"Authorization": [b"Bearer t"], b"Content-Length": [b"3"], b"Transfer-Encoding": [b"chunked"]})
    out = upstream_request_headers(h)
    assert out.getRawHeaders(b"accept") == accepts
    assert out.getRawHeaders(b"authorization") == [b"Bearer t"]
    for gone in (b"host", b"connection", b"x-foo", b"content-length", b"transfer-encoding"):
        assert not out.hasHeader(gone)


def test_response_headers_drop_framing_and_empty_encoding() -> None:
    """Framing headers and an empty Content-Encoding never reach the client; digests do."""
    h = Headers({b"Content-Length": [b"5"], b"Content-Encoding": [b""], b"Docker-Content-Digest": [b"sha256:x"],
                 b"Keep-Alive": [b"timeout=5"]})
    out = client_response_headers(h)
    assert not out.hasHeader(b"content-length") and not out.hasHeader(b"content-encoding")
    assert not out.hasHeader(b"keep-alive")
    assert out.getRawHeaders(b"docker-content-digest") == [b"sha256:x"]


def test_credentials_stripped_for_other_hosts() -> None:
    """Authorization and cookies are removed; Range and If-None-Match stay."""
    h = Headers({b"Authorization": [b"Bearer t"], b"Cookie": [b"c"], b"Range": [b"bytes=0-1"], b"If-None-Match": [b"x"]})
    out = without_credentials(h)
    assert not out.hasHeader(b"authorization") and not out.hasHeader(b"cookie")
    assert out.getRawHeaders(b"range") == [b"bytes=0-1"] and out.getRawHeaders(b"if-none-match") == [b"x"]


def test_origin() -> None:
    """Origins normalise case and default ports; non-HTTP URLs have none."""
    assert origin("HTTPS://Registry.Example/v2/") == UP
    assert origin("https://registry.example:443/x") == UP
    assert origin("http://h:8080") == ("http", "h", 8080)
    assert origin("ftp://h/") is None and origin("/relative") is None


def test_absolute_location_rewritten_with_query_byte_exact() -> None:
    """An upstream-absolute upload Location points at the proxy; _state is untouched."""
    loc = "https://registry.example/v2/library/nginx/blobs/uploads/u1?_state=ab%2Bc%3D%3D&x=1"
    assert rewrite_url(loc, UP, "", "http://proxy:5000", {"library/nginx": "nginx"}) == (
        "http://proxy:5000/v2/nginx/blobs/uploads/u1?_state=ab%2Bc%3D%3D&x=1"
    )


def test_relative_location_stays_relative() -> None:
    """A relative Location stays relative, renamed to the client's spelling."""
    loc = "/v2/library/nginx/blobs/uploads/u1?_state=Zm9v%3D"
    assert rewrite_url(loc, UP, "", "http://proxy", {"library/nginx": "nginx"}) == "/v2/nginx/blobs/uploads/u1?_state=Zm9v%3D"


def test_foreign_location_untouched() -> None:
    """A URL on another host (a CDN) is not made to point at the proxy."""
    loc = "https://cdn.example/blob?sig=abc"
    assert rewrite_url(loc, UP, "", "http://proxy", {}) == loc


def test_upstream_path_prefix_removed() -> None:
    """An upstream mounted under a path prefix has the prefix taken off."""
    loc = "https://registry.example/mirror/v2/x/blobs/uploads/1"
    assert rewrite_url(loc, UP, "/mirror", "http://proxy", {}) == "http://proxy/v2/x/blobs/uploads/1"


def test_link_header() -> None:
    """tags/list pagination Links point at the proxy with the client's name."""
    value = '</v2/library/x/tags/list?last=b&n=2>; rel="next"'
    out = rewrite_link(value, lambda u: rewrite_url(u, UP, "", "http://p", {"library/x": "x"}))
    assert out == '</v2/x/tags/list?last=b&n=2>; rel="next"'
