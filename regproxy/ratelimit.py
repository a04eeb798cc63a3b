"""Docker Hub's pull budget, as its own headers tell it, per upstream credential.

Docker Hub sends C{ratelimit-limit: 100;w=21600} and C{ratelimit-remaining:
76;w=21600} (and C{docker-ratelimit-source}) on manifest requests, HEAD
included; a GET of a manifest counts as a pull, a HEAD does not. The proxy keeps
the figures per (upstream, credential), logs when they run low, and once the
budget is gone (or a 429 came back) avoids GETs that would only be refused,
until the window allows again; HEAD revalidations go on (they are free) and
tell it when that is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

_FIGURE = re.compile(rb"\s*(\d+)\s*(?:;\s*w\s*=\s*(\d+))?")


@dataclass
class Budget:
    """One credential's budget at one upstream."""

    limit: int | None = None
    remaining: int | None = None
    window: int | None = None
    source: str | None = None
    updated: float = 0.0
    #: No upstream GET before this (a 429, or nothing left).
    blocked_until: float = 0.0


def _figure(headers: Headers, name: bytes) -> tuple[int, int | None] | None:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    match = _FIGURE.match(values[0])
    if match is None:
        return None
    return int(match[1]), int(match[2]) if match[2] else None


def retry_after(headers: Headers, default: float = 60.0) -> float:
    values = headers.getRawHeaders(b"retry-after")
    if values:
        try:
            return max(1.0, float(values[0].strip()))
        except ValueError:
            pass
    return default


class Budgets:
    """Every (upstream, credential) budget the proxy has seen."""

    log = Logger()

    def __init__(self, clock: IReactorTime, low: float = 0.1) -> None:
        self._clock = clock
        self._low = low
        self.budgets: dict[tuple[str, str], Budget] = {}
        self.metrics: Any = None

    def note(self, upstream: str, who: str, code: int, headers: Headers) -> None:
        """Read an upstream answer's rate-limit headers (and a 429)."""
        limit = _figure(headers, b"ratelimit-limit")
        remaining = _figure(headers, b"ratelimit-remaining")
        if limit is None and remaining is None and code != 429:
            return
        now = self._clock.seconds()
        budget = self.budgets.setdefault((upstream, who), Budget())
        budget.updated = now
        if limit is not None:
            budget.limit, budget.window = limit[0], limit[1] or budget.window
        if remaining is not None:
            was = budget.remaining
            budget.remaining = remaining[0]
            budget.window = remaining[1] or budget.window
            if budget.limit and remaining[0] <= budget.limit * self._low and (was is None or was > remaining[0]):
                self.log.warn(
                    "{upstream}: {remaining} of {limit} pulls left for {who} (window {window}s)",
                    upstream=upstream,
                    remaining=remaining[0],
                    limit=budget.limit,
                    who=who,
                    window=budget.window,
                )
            if remaining[0] > 0:
                budget.blocked_until = 0.0
        if self.metrics is not None and who.startswith("proxy"):
            label = who.partition(":")[2] or "anonymous"
            if budget.remaining is not None:
                self.metrics.ratelimit_remaining.labels(upstream, label).set(budget.remaining)
            if budget.limit is not None:
                self.metrics.ratelimit_limit.labels(upstream, label).set(budget.limit)
        source = headers.getRawHeaders(b"docker-ratelimit-source")
        if source:
            budget.source = source[0].decode("latin-1")
        if code == 429:
            budget.blocked_until = now + retry_after(headers)
            self.log.warn("{upstream}: rate limit reached for {who}; serving from the cache only", upstream=upstream, who=who)
        elif budget.remaining == 0 and not budget.blocked_until:
            # Nothing left: look again in a minute (a HEAD revalidation may say sooner).
            budget.blocked_until = now + 60

    def blocked(self, upstream: str, who: str) -> float:
        """Seconds before an upstream GET for C{who} is worth making (0: now)."""
        budget = self.budgets.get((upstream, who))
        if budget is None:
            return 0.0
        return max(0.0, budget.blocked_until - self._clock.seconds())

    def describe(self, upstream: str, who: str) -> str:
        budget = self.budgets.get((upstream, who))
        whose = "the proxy's" if who.startswith("proxy") else "your"
        if budget is not None and budget.source:
            whose += f" (ratelimit-source {budget.source})"
        return f"{upstream} rate limit for {whose} pulls"
