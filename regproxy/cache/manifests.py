"""Manifests and tags from the cache: few counted pulls, and answers when the upstream is down.

By digest, a manifest is immutable: stored on first fetch (a HEAD miss fetches
the body too, so the next GET is a hit), verified against its digest, served
byte for byte with its exact type, digest and length.

By tag, the answer is keyed by upstream, repository, tag and the set of media
types the client accepts (six C{Accept} headers or one comma-joined list of the
same types are one key; a client that can't take an index never gets one). A
cached tag is revalidated with an upstream C{HEAD} (free on Docker Hub): same
digest, served from the cache; a new digest, fetched. Per repository glob, a
C{fresh} window skips the revalidation, and a C{stale_while_revalidate} window
answers at once and revalidates in the background (one revalidation per key).

When the upstream is unreachable, times out, answers 5xx or 429, a cached tag
is served stale (C{Cache-Status: regproxy; hit; fwd=stale}, plus a C{Warning})
for up to C{max_stale}; content by digest always. Uncached content while the
upstream rate-limits is a 429 with C{Retry-After} saying whose limit it is.

The rights rules are the blobs': a client is served only what the upstream
lets it read. Concurrent misses for one key make one upstream request. An image
manifest fetched on a miss starts the fills of its config and layers in the
background (bounded, with the rights of the request that asked).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from .. import errors
from ..config import TagRule
from ..errors import API_VERSION_HEADER
from ..metrics import cache_label
from ..policy import Credentials, repository_glob
from ..ratelimit import Budgets, retry_after
from ..upload import MAX_SMALL_BODY
from ..upstream import discard, read_bounded
from .blobs import Origin, identity
from .reader import BytesAnswer
from .store import Store, Tag, split_digest

#: Manifest media types whose blobs (config, layers) are worth prefetching.
_IMAGE_TYPES = frozenset(
    {"application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json"}
)
_TROUBLE = (ConnectError, DNSLookupError, TimeoutError, ResponseNeverReceived, ResponseFailed)
#: Signed schema-1 manifests: their digest is over the JWS payload, not the bytes served, so
#: they can't be verified as content-addressed; they are passed through, never stored.
_SCHEMA1 = frozenset(
    {"application/vnd.docker.distribution.manifest.v1+prettyjws", "application/vnd.docker.distribution.manifest.v1+json"}
)


DEFAULT_RULE = TagRule()


def rule_for(rules: Sequence[TagRule], repository: str) -> TagRule:
    """The first rule whose globs match the repository (the default: revalidate every time, a day stale)."""
    for rule in rules:
        if any(repository_glob(p).fullmatch(repository) for p in rule.repositories):
            return rule
    return DEFAULT_RULE


def accept_key(headers: Headers) -> str:
    """The normalised set of media types a client accepts (order, repetition, spacing, parameters ignored)."""
    types = set()
    for value in headers.getRawHeaders(b"accept", []):
        for item in value.decode("latin-1").split(","):
            kind = item.split(";")[0].strip().lower()
            if kind:
                types.add(kind)
    return ",".join(sorted(types))


def acceptable(media_type: str, key: str) -> bool:
    """Whether a client with accept key C{key} may be given C{media_type}."""
    if not key:
        return True
    types = key.split(",")
    return media_type in types or "*/*" in types


def children(document: bytes) -> tuple[list[str], bool]:
    """Digests a manifest refers to (config, layers, index children), and whether it is an image manifest."""
    try:
        parsed = json.loads(document)
    except ValueError:
        return [], False
    if not isinstance(parsed, dict):
        return [], False
    found: list[str] = []
    config = parsed.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        found.append(config["digest"])
    for key in ("layers", "manifests"):
        items = parsed.get(key)
        if isinstance(items, list):
            found += [i["digest"] for i in items if isinstance(i, dict) and isinstance(i.get("digest"), str)]
    return found, isinstance(parsed.get("layers"), list)


@dataclass
class _Fetched:
    """An upstream manifest answer read whole (manifests are small)."""

    code: int
    headers: Headers
    body: bytes


class ManifestCache:
    """Manifests by digest and by tag, from the store when the rules allow."""

    log = Logger()

    def __init__(
        self,
        store: Store,
        blobs: Any,
        clock: IReactorTime,
        budgets: Budgets | None = None,
        prefetch: int = 4,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.rights = blobs.rights
        self._clock = clock
        self.budgets = budgets or Budgets(clock)
        self._prefetching = DeferredSemaphore(max(1, prefetch)) if prefetch else None
        self._inflight: dict[tuple[Any, ...], list[Deferred[_Fetched]]] = {}
        self._revalidating: set[tuple[Any, ...]] = set()
        self._listings: dict[tuple[str, str, str], tuple[float, _Fetched]] = {}
        self.counts: dict[str, int] = {"hit": 0, "stored": 0, "stale": 0, "revalidated": 0, "coalesced": 0, "passed": 0}
        self.metrics: Any = None

    #: How long a tags/list or _catalog answer is kept for when the upstream is down.
    LISTING_STALE = 600.0
    _MAX_LISTINGS = 1000

    # entry point

    async def listing(self, origin: Origin, method: bytes) -> tuple[IResponse, str]:
        """tags/list and _catalog: passed through, but the last good answer is kept a while for when the upstream is down."""
        who, ttl, _ = self._who(origin)
        key = (origin.upstream.name, who, origin.url)
        try:
            fetched = await self._fetch(origin, b"GET", key)
        except (*_TROUBLE, errors.RegistryError) as e:
            kept = self._listings.get(key)
            if kept is not None and self._clock.seconds() - kept[0] <= self.LISTING_STALE:
                answer = BytesAnswer(200, kept[1].headers.copy(), b"" if method == b"HEAD" else kept[1].body)
                answer.headers.setRawHeaders(b"cache-status", [b"regproxy; hit; fwd=stale"])
                answer.headers.setRawHeaders(b"warning", [f'110 regproxy "Response is stale: {_reason(e)}"'.encode()])
                return answer, "regproxy; hit; fwd=stale"  # type: ignore[return-value]
            raise
        if fetched.code == 200:
            if len(self._listings) >= self._MAX_LISTINGS:
                self._listings.pop(next(iter(self._listings)))
            self._listings[key] = (self._clock.seconds(), fetched)
        elif fetched.code >= 500 or fetched.code == 429:
            kept = self._listings.get(key)
            if kept is not None and self._clock.seconds() - kept[0] <= self.LISTING_STALE:
                answer = BytesAnswer(200, kept[1].headers.copy(), b"" if method == b"HEAD" else kept[1].body)
                answer.headers.setRawHeaders(b"cache-status", [f"regproxy; hit; fwd=stale; fwd-status={fetched.code}".encode()])
                return answer, "regproxy; hit; fwd=stale"  # type: ignore[return-value]
        return self._passed(fetched, method, "regproxy; fwd=uri-miss")

    async def serve(self, origin: Origin, reference: str, method: bytes, rules: Sequence[TagRule]) -> tuple[IResponse, str]:
        if ":" in reference:
            answer, status = await self._by_digest(origin, reference, method, rules)
        else:
            answer, status = await self._by_tag(origin, reference, method, rules)
        if self.metrics is not None:
            self.metrics.cache.labels(origin.upstream.name, "manifest", cache_label(status)).inc()
        return answer, status

    # who is asking

    def _who(self, origin: Origin) -> tuple[str, float, str]:
        who, ttl = identity(origin.credentials, origin.headers)
        budget = who if origin.credentials is Credentials.CLIENT else f"proxy:{origin.upstream.config.username or 'anonymous'}"
        return who, ttl, budget

    # by digest

    async def _by_digest(self, origin: Origin, digest: str, method: bytes, rules: Sequence[TagRule]) -> tuple[IResponse, str]:
        upstream = origin.upstream.name
        who, ttl, budget = self._who(origin)
        blob = self.store.complete(digest)
        if blob is not None and split_digest(digest) is not None:
            allowed = self.rights.known(who, upstream, origin.repository) and self.store.linked(
                upstream, origin.repository, digest
            )
            if not allowed:
                allowed = await self._check_rights(origin, digest, rules)
            if allowed:
                data = self.store.read_bytes(blob)
                if data is not None:
                    self.counts["hit"] += 1
                    return self._answer(200, digest, blob.media_type, data, method, "regproxy; hit"), "regproxy; hit"
        if split_digest(digest) is None:
            return await self._relay(origin, method, b"regproxy; fwd=uri-miss")
        wait = self.budgets.blocked(upstream, budget)
        if wait:
            raise self._limited(upstream, budget, wait)
        fetched = await self._fetch(origin, b"GET", (upstream, origin.repository, digest, who))
        self.budgets.note(upstream, budget, fetched.code, fetched.headers)
        if fetched.code != 200:
            return self._passed(fetched, method, "regproxy; fwd=miss")
        media = self._media_type(fetched)
        if media in _SCHEMA1:
            return self._passed(fetched, method, "regproxy; fwd=uri-miss")
        if self._digest_of(fetched.body, digest) != digest:
            raise errors.RegistryError(502, "UNAVAILABLE", f"the upstream sent a manifest that is not {digest}")
        self._keep(origin, digest, fetched.body, media, who, ttl)
        status = "regproxy; fwd=miss; stored"
        self.counts["stored"] += 1
        return self._answer(200, digest, media, fetched.body, method, status), status

    async def _check_rights(self, origin: Origin, digest: str, rules: Sequence[TagRule]) -> bool:
        """Ask the upstream (a HEAD, free) whether this client may read this repository's manifest."""
        who, ttl, budget = self._who(origin)
        try:
            response, _ = await origin.fetch(b"HEAD")
        except _TROUBLE:
            # The upstream is down: what it let this identity read lately still holds, for a while.
            return self.rights.seen_within(
                who, origin.upstream.name, origin.repository, rule_for(rules, origin.repository).max_stale
            ) and self.store.linked(origin.upstream.name, origin.repository, digest)
        _discard(response)
        self.budgets.note(origin.upstream.name, budget, response.code, response.headers)
        if response.code == 200:
            self.rights.note(who, ttl, origin.upstream.name, origin.repository)
            self.store.link(origin.upstream.name, origin.repository, digest)
            return True
        return False

    # by tag

    async def _by_tag(self, origin: Origin, tag: str, method: bytes, rules: Sequence[TagRule]) -> tuple[IResponse, str]:
        upstream = origin.upstream.name
        who, ttl, budget = self._who(origin)
        key = accept_key(origin.headers)
        rule = rule_for(rules, origin.repository)
        entry = self.store.tag(upstream, origin.repository, tag, key)
        now = self._clock.seconds()
        if entry is not None and acceptable(entry.media_type, key):
            age = now - entry.validated
            known = self.rights.known(who, upstream, origin.repository)
            if known and age <= rule.fresh:
                answer = self._from_entry(entry, method, "regproxy; hit")
                if answer is not None:
                    self.counts["hit"] += 1
                    return answer, "regproxy; hit"
            if known and age <= rule.fresh + rule.stale_while_revalidate:
                answer = self._from_entry(entry, method, "regproxy; hit; fwd=stale; detail=revalidating")
                if answer is not None:
                    self._revalidate_later(origin, tag, key, who, ttl, budget)
                    self.counts["hit"] += 1
                    return answer, "regproxy; hit; fwd=stale; detail=revalidating"
            try:
                head = await self._fetch(origin, b"HEAD", (upstream, origin.repository, tag, key, who))
            except _TROUBLE as e:
                return self._stale(origin, entry, method, rule, who, f"upstream unreachable: {_reason(e)}")
            self.budgets.note(upstream, budget, head.code, head.headers)
            if head.code == 429 or head.code >= 500:
                return self._stale(origin, entry, method, rule, who, f"upstream answered {head.code}", head)
            if head.code == 200:
                self.rights.note(who, ttl, upstream, origin.repository)
                current = _header(head.headers, b"docker-content-digest")
                if current == entry.digest:
                    self.store.set_tag(upstream, origin.repository, tag, key, replace(entry, validated=now))
                    answer = self._from_entry(entry, method, "regproxy; hit; detail=revalidated")
                    if answer is not None:
                        self.counts["revalidated"] += 1
                        return answer, "regproxy; hit; detail=revalidated"
                if method == b"HEAD" and current:
                    self._remember(origin, tag, key, head, now)
                    return self._passed(head, method, "regproxy; fwd=stale; fwd-status=200")
            elif head.code == 404:
                self.store.forget_tag(upstream, origin.repository, tag, key)
            if head.code != 200:
                return await self._relay(origin, method, b"regproxy; fwd=miss")
        # A miss (or a tag that moved): ask the upstream.
        if method == b"HEAD":
            try:
                head = await self._fetch(origin, b"HEAD", (upstream, origin.repository, tag, key, who))
            except _TROUBLE:
                raise
            self.budgets.note(upstream, budget, head.code, head.headers)
            if head.code == 200:
                self.rights.note(who, ttl, upstream, origin.repository)
                self._remember(origin, tag, key, head, now)
            return self._passed(head, method, "regproxy; fwd=miss")
        wait = self.budgets.blocked(upstream, budget)
        if wait:
            if entry is not None:
                return self._stale(origin, entry, method, rule, who, "rate limit reached")
            raise self._limited(upstream, budget, wait)
        try:
            fetched = await self._fetch(origin, b"GET", (upstream, origin.repository, tag, key, who, "GET"))
        except _TROUBLE as e:
            if entry is not None:
                return self._stale(origin, entry, method, rule, who, f"upstream unreachable: {_reason(e)}")
            raise
        self.budgets.note(upstream, budget, fetched.code, fetched.headers)
        if fetched.code == 429 and entry is None:
            raise self._limited(upstream, budget, retry_after(fetched.headers))
        if fetched.code != 200:
            if entry is not None and (fetched.code == 429 or fetched.code >= 500):
                return self._stale(origin, entry, method, rule, who, f"upstream answered {fetched.code}")
            return self._passed(fetched, method, "regproxy; fwd=miss")
        media = self._media_type(fetched)
        if media in _SCHEMA1:
            return self._passed(fetched, method, "regproxy; fwd=uri-miss")
        digest = self._digest_of(fetched.body, _header(fetched.headers, b"docker-content-digest"))
        claimed = _header(fetched.headers, b"docker-content-digest")
        if claimed and claimed != digest:
            raise errors.RegistryError(502, "UNAVAILABLE", "the upstream's manifest does not match its digest")
        self.rights.note(who, ttl, upstream, origin.repository)
        self._keep(origin, digest, fetched.body, media, who, ttl)
        self.store.set_tag(upstream, origin.repository, tag, key, Tag(digest, media, len(fetched.body), now))
        self.counts["stored"] += 1
        status = "regproxy; fwd=miss; stored"
        return self._answer(200, digest, media, fetched.body, method, status), status

    def _remember(self, origin: Origin, tag: str, key: str, head: _Fetched, now: float) -> None:
        """A HEAD told the tag's digest (and size, type): keep it, the body comes with the GET by digest."""
        digest = _header(head.headers, b"docker-content-digest")
        length = _header(head.headers, b"content-length")
        if digest and split_digest(digest) and length and length.isdigit():
            found = Tag(digest, self._media_type(head), int(length), now)
            self.store.set_tag(origin.upstream.name, origin.repository, tag, key, found)

    def _from_entry(self, entry: Tag, method: bytes, status: str) -> IResponse | None:
        """The cached answer for a tag entry; C{None} when its body isn't in the store (only a HEAD saw it)."""
        if method == b"HEAD":
            return self._head(entry.digest, entry.media_type, entry.size, status)
        blob = self.store.complete(entry.digest)
        data = self.store.read_bytes(blob) if blob is not None else None
        if data is None:
            return None
        return self._answer(200, entry.digest, entry.media_type, data, method, status)

    def _stale(
        self, origin: Origin, entry: Tag, method: bytes, rule: TagRule, who: str, why: str, head: _Fetched | None = None
    ) -> tuple[IResponse, str]:
        """Serve a cached tag while the upstream can't answer, within max-stale; else say why not."""
        age = self._clock.seconds() - entry.validated
        upstream = origin.upstream.name
        if age <= rule.max_stale and self.rights.seen_within(who, upstream, origin.repository, rule.max_stale):
            fwd = f"; fwd-status={head.code}" if head is not None else ""
            status = f"regproxy; hit; fwd=stale{fwd}"
            answer = self._from_entry(entry, method, status)
            if answer is not None:
                answer.headers.setRawHeaders(b"warning", [f'110 regproxy "Response is stale: {why}"'.encode()])
                self.counts["stale"] += 1
                self.log.info(
                    "serving {upstream}/{repository} stale ({age:.0f}s old): {why}",
                    upstream=upstream,
                    repository=origin.repository,
                    age=age,
                    why=why,
                )
                return answer, status
        if head is not None and head.code == 429:
            raise self._limited(upstream, self._who(origin)[2], retry_after(head.headers))
        raise errors.RegistryError(
            503 if head is None else 502, "UNAVAILABLE", f"{why}, and nothing fresh enough is cached"
        )

    def _revalidate_later(self, origin: Origin, tag: str, key: str, who: str, ttl: float, budget: str) -> None:
        """Stale-while-revalidate: one background HEAD per key, however many clients ask meanwhile."""
        job = (origin.upstream.name, origin.repository, tag, key, who)
        if job in self._revalidating:
            return
        self._revalidating.add(job)

        async def revalidate() -> None:
            try:
                head = await self._fetch(origin, b"HEAD", job)
                self.budgets.note(origin.upstream.name, budget, head.code, head.headers)
                if head.code != 200:
                    return
                self.rights.note(who, ttl, origin.upstream.name, origin.repository)
                entry = self.store.tag(origin.upstream.name, origin.repository, tag, key)
                digest = _header(head.headers, b"docker-content-digest")
                now = self._clock.seconds()
                if entry is not None and digest == entry.digest:
                    self.store.set_tag(origin.upstream.name, origin.repository, tag, key, replace(entry, validated=now))
                else:
                    self._remember(origin, tag, key, head, now)
            finally:
                self._revalidating.discard(job)

        Deferred.fromCoroutine(revalidate()).addErrback(lambda f: self.log.info("background revalidation failed: {e}", e=f.getErrorMessage()))

    # upstream exchanges, coalesced

    async def _fetch(self, origin: Origin, method: bytes, key: tuple[Any, ...]) -> _Fetched:
        """One upstream request per key however many ask at once; the answer read whole (bounded)."""
        job = (method, *key)
        waiting = self._inflight.get(job)
        waiter: Deferred[_Fetched] = Deferred()
        if waiting is not None:
            waiting.append(waiter)
            self.counts["coalesced"] += 1
            return await waiter
        self._inflight[job] = [waiter]

        async def exchange() -> _Fetched:
            response, _ = await origin.fetch(method)
            if method == b"HEAD":
                _discard(response)
                return _Fetched(response.code, response.headers, b"")
            body = await read_bounded(response, MAX_SMALL_BODY, "manifest")
            return _Fetched(response.code, response.headers, body)

        Deferred.fromCoroutine(exchange()).addBoth(self._deliver, job)
        return await waiter

    def _deliver(self, result: _Fetched | Failure, job: tuple[Any, ...]) -> None:
        for waiter in self._inflight.pop(job, []):
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _relay(self, origin: Origin, method: bytes, status: bytes) -> tuple[IResponse, str]:
        """Pass the request through (the client gets exactly the upstream's answer)."""
        response, _ = await origin.fetch(method)
        response.headers.setRawHeaders(b"cache-status", [status])
        self.counts["passed"] += 1
        return response, status.decode()

    # storing and answering

    def _keep(self, origin: Origin, digest: str, body: bytes, media: str, who: str, ttl: float) -> None:
        """Store a verified manifest, link it and what it refers to, and prefetch an image's blobs."""
        upstream = origin.upstream.name
        self.rights.note(who, ttl, upstream, origin.repository)
        self.store.put_bytes(digest, body, media)
        self.store.link(upstream, origin.repository, digest)
        refs, image = children(body)
        for ref in refs:
            self.store.link(upstream, origin.repository, ref)
        if image and self._prefetching is not None and origin.credentials is not Credentials.NONE:
            for ref in refs:
                if self.store.complete(ref) is None:
                    self._prefetch(origin, ref)

    def _prefetch(self, origin: Origin, digest: str) -> None:
        upstream = origin.upstream
        headers = origin.headers.copy()
        for name in (b"accept", b"range", b"if-none-match", b"if-match"):
            headers.removeHeader(name)
        blob = Origin(
            upstream,
            origin.tokens,
            origin.repository,
            upstream.url(f"/v2/{origin.repository}/blobs/{digest}", b""),
            headers,
            origin.credentials,
            origin.scope,
        )
        assert self._prefetching is not None

        def run() -> Deferred[None]:
            return Deferred.fromCoroutine(self.blobs.prefetch(blob, digest))

        self._prefetching.run(run).addErrback(
            lambda f: self.log.info("prefetch of {digest} failed: {e}", digest=digest, e=f.getErrorMessage())
        )

    @staticmethod
    def _media_type(fetched: _Fetched) -> str:
        return (_header(fetched.headers, b"content-type") or "application/octet-stream").strip()

    @staticmethod
    def _digest_of(body: bytes, claimed: str | None) -> str:
        algorithm = (claimed or "sha256:").partition(":")[0]
        if algorithm not in ("sha256", "sha512"):
            algorithm = "sha256"
        return f"{algorithm}:" + hashlib.new(algorithm, body).hexdigest()

    def _answer(self, code: int, digest: str, media: str, body: bytes, method: bytes, status: str) -> IResponse:
        headers = self._headers(digest, media, len(body), status)
        return BytesAnswer(code, headers, b"" if method == b"HEAD" else body)  # type: ignore[return-value]

    def _head(self, digest: str, media: str, size: int, status: str) -> IResponse:
        return BytesAnswer(200, self._headers(digest, media, size, status), b"")  # type: ignore[return-value]

    @staticmethod
    def _headers(digest: str, media: str, size: int, status: str) -> Headers:
        return Headers(
            {
                b"content-type": [media.encode("latin-1")],
                b"docker-content-digest": [digest.encode("ascii")],
                b"content-length": [b"%d" % size],
                b"etag": [b'"' + digest.encode("ascii") + b'"'],
                b"cache-status": [status.encode("ascii")],
                API_VERSION_HEADER[0]: API_VERSION_HEADER[1],
            }
        )

    def _passed(self, fetched: _Fetched, method: bytes, status: str) -> tuple[IResponse, str]:
        headers = fetched.headers.copy()
        if fetched.code != 200:
            status += f"; fwd-status={fetched.code}"
        headers.setRawHeaders(b"cache-status", [status.encode("ascii")])
        self.counts["passed"] += 1
        length = _header(fetched.headers, b"content-length")
        answer = BytesAnswer(fetched.code, headers, fetched.body)
        if method == b"HEAD" and length:
            headers.setRawHeaders(b"content-length", [length.encode()])
        return answer, status  # type: ignore[return-value]

    def _limited(self, upstream: str, budget: str, wait: float) -> errors.RegistryError:
        return errors.RegistryError(
            429,
            "TOOMANYREQUESTS",
            f"{self.budgets.describe(upstream, budget)} is used up and this is not cached; retry later",
            headers={b"Retry-After": [b"%d" % max(1, round(wait))]},
        )


def _header(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1").strip() if values else None


def _reason(error: BaseException) -> str:
    """A short human reason (Twisted's client errors wrap a list of Failures)."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        text = "; ".join(r.getErrorMessage() for r in reasons if hasattr(r, "getErrorMessage"))
    else:
        text = str(error)
    return (text or type(error).__name__)[:200].replace('"', "'")


def _discard(response: IResponse) -> None:
    discard(response)
