"""Prometheus metrics an operator watches: hits, misses, stale serves, upstream errors, bytes,
and how much waits on upstream."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    """One set of metrics per application, so several apps in one process stay apart."""

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
        self.upstream_in_flight = Gauge(
            "depproxy_upstream_in_flight",
            "Requests waiting on upstream now, each holding one of depproxy.upstream.max_in_flight "
            "slots (a blob transfer's until its client's body is done).",
            registry=self.registry,
        )
        self.upstream_circuit = Gauge(
            "depproxy_upstream_circuit_state",
            "The circuit breaker of each upstream registry: 0 closed (contacted as usual), "
            "1 half-open (one probe in flight), 2 open (not contacted until the cooldown ends).",
            ["registry"],
            registry=self.registry,
        )
