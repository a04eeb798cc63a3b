"""Prometheus metrics (C{--metrics-listen}): what the proxy does, and what it saves.

Labels have bounded cardinality: configured upstream names, endpoint kinds,
methods, status classes, cache results, credential labels (the proxy's account
or "anonymous", never a client's). Never repository names or client addresses.

With C{--workers N} every process writes its figures into a shared directory
(prometheus_client's multiprocess mode, chosen by C{PROMETHEUS_MULTIPROC_DIR}
before the library is imported), and the first process, which alone listens on
the metrics endpoint, adds them up: one scrape sees all workers.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

_DURATIONS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def status_class(code: int) -> str:
    return f"{code // 100}xx" if 100 <= code < 600 else "other"


class Metrics:
    """Every metric the proxy exports, in one registry (or the multiprocess collector's)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "regproxy_requests_total",
            "Requests answered, by upstream, endpoint kind, method, status class and cache result.",
            ["upstream", "kind", "method", "status", "cache"],
            registry=r,
        )
        self.duration = Histogram(
            "regproxy_request_duration_seconds",
            "Time from the request to the end of its answer.",
            ["upstream", "kind"],
            buckets=_DURATIONS,
            registry=r,
        )
        self.first_byte = Histogram(
            "regproxy_time_to_first_byte_seconds",
            "Time from the request until its answer's head was ready.",
            ["upstream", "kind"],
            buckets=_DURATIONS,
            registry=r,
        )
        self.in_flight = Gauge(
            "regproxy_requests_in_flight", "Requests being answered now.", registry=r, multiprocess_mode="livesum"
        )
        self.client_bytes = Counter(
            "regproxy_client_bytes_total", "Body bytes sent to clients.", ["upstream", "kind", "cache"], registry=r
        )
        self.upstream_bytes = Counter(
            "regproxy_upstream_bytes_total", "Body bytes fetched from upstreams.", ["upstream", "kind"], registry=r
        )
        self.upstream_requests = Counter(
            "regproxy_upstream_requests_total",
            "Requests the proxy sent upstream (relayed, revalidations, fills, rights checks).",
            ["upstream", "method", "status"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "regproxy_upstream_errors_total",
            "Upstream exchanges that failed, by kind (timeout, unreachable, truncated, refused-redirect, other).",
            ["upstream", "error"],
            registry=r,
        )
        self.token_fetches = Counter(
            "regproxy_token_fetches_total",
            "Tokens the proxy fetched for itself, by result.",
            ["upstream", "result"],
            registry=r,
        )
        self.cache = Counter(
            "regproxy_cache_requests_total",
            "Cache lookups, by content (blob, manifest) and result (hit, stored, collapsed, revalidated, stale, "
            "passed; prefetched: a fill started ahead of the client).",
            ["upstream", "content", "result"],
            registry=r,
        )
        self.cache_size = Gauge(
            "regproxy_cache_size_bytes", "Bytes of complete blobs in the cache.", registry=r, multiprocess_mode="mostrecent"
        )
        self.evictions = Counter("regproxy_cache_evictions_total", "Blobs evicted from the cache.", registry=r)
        self.sendfile = Counter(
            "regproxy_cache_sendfile_answers_total", "Cache hits the kernel sent with sendfile(2).", registry=r
        )
        self.resumes = Counter(
            "regproxy_cache_fill_resumes_total", "Fills resumed with a Range after the upstream broke off.", registry=r
        )
        self.ratelimit_remaining = Gauge(
            "regproxy_ratelimit_remaining",
            "Pulls left in the upstream's rate-limit window (Docker Hub's ratelimit-remaining).",
            ["upstream", "credential"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.ratelimit_limit = Gauge(
            "regproxy_ratelimit_limit",
            "The upstream's rate limit per window (Docker Hub's ratelimit-limit).",
            ["upstream", "credential"],
            registry=r,
            multiprocess_mode="mostrecent",
        )

    def exposition(self) -> tuple[bytes, str]:
        """The text for a scrape (every worker's figures in multiprocess mode)."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def cache_label(status: str) -> str:
    """A cache status as a metric label: hit, stored, collapsed, revalidated, stale, passed, or none."""
    if status == "-":
        return "none"
    if "fwd=stale" in status:
        return "stale"
    for label in ("revalidated", "collapsed", "stored"):
        if label in status:
            return label
    return "hit" if "hit" in status else "passed"


def record_request(metrics: Metrics, request: Any, exchange: Any, status: int, duration: float) -> None:
    """One answered request's figures."""
    metrics.in_flight.dec()
    cache = cache_label(exchange.cache)
    upstream = exchange.upstream
    method = request.method.decode("latin-1")[:8]
    metrics.requests.labels(upstream, exchange.kind, method, status_class(status), cache).inc()
    metrics.duration.labels(upstream, exchange.kind).observe(duration)
    if exchange.head_ready is not None:
        metrics.first_byte.labels(upstream, exchange.kind).observe(exchange.head_ready - exchange.started)
    if request.sentLength:
        metrics.client_bytes.labels(upstream, exchange.kind, cache).inc(request.sentLength)
        if exchange.relayed:
            metrics.upstream_bytes.labels(upstream, exchange.kind).inc(request.sentLength)


def mark_worker_dead(pid: int) -> None:
    """A worker ended: its live gauges (in flight) no longer count."""
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class MetricsPage(Resource):
    """C{/metrics} on the metrics listener (and nothing else there)."""

    isLeaf = True

    def __init__(self, metrics: Metrics, before: Any = None) -> None:
        super().__init__()
        self._metrics = metrics
        self._before = before

    def render_GET(self, request: Request) -> bytes:
        if request.path not in (b"/metrics", b"/metrics/"):
            request.setResponseCode(404)
            return b"not found: see /metrics\n"
        if self._before is not None:
            self._before()
        body, content_type = self._metrics.exposition()
        request.setHeader(b"content-type", content_type.encode())
        return body
