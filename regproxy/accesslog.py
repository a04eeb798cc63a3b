"""The access log (C{--access-log PATH}, C{-} for stdout): one JSON object per line, per request.

Every request gets exactly one line, whoever answered it: the upstream, the
cache, the proxy itself (errors, health, the landing page), or the channel
(a malformed request, a head that took too long, a connection over the
limits). Plain fields a log pipeline can read without Twisted's keys:
C{time}, C{request_id}, C{client}, C{method}, C{path}, C{status}, C{bytes},
C{duration}, C{upstream}, C{upstream_status}, C{cache}, C{credentials},
C{user_agent}, C{note}. Errors and warnings stay on the twisted.logger stream.

With C{--workers} every process appends to the same file; each line is one
C{write} of well under the size the kernel appends atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any


class AccessLog:
    """Writes access-log entries as JSON lines."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] = sys.stdout if path == "-" else open(path, "a", encoding="utf-8", buffering=1)

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":"), ensure_ascii=False, default=str) + "\n"
        self._file.write(line)
        if self._file is sys.stdout:
            self._file.flush()

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()


def entry(request: Any, exchange: Any, status: int, client: str, duration: float) -> dict[str, Any]:
    """The access-log object for one answered request."""
    return {
        "time": timestamp(),
        "request_id": exchange.request_id,
        "client": client,
        "method": request.method.decode("latin-1"),
        "path": request.uri.decode("latin-1"),
        "status": status,
        "bytes": request.sentLength,
        "duration": round(duration, 6),
        "upstream": exchange.upstream,
        "upstream_status": exchange.upstream_status,
        "cache": None if exchange.cache == "-" else exchange.cache,
        "credentials": exchange.credentials,
        "user_agent": (request.getHeader(b"user-agent") or b"").decode("latin-1"),
        "note": exchange.note or None,
    }


def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 UTC, to the millisecond."""
    now = time.time() if seconds is None else seconds
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def request_id() -> str:
    return os.urandom(8).hex()
