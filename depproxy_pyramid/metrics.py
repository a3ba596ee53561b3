"""Prometheus metrics an operator watches: hits, misses, stale serves, upstream errors, bytes,
and how much waits on upstream.

With `PROMETHEUS_MULTIPROC_DIR` set, every server process of a node writes its values to files
in that directory and `/-/metrics` answers the sum over all of them, so any one process behind
the load balancer reports the node's totals. prometheus_client picks where values live when it
is imported, from this variable: it must be in the environment before the process starts
(systemd's `Environment=`), not set by the application.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, multiprocess

MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

# prometheus_client's file for the live gauges of one process: gauge_livesum_1234.db.
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


class Metrics:
    """The metrics of one application; several apps in one process stay apart, except in
    multiprocess mode, where the process has one set (`for_app`)."""

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
        # Each process has its own budget: the node's slots in use are the sum over the
        # processes that are running.
        self.upstream_in_flight = Gauge(
            "depproxy_upstream_in_flight",
            "Requests waiting on upstream now, each holding one of depproxy.upstream.max_in_flight "
            "slots (a blob transfer's until its client's body is done).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        # Each process has its own breaker per registry. Across processes the worst state
        # counts (open > half-open > closed): some process refuses that registry's uncached
        # pulls. A series per process id instead would start a new series at every restart.
        self.upstream_circuit = Gauge(
            "depproxy_upstream_circuit_state",
            "The circuit breaker of each upstream registry: 0 closed (contacted as usual), "
            "1 half-open (one probe in flight), 2 open (not contacted until the cooldown ends).",
            ["registry"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    @classmethod
    def for_app(cls) -> Metrics:
        """The metrics an application records to: its own set, or in multiprocess mode the
        process's one set (two sets in one process would overwrite each other's values in the
        process's files)."""
        if MULTIPROCESS_DIR is None:
            return cls()
        return _process_metrics()

    def exposition(self) -> bytes:
        """The text format of these metrics, or in multiprocess mode of every process that
        shares the directory, dead ones' counters included."""
        if MULTIPROCESS_DIR is None:
            return generate_latest(self.registry)
        node = CollectorRegistry()
        multiprocess.MultiProcessCollector(node, path=MULTIPROCESS_DIR)
        return generate_latest(node)


@functools.cache
def _process_metrics() -> Metrics:
    _forget_dead_processes(Path(MULTIPROCESS_DIR))
    return Metrics()


def forget_this_process() -> None:
    """Take this process's live gauges out of the node's figures, as it exits; its counters
    stay in the sum."""
    if MULTIPROCESS_DIR is not None:
        multiprocess.mark_process_dead(os.getpid(), MULTIPROCESS_DIR)


def _forget_dead_processes(directory: Path) -> None:
    """Take the live gauges of processes that died without `forget_this_process` (killed, or
    crashed and restarted by systemd) out of the node's figures."""
    for path in directory.glob("gauge_live*.db"):
        match = _LIVE_GAUGE_FILE.match(path.name)
        if match is not None and not _is_running(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), str(directory))


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
