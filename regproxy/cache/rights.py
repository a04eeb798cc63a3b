"""Who may read which repository: what the upstream said recently, per credential.

A cached blob or manifest is served only to a client the upstream lets read
the repository it asked through. The proxy learns that from the upstream's own
answers (a 200 for that repository, with that client's credentials or the
proxy's own token) and believes it for a few minutes at most. For serving stale
content while the upstream is down, it also keeps when a right was last seen.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

Key = tuple[str, str, str]


class Rights:
    """(identity, upstream, repository) -> until when reading is known to be allowed."""

    MAX = 100_000

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._until: dict[Key, float] = {}
        self._seen: dict[Key, float] = {}

    def note(self, who: str, ttl: float, upstream: str, repository: str) -> None:
        """The upstream just let C{who} read C{repository}."""
        now = self._clock.seconds()
        if len(self._until) > self.MAX:
            self._until = {k: v for k, v in self._until.items() if v > now}
            self._seen = dict(list(self._seen.items())[-self.MAX // 2 :])
        key = (who, upstream, repository)
        self._until[key] = now + ttl
        self._seen[key] = now

    def known(self, who: str, upstream: str, repository: str) -> bool:
        return self._until.get((who, upstream, repository), 0.0) > self._clock.seconds()

    def seen_within(self, who: str, upstream: str, repository: str, seconds: float) -> bool:
        """Whether the upstream let C{who} read it at some point in the last C{seconds} (for stale answers)."""
        seen = self._seen.get((who, upstream, repository))
        return seen is not None and self._clock.seconds() - seen <= seconds
