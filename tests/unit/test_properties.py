"""Property tests (Hypothesis) of the pure modules: the OCI grammar, API routes,
challenge parsing and rewriting, scope mapping, token queries, Location/Link rewriting.

The example-based tests next to this file pin the cases someone thought of; these
generate inputs from the grammar (or from anything at all) and pin the invariants
the proxy relies on.  Each runs ~200 examples with a fixed seed, so a failure
reproduces on every run and the module stays well under 15 s.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from urllib.parse import parse_qsl, quote, quote_plus, urlencode

import pytest
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

from regproxy import errors, routes
from regproxy.auth import Challenge, map_scope, parse_challenge, rewrite_challenge, token_query
from regproxy.headers import origin, rewrite_link, rewrite_url
from regproxy.names import MAX_NAME_LENGTH, is_valid_digest, is_valid_name, is_valid_reference, is_valid_tag

#: ~200 examples each, no per-example deadline (a loaded CI box is not a failure), no
#: example database written into the work tree; the seed is fixed per test below.
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
SEED = 20240601


def _identity(name: str) -> str:
    return name


# -- the OCI grammar, as strategies ------------------------------------------------

LOWER_ALNUM = string.ascii_lowercase + string.digits
ALNUM = string.ascii_letters + string.digits

alnum_run = st.text(LOWER_ALNUM, min_size=1, max_size=8)
#: separator := /[_.]|__|[-]+/ (OCI distribution spec, "name" grammar)
separator = st.sampled_from([".", "_", "__", "-", "--", "---"])
component = st.builds(
    lambda first, rest: first + "".join(sep + run for sep, run in rest),
    alnum_run,
    st.lists(st.tuples(separator, alnum_run), max_size=3),
)
names = st.lists(component, min_size=1, max_size=5).map("/".join).filter(lambda n: len(n) <= MAX_NAME_LENGTH)
#: tag := /[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}/
tags = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(ALNUM + "_"),
    st.text(ALNUM + "._-", max_size=127),
)
#: algorithm-component := /[a-z0-9]+/, algorithm-separator := /[+._-]/
algorithms = st.builds(
    lambda first, rest: first + "".join(sep + run for sep, run in rest),
    alnum_run,
    st.lists(st.tuples(st.sampled_from("+._-"), alnum_run), max_size=2),
)
registered_digests = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()),
    st.binary(min_size=64, max_size=64).map(lambda b: "sha512:" + b.hex()),
)
#: encoded := /[a-zA-Z0-9=_-]+/ (any algorithm the proxy does not know the length of)
other_digests = st.builds(
    lambda alg, enc: f"{alg}:{enc}",
    algorithms.filter(lambda a: a not in ("sha256", "sha512")),
    st.text(ALNUM + "=_-", min_size=1, max_size=80),
)
digests = st.one_of(registered_digests, other_digests)
#: Upload session ids travel in a path; the proxy keeps them to unreserved characters.
upload_ids = st.text(ALNUM + "._~=-", min_size=1, max_size=40).filter(lambda u: u not in (".", ".."))


def _with_char_inserted(valid: st.SearchStrategy[str], allowed: str) -> st.SearchStrategy[str]:
    """A valid string with one character outside ``allowed`` inserted somewhere."""
    outside = st.characters(codec="utf-8").filter(lambda c: c not in allowed)

    @st.composite
    def build(draw: st.DrawFn) -> str:
        text = draw(valid)
        where = draw(st.integers(0, len(text)))
        return text[:where] + draw(outside) + text[where:]

    return build()


NAME_CHARS = LOWER_ALNUM + "._-/"
TAG_CHARS = ALNUM + "._-"
DIGEST_CHARS = ALNUM + "+._-:="


@seed(SEED)
@PROPERTY
@given(names)
def test_generated_names_are_valid(name: str) -> None:
    """Every repository name the OCI grammar generates (up to 255 characters) is accepted."""
    assert is_valid_name(name)


@seed(SEED)
@PROPERTY
@given(tags)
def test_generated_tags_are_valid(tag: str) -> None:
    """Every tag the OCI grammar generates is accepted, as a tag and as a manifest reference."""
    assert is_valid_tag(tag)
    assert is_valid_reference(tag)


@seed(SEED)
@PROPERTY
@given(digests)
def test_generated_digests_are_valid(digest: str) -> None:
    """Every digest the OCI grammar generates (sha256/sha512 as lowercase hex of their length) is accepted."""
    assert is_valid_digest(digest)
    assert is_valid_reference(digest)


@seed(SEED)
@PROPERTY
@given(_with_char_inserted(names, NAME_CHARS))
def test_names_with_foreign_characters_are_rejected(name: str) -> None:
    """A name containing any character outside [a-z0-9._/-] (upper case, %, :, non-ASCII...) is rejected."""
    assert not is_valid_name(name)


@seed(SEED)
@PROPERTY
@given(_with_char_inserted(tags, TAG_CHARS))
def test_tags_with_foreign_characters_are_rejected(tag: str) -> None:
    """A tag containing any character outside [A-Za-z0-9._-] is rejected."""
    assert not is_valid_tag(tag)


@seed(SEED)
@PROPERTY
@given(_with_char_inserted(digests, DIGEST_CHARS))
def test_digests_with_foreign_characters_are_rejected(digest: str) -> None:
    """A digest containing any character outside the digest grammar's alphabet is rejected."""
    assert not is_valid_digest(digest)


