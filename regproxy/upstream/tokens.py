"""The proxy's own upstream tokens, for clients that bring no credentials.

Anonymous clients would each spend a 401 -> token round trip per request type,
every token counted against the proxy's address at Docker Hub. Instead the
proxy gets one token per (upstream, scope) itself, anonymously or with the
operator's account for that upstream, keeps it until shortly before it
expires, and shares it: however many clients pull, one token request per scope
per token lifetime. Concurrent requests for the same scope wait for the same
fetch.

These requests are the proxy's own, so they go through treq (with the
upstream's agent: its CA, its outbound policy); the byte-exact relay does not.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from .. import errors
from .client import Upstream, read_bounded

#: The token spec's default lifetime when a token server doesn't say.
DEFAULT_EXPIRES_IN = 60
#: A token response larger than this is not a token response.
MAX_TOKEN_RESPONSE = 1 << 20
#: Cached tokens at most; past this the cache starts over (scopes are per repository).
MAX_CACHED = 10_000


@dataclass
class _Token:
    value: str
    good_until: float
    fetched: float


class UpstreamTokens:
    """Tokens for one upstream, fetched with its configured credentials (or none).

    @ivar fetches: how many token requests were made (for tests and metrics).
    """

    log = Logger()

    def __init__(
        self,
        upstream: Upstream,
        clock: IReactorTime,
        credentials: tuple[str, str] | None = None,
        http: Callable[[], HTTPClient] | None = None,
    ) -> None:
        self._upstream = upstream
        self._clock = clock
        self._credentials = credentials
        self._http = http or (lambda: HTTPClient(upstream.agent))
        self._tokens: dict[str, _Token] = {}
        self._waiting: dict[str, list[Deferred[str]]] = {}
        self.fetches = 0
        self.metrics: Any = None

    async def authorization(self, scope: str, fresh: bool = False) -> bytes | None:
        """The C{Authorization} value for the proxy's own request in C{scope}.

        C{None} when the upstream is not known to want any (no challenge seen
        yet, or it takes anonymous requests): the request then goes without, and
        a 401 teaches the proxy what to do.
        """
        upstream = self._upstream
        if upstream.scheme == "basic" and self._credentials is not None:
            user, password = self._credentials
            return b"Basic " + base64.b64encode(f"{user}:{password}".encode())
        if upstream.scheme != "bearer" or upstream.realm is None:
            return None
        token = await self.token(scope, fresh)
        return b"Bearer " + token.encode("ascii")

    async def token(self, scope: str, fresh: bool = False) -> str:
        cached = self._tokens.get(scope)
        if cached is not None and not fresh and cached.good_until > self._clock.seconds():
            return cached.value
        waiter: Deferred[str] = Deferred()
        waiting = self._waiting.get(scope)
        if waiting is None:
            self._waiting[scope] = [waiter]
            Deferred.fromCoroutine(self._fetch(scope)).addBoth(self._deliver, scope)
        else:
            waiting.append(waiter)  # one fetch per scope, however many ask meanwhile
        return await waiter

    def _deliver(self, result: str | Failure, scope: str) -> None:
        if self.metrics is not None:
            outcome = "ok" if not isinstance(result, Failure) else "failed"
            self.metrics.token_fetches.labels(self._upstream.name, outcome).inc()
        for waiter in self._waiting.pop(scope, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _fetch(self, scope: str) -> str:
        upstream = self._upstream
        realm = upstream.realm
        assert realm is not None
        params: list[tuple[str, str]] = []
        if upstream.service:
            params.append(("service", upstream.service))
        if scope:
            params.append(("scope", scope))
        self.fetches += 1
        try:
            response = await self._http().get(
                realm,
                params=params,
                auth=self._credentials,
                allow_redirects=False,
                timeout=upstream.response_timeout or None,
            )
            body = await read_bounded(response, MAX_TOKEN_RESPONSE, "token response")
        except errors.RegistryError:
            raise
        except (TimeoutError, CancelledError) as e:
            raise errors.RegistryError(504, "UNAVAILABLE", f"the token server of {upstream.name} timed out") from e
        except ResponseNeverReceived as e:
            if all(r.check(CancelledError, TimeoutError) for r in e.reasons):
                raise errors.RegistryError(504, "UNAVAILABLE", f"the token server of {upstream.name} timed out") from e
            raise errors.RegistryError(
                502, "UNAVAILABLE", f"the token server of {upstream.name} is unreachable: {e}"
            ) from e
        except Exception as e:
            raise errors.RegistryError(
                502, "UNAVAILABLE", f"the token server of {upstream.name} is unreachable: {e}"
            ) from e
        if response.code != 200:
            whose = "the proxy's account" if self._credentials else "an anonymous request"
            raise errors.RegistryError(
                502, "UNAVAILABLE", f"the token server of {upstream.name} refused {whose} ({response.code})"
            )
        try:
            document = json.loads(body)
            value = document.get("token") or document.get("access_token")
            expires_in = int(document.get("expires_in") or DEFAULT_EXPIRES_IN)
        except (ValueError, AttributeError, TypeError):
            value = None
        if not isinstance(value, str) or not value.isascii() or not value:
            raise errors.RegistryError(502, "UNAVAILABLE", f"the token server of {upstream.name} sent no token")
        margin = max(5.0, expires_in * 0.1)
        good_until = self._clock.seconds() + max(expires_in - margin, 0)
        if len(self._tokens) >= MAX_CACHED:
            self._tokens.clear()
        self._tokens[scope] = _Token(value, good_until, self._clock.seconds())
        self.log.info(
            "token for {upstream} {scope} ({who}), good for {seconds:.0f}s",
            upstream=upstream.name,
            scope=scope or "(no scope)",
            who=self._credentials[0] if self._credentials else "anonymous",
            seconds=good_until - self._clock.seconds(),
        )
        return value

    def stale(self, scope: str) -> bool:
        """Whether a refused token may just be old (worth fetching again), not merely short of rights."""
        token = self._tokens.get(scope)
        return token is None or self._clock.seconds() - token.fetched > 30

    def forget(self, scope: str) -> None:
        """Drop a token the upstream refused."""
        self._tokens.pop(scope, None)
