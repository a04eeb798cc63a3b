"""The OCI grammar for names, tags and digests, and Docker Hub's library/ rule."""

from __future__ import annotations

import pytest

from regproxy.names import is_valid_digest, is_valid_name, is_valid_reference, is_valid_tag, upstream_name

SHA = "sha256:" + "a" * 64


@pytest.mark.parametrize("name", ["nginx", "library/nginx", "a/b/c", "my-org/my_app", "a.b/c__d", "x" * 255])
def test_valid_names(name: str) -> None:
    """Names allowed by the OCI grammar are accepted."""
    assert is_valid_name(name)


@pytest.mark.parametrize("name", ["", "Nginx", "a//b", "/a", "a/", "-a", "a_", "a/../b", "a%2fb", "x" * 256, "a:b"])
def test_invalid_names(name: str) -> None:
    """Upper case, empty components, traversal and over-long names are rejected."""
    assert not is_valid_name(name)


def test_tags() -> None:
    """Tags: 1-128 chars of [A-Za-z0-9_.-], not starting with . or -."""
    assert is_valid_tag("latest") and is_valid_tag("v1.2_3-rc") and is_valid_tag("A" * 128)
    assert not is_valid_tag(".x") and not is_valid_tag("-x") and not is_valid_tag("a" * 129)
    assert not is_valid_tag("a/b") and not is_valid_tag("")


def test_digests() -> None:
    """sha256/sha512 digests must be lowercase hex of the right length; other algorithms follow the grammar."""
    assert is_valid_digest(SHA)
    assert is_valid_digest("sha512:" + "0" * 128)
    assert not is_valid_digest("sha256:" + "A" * 64)
    assert not is_valid_digest("sha256:" + "a" * 63)
    assert not is_valid_digest("sha256:")
    assert not is_valid_digest("nocolon")
    assert is_valid_digest("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8")


def test_reference_is_tag_or_digest() -> None:
    """A manifest reference with a colon must be a digest."""
    assert is_valid_reference("latest") and is_valid_reference(SHA)
    assert not is_valid_reference("sha256:zz")


def test_library_prefix() -> None:
    """One-component names gain library/ only when the prefix rule is on."""
    assert upstream_name("nginx", True) == "library/nginx"
    assert upstream_name("myorg/tool", True) == "myorg/tool"
    assert upstream_name("nginx", False) == "nginx"