# -- routes ----------------------------------------------------------------------

METHODS = [b"GET", b"HEAD", b"PUT", b"POST", b"PATCH", b"DELETE", b"OPTIONS", b"get", b"BREW", b""]
_SEGMENTS = st.one_of(
    st.sampled_from(["v2", "manifests", "blobs", "uploads", "tags", "list", "referrers", "_catalog", "", ".", ".."]),
    names,
    tags,
    digests,
    st.text(max_size=12),
    st.text("%2Fa:@/?#\\", max_size=6),
)
registry_like_paths = st.lists(_SEGMENTS, max_size=8).map(lambda segments: "/v2/" + "/".join(segments))


@seed(SEED)
@PROPERTY
@given(st.one_of(st.text(), registry_like_paths), st.sampled_from(METHODS))
def test_parse_raises_only_registry_errors(path: str, method: bytes) -> None:
    """routes.parse of any path either gives a Route or raises RegistryError with a 4xx OCI answer, nothing else."""
    try:
        route = routes.parse(path, method)
    except errors.RegistryError as e:
        assert 400 <= e.status < 500
        assert e.code in {
            "NAME_UNKNOWN", "NAME_INVALID", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "BLOB_UPLOAD_UNKNOWN",
            "DIGEST_INVALID", "TAG_INVALID", "UNSUPPORTED",
        }
    else:
        assert isinstance(route, routes.Route)


@st.composite
def api_paths(draw: st.DrawFn) -> tuple[str, str, routes.Kind, bytes]:
    """A valid API path for a generated name, with its kind and a method that endpoint accepts."""
    name = draw(names)
    kind = draw(st.sampled_from(list(routes.Kind)))
    suffix = {
        routes.Kind.PING: None,
        routes.Kind.CATALOG: None,
        routes.Kind.MANIFEST: "/manifests/" + draw(st.one_of(tags, digests)),
        routes.Kind.BLOB: "/blobs/" + draw(digests),
        routes.Kind.UPLOAD_START: "/blobs/uploads/",
        routes.Kind.UPLOAD: "/blobs/uploads/" + draw(upload_ids),
        routes.Kind.TAGS: "/tags/list",
        routes.Kind.REFERRERS: "/referrers/" + draw(digests),
    }[kind]
    method = draw(st.sampled_from(sorted(routes.ALLOWED_METHODS[kind])))
    if suffix is None:
        return ("/v2/" if kind is routes.Kind.PING else "/v2/_catalog"), "", kind, method
    return f"/v2/{name}{suffix}", name, kind, method


@seed(SEED)
@PROPERTY
@given(api_paths())
def test_valid_paths_round_trip(case: tuple[str, str, routes.Kind, bytes]) -> None:
    """A path built from a valid name and reference parses to its endpoint, and upstream_path(name) rebuilds it."""
    path, name, kind, method = case
    route = routes.parse(path, method)
    assert route.kind is kind
    if kind in (routes.Kind.PING, routes.Kind.CATALOG):
        assert route.name is None
        assert route.upstream_path(None) == path
    else:
        assert route.name == name
        assert route.upstream_path(name) == path


