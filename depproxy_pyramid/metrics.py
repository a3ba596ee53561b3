"""Prometheus counters an operator watches: hits, misses, stale serves, upstream errors, bytes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class Metrics:
    """One set of counters per application, so several apps in one process stay apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "depproxy_requests",
            "Registry requests by object kind and cache result (hit, miss, stale, error).",
            ["kind", "result"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "depproxy_upstream_errors",
            "Upstream calls that failed, by object kind and error type.",
            ["kind", "error"],
            registry=self.registry,
        )
        self.bytes_served = Counter(
            "depproxy_bytes_served",
            "Blob and manifest bytes sent to clients, by where they came from (cache, upstream).",
            ["source"],
            registry=self.registry,
        )
        self.upstream_fetches = Counter(
            "depproxy_upstream_blob_fetches",
            "Blob transfers started from upstream (one per fill, shared by concurrent clients).",
            registry=self.registry,
        )
