"""HTTP byte ranges (RFC 9110 section 14) for blobs served from the cache.

Only a single range is served as a range (what registry clients send:
containerd's C{bytes=N-}, parallel chunk fetchers' C{bytes=a-b}); a header
asking for several is answered with the whole blob, which the RFC allows. A
range that can't be satisfied is a 416.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range C{first}..C{last} of an entity of C{size} bytes."""

    first: int
    last: int
    size: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self) -> bytes:
        return b"bytes %d-%d/%d" % (self.first, self.last, self.size)


class Unsatisfiable(ValueError):
    """The range lies outside the entity: answer 416 with C{Content-Range: bytes */size}."""


def parse_range(header: bytes | None, size: int) -> ByteRange | None:
    """The single range a C{Range} header asks of a C{size}-byte entity.

    @return: C{None} to send the whole entity (no header, several ranges, a
        unit other than bytes, or a syntax the RFC says to ignore).
    @raise Unsatisfiable: a well-formed range that selects no byte.
    """
    if header is None:
        return None
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return None
    if "," in text:
        return None
    match = _RANGE.fullmatch(text)
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise Unsatisfiable(text)
        return ByteRange(max(size - suffix, 0), size - 1, size)
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None  # invalid: ignored, the whole entity is sent
    if first >= size:
        raise Unsatisfiable(text)
    return ByteRange(first, min(last, size - 1), size)