# -- challenges and scopes ---------------------------------------------------------

#: quoted-string content: anything printable (incl. non-ASCII, as latin-1 headers
#: decode), with quotes, backslashes, commas, '=' and spaces made common.
quoted_content = st.one_of(
    st.text(string.ascii_letters + string.digits + '"\\,=; \t:/.-_éü€ÿ\xa0\u2028', max_size=30),
    st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=20),
)
_FIXED_KEYS = ("realm", "service", "scope")
extra_keys = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True).filter(lambda k: k.lower() not in _FIXED_KEYS)
schemes = st.sampled_from(["Bearer", "bearer", "BEARER"])


@st.composite
def bearer_challenges(draw: st.DrawFn, realm: bool = True) -> Challenge:
    """A Bearer challenge: realm (if asked), maybe service and scope, maybe extra params, in any order."""
    params: list[tuple[str, str]] = []
    if realm:
        params.append(("realm", draw(quoted_content)))
    for key in ("service", "scope"):
        if draw(st.booleans()):
            params.append((key, draw(quoted_content)))
    extras = draw(st.lists(st.tuples(extra_keys, quoted_content), max_size=3, unique_by=lambda kv: kv[0].lower()))
    params += extras
    return Challenge(draw(schemes), draw(st.permutations(params)))


@seed(SEED)
@PROPERTY
@given(st.one_of(bearer_challenges(), bearer_challenges(realm=False)))
def test_parse_render_is_identity(challenge: Challenge) -> None:
    """parse_challenge(c.render()) gives back the scheme and every param, in order, values unescaped exactly."""
    parsed = parse_challenge(challenge.render())
    assert parsed is not None
    assert parsed.scheme == challenge.scheme
    assert parsed.params == challenge.params


@seed(SEED)
@PROPERTY
@given(bearer_challenges(), quoted_content)
def test_rewrite_replaces_only_the_realm(challenge: Challenge, proxy_realm: str) -> None:
    """rewrite_challenge returns the upstream realm, points realm at the proxy and keeps every other param as it was."""
    original_realm = challenge.get("realm")
    value, realm = rewrite_challenge(challenge.render(), proxy_realm, _identity)
    assert realm == original_realm
    rewritten = parse_challenge(value)
    assert rewritten is not None
    assert rewritten.scheme == challenge.scheme
    assert [k for k, _ in rewritten.params] == [k for k, _ in challenge.params]
    for (key, before), (_, after) in zip(challenge.params, rewritten.params, strict=True):
        assert after == (proxy_realm if key == "realm" else before)


@seed(SEED)
@PROPERTY
@given(st.text(max_size=200))
def test_challenge_functions_never_raise(value: str) -> None:
    """parse_challenge and rewrite_challenge take any header value (they run on upstream headers) without raising."""
    parse_challenge(value)
    new, realm = rewrite_challenge(value, "http://proxy/token", _identity)
    if realm is None:
        assert new == value


scope_items = st.one_of(
    st.builds(
        lambda kind, name, actions: f"{kind}:{name}:{actions}",
        st.sampled_from(["repository", "repository(plugin)", "registry", "Repository"]),
        st.one_of(names, st.text(max_size=10)),
        st.sampled_from(["pull", "push,pull", "*", "", "delete:x"]),
    ),
    st.text(max_size=20),
)
scopes = st.lists(scope_items, max_size=5).map(" ".join)


@seed(SEED)
@PROPERTY
@given(st.one_of(scopes, st.text()))
def test_map_scope_identity(scope: str) -> None:
    """map_scope with the identity rename returns the scope string unchanged, byte for byte."""
    assert map_scope(scope, _identity) == scope


@seed(SEED)
@PROPERTY
@given(st.lists(names, min_size=1, max_size=4), st.sampled_from(["pull", "push,pull", "*"]))
def test_map_scope_renames_only_repository_names(repos: list[str], actions: str) -> None:
    """With a real rename, each repository:NAME:ACTIONS gets rename(NAME) and registry:catalog:* stays."""
    scope = " ".join([f"repository:{r}:{actions}" for r in repos] + ["registry:catalog:*"])
    expected = " ".join([f"repository:library/{r}:{actions}" for r in repos] + ["registry:catalog:*"])
    assert map_scope(scope, lambda n: "library/" + n) == expected


