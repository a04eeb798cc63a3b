"""The OCI distribution grammar for repository names, tags and digests.

Validating here means a malformed request gets a precise 400 from the proxy instead
of being forwarded (or, worse, being used to build an upstream URL).
"""

from __future__ import annotations

import re

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]+")
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")

#: The OCI spec allows implementations to cap names; 255 is what registries use.
MAX_NAME_LENGTH = 255


def is_valid_name(name: str) -> bool:
    """Whether C{name} is a repository name per the OCI grammar."""
    return len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None


#: A registry host as the first component of a name (docker's reference grammar): host[:port].
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?")


def is_valid_prefixed_name(name: str) -> bool:
    """A repository name, possibly behind a registry host (C{ghcr.io/owner/img}, C{localhost:5000/x})."""
    if is_valid_name(name):
        return True
    first, sep, rest = name.partition("/")
    return bool(sep) and _DOMAIN.fullmatch(first) is not None and is_valid_name(rest)


def is_valid_tag(tag: str) -> bool:
    """Whether C{tag} is a tag per the OCI grammar."""
    return _TAG.fullmatch(tag) is not None


def is_valid_digest(digest: str) -> bool:
    """Whether C{digest} is C{algorithm:encoded}; sha256/sha512 must be lowercase hex of the right length."""
    if _DIGEST.fullmatch(digest) is None:
        return False
    algorithm, _, encoded = digest.partition(":")
    expected = _DIGEST_HEX_LENGTHS.get(algorithm)
    if expected is None:
        return True
    return len(encoded) == expected and _HEX.fullmatch(encoded) is not None


def is_valid_reference(reference: str) -> bool:
    """A manifest reference is a tag or a digest."""
    if ":" in reference:
        return is_valid_digest(reference)
    return is_valid_tag(reference)


def upstream_name(name: str, library_prefix: bool) -> str:
    """The repository name as the upstream knows it.

    Docker Hub keeps official images under C{library/}; clients that pull
    C{proxy/nginx} directly send a one-component name, which must become
    C{library/nginx} upstream.
    """
    if library_prefix and "/" not in name:
        return "library/" + name
    return name