query_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
query_pairs = st.lists(
    st.tuples(st.one_of(st.sampled_from(["scope", "service", "account", "client_id", "offline_token"]), query_text),
              st.one_of(scopes, query_text)),
    max_size=8,
)


@seed(SEED)
@PROPERTY
@given(query_pairs, st.sampled_from([quote, quote_plus]))
def test_token_query_preserves_parameters_and_order(pairs: list[tuple[str, str]], quoting: Callable[..., str]) -> None:
    """token_query with the identity rename keeps every parameter (repeats included) and value, in order."""
    query = urlencode(pairs, quote_via=quoting).encode("ascii")  # type: ignore[arg-type]
    out = token_query(query, _identity)
    assert out.isascii()
    assert parse_qsl(out.decode("ascii"), keep_blank_values=True) == pairs


@pytest.mark.parametrize("pair", [b"password=%E9t%E9", b"scope=repository%3Ax%FF%3Apull"])
def test_token_query_keeps_non_utf8_escapes(pair: bytes) -> None:
    """Percent-escaped bytes that are not UTF-8 reach the realm as the same bytes."""
    out = token_query(b"grant_type=password&" + pair, _identity)
    assert out.split(b"&")[1].upper() == pair.upper(), out


# -- Location / Link rewriting -------------------------------------------------------

UPSTREAM_ORIGIN = ("https", "registry.test", 443)
PUBLIC = "http://proxy.test:5000"
#: Spellings of the upstream's own origin: scheme and host case, default port.
own_origins = st.sampled_from(
    ["https://registry.test", "https://registry.test:443", "HTTPS://Registry.Test", "https://REGISTRY.TEST:443"]
)
#: Query (and fragment) text: printable ASCII and latin-1, '?', '#', '%', '&', '=' common.
query_chars = st.one_of(
    st.text(string.ascii_letters + string.digits + "?#%&=/;+ :@!$'()*,~._-", max_size=60),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_categories=("Cc",)), max_size=30),
)
upstream_paths = st.builds(
    lambda name, tail: f"/v2/{name}{tail}",
    names,
    st.one_of(
        st.just("/blobs/uploads/"),
        upload_ids.map(lambda u: "/blobs/uploads/" + u),
        digests.map(lambda d: "/blobs/" + d),
        st.just("/tags/list"),
    ),
)
renames = st.dictionaries(component, component, max_size=2)


@seed(SEED)
@PROPERTY
@given(st.one_of(own_origins, st.just("")), upstream_paths, query_chars, renames)
def test_rewrite_url_keeps_query_byte_exact(base: str, path: str, query: str, names_map: dict[str, str]) -> None:
    """A Location/Link URL at the upstream (absolute or relative) keeps everything after '?' byte for byte."""
    url = f"{base}{path}?{query}"
    out = rewrite_url(url, UPSTREAM_ORIGIN, "", PUBLIC, names_map)
    assert out.partition("?")[2] == query
    if base:
        assert out.startswith(PUBLIC + "/v2/")
    else:
        assert out.startswith("/v2/")


@seed(SEED)
@PROPERTY
@given(own_origins, names, names, query_chars)
def test_rewrite_url_renames_only_the_path(base: str, upstream_name: str, client_name: str, query: str) -> None:
    """An upstream URL naming a renamed repository gets the client's name in its path, the query untouched."""
    url = f"{base}/v2/{upstream_name}/blobs/uploads/u-1?{query}"
    out = rewrite_url(url, UPSTREAM_ORIGIN, "", PUBLIC, {upstream_name: client_name})
    assert out == f"{PUBLIC}/v2/{client_name}/blobs/uploads/u-1?{query}"


other_hosts = st.one_of(
    st.sampled_from(["cdn.example", "registry.test.evil", "evil-registry.test", "127.0.0.1", "[::1]", "169.254.169.254",
                     "registry.test:8443", "registry.test:80", "xn--rgistry-bva.test", "registry.test:99999",
                     "registry.test:x", "[::1", "registry.test]", "[registry.test]"]),
    st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){0,3}(:[0-9]{1,5})?", fullmatch=True),
)
other_schemes = st.sampled_from(["https", "http", "ftp", "HTTP"])


@st.composite
def foreign_urls(draw: st.DrawFn) -> str:
    """Absolute URLs whose origin is not the upstream's: another host, port or scheme, or a malformed authority."""
    url = f"{draw(other_schemes)}://{draw(other_hosts)}{draw(upstream_paths)}?{draw(query_chars)}"
    if origin(url) == UPSTREAM_ORIGIN:
        url = url.replace("registry.test", "registry.other", 1)
    return url


@seed(SEED)
@PROPERTY
@given(foreign_urls(), renames)
@example("http://registry.test/v2/x/blobs/uploads/1?a=b", {})  # same host, http: another origin
@example("https://registry.test:444/v2/x/blobs/uploads/1", {"x": "y"})
def test_rewrite_url_leaves_other_origins_alone(url: str, names_map: dict[str, str]) -> None:
    """A URL for any origin other than the upstream's comes back unchanged (the proxy never re-homes a CDN URL)."""
    assert rewrite_url(url, UPSTREAM_ORIGIN, "", PUBLIC, names_map) == url


@pytest.mark.parametrize("url", ["http://[::1/v2/x/blobs/uploads/1?a=b", "https://[cdn.example/blob", "//[x/y", "http://a]b/c"])
def test_rewrite_url_returns_malformed_urls_unchanged(url: str) -> None:
    """A malformed Location (unbalanced IPv6 bracket: urlsplit raises on it) is not the upstream's origin: unchanged."""
    assert rewrite_url(url, UPSTREAM_ORIGIN, "", PUBLIC, {}) == url


@pytest.mark.parametrize("base", ["https://registry.test", ""])
def test_rewrite_url_with_a_tab_keeps_the_rest_intact(base: str) -> None:
    """A tab inside an upstream URL's path does not change the bytes after it (the upload id and the query)."""
    out = rewrite_url(f"{base}/v2/a\tb/blobs/uploads/1?x=1", UPSTREAM_ORIGIN, "", PUBLIC, {})
    assert out.endswith("/blobs/uploads/1?x=1"), out


#: Link text outside <...>: parameters, commas, quotes, spaces; no angle brackets.
link_outside = st.one_of(
    st.text(string.ascii_letters + ';=", \t/:.-', max_size=30),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_categories=("Cc",)), max_size=20).map(
        lambda t: t.replace("<", "").replace(">", "")
    ),
)
link_uri = st.one_of(
    st.builds(lambda b, p, q: f"{b}{p}?{q}", st.one_of(own_origins, st.just(""), st.just("https://cdn.example")),
              upstream_paths, query_chars.map(lambda q: q.replace(">", ""))),
    # Arbitrary text, minus '>' (it would end the reference).
    st.text(max_size=30).map(lambda t: t.replace(">", "")),
)


@seed(SEED)
@PROPERTY
@given(st.lists(st.tuples(link_outside, link_uri), max_size=4), link_outside, st.booleans())
def test_rewrite_link_keeps_outside_of_brackets(parts: list[tuple[str, str]], tail: str, real: bool) -> None:
    """rewrite_link rewrites each <URI> once, in order, and keeps every byte outside the brackets."""
    value = "".join(f"{outside}<{uri}>" for outside, uri in parts) + tail
    seen: list[str] = []

    def rewrite(uri: str) -> str:
        seen.append(uri)
        return rewrite_url(uri, UPSTREAM_ORIGIN, "", PUBLIC, {}) if real else f"R[{uri}]"

    out = rewrite_link(value, rewrite)
    assert seen == [uri for _, uri in parts]
    expected = "".join(
        f"{outside}<{rewrite_url(uri, UPSTREAM_ORIGIN, '', PUBLIC, {}) if real else f'R[{uri}]'}>"
        for outside, uri in parts
    ) + tail
    assert out == expected


@seed(SEED)
@PROPERTY
@given(st.text(max_size=60).filter(lambda t: "<" not in t or ">" not in t.split("<", 1)[1]))
def test_rewrite_link_without_a_complete_reference_is_unchanged(value: str) -> None:
    """A Link value with no complete <...> is returned exactly as it was, and nothing is rewritten."""
    called: list[str] = []

    def rewrite(uri: str) -> str:
        called.append(uri)
        return "X"

    assert rewrite_link(value, rewrite) == value
    assert called == []
