"""Isolation from upstream: a budget of requests waiting on it, and a breaker per registry.

A hung upstream holds every request that waits on it for the read timeout. Unbounded, such
requests take every server thread, and pulls the cache could answer at once queue behind them.
So each request waiting on upstream holds one of a fixed number of slots, and a request that
finds none free is refused at once (`UpstreamBusy`); the server must run more threads than there
are slots, so a cached pull always finds a worker.

A registry that keeps hanging or refusing connections is not asked at all for a while
(`CircuitBreaker`): after `FAILURES_TO_OPEN` consecutive failures that mean it is down, calls to
it are refused at once (`UpstreamCircuitOpen`) for `COOLDOWN_SECONDS`; then one probe goes
through, and its success closes the breaker again.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType

from .errors import (
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)

log = logging.getLogger(__name__)

# Five in a row: one failure is a blip (and the transport already retried connection errors and
# 502/503/504 once), while a hung registry times out every request, so five accrue within one
# read timeout under any real load and the breaker opens before the budget has filled twice.
# With several registries configured, the most of the budget one of them may hold: a registry
# that hangs fills its share before its breaker opens (that takes five read timeouts), and the
# others keep the rest.
REGISTRY_SHARE = 0.75
FAILURES_TO_OPEN = 5
# Long enough that a down registry is not asked again by every pull, short enough that its
# recovery is noticed within a Docker client's own retries; the probe after it costs one slot.
COOLDOWN_SECONDS = 10.0
# A slot frees as soon as any upstream call in flight ends; a client may come back soon.
BUSY_RETRY_AFTER = 5
# Statuses that mean the registry (or the load balancer in front of it) is down, not that it
# answered: 404, 401 and 429 are answers, and count as the registry being up.
DOWN_STATUSES = frozenset({502, 503, 504})


class UpstreamHeldBack(UpstreamUnavailable):
    """The proxy did not contact upstream, to keep serving what it has; `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamBusy(UpstreamHeldBack):
    """Every slot of the budget is taken by a request waiting on upstream."""


class UpstreamCircuitOpen(UpstreamHeldBack):
    """The registry failed repeatedly and is not contacted until its breaker's cooldown ends."""


def means_down(error: UpstreamError) -> bool:
    """Whether a failed call says the registry hangs or is down, rather than that it answered."""
    if isinstance(error, UpstreamHeldBack):
        return False
    return isinstance(error, UpstreamTimeout | UpstreamUnreachable) or (
        isinstance(error, UpstreamUnavailable) and error.status in DOWN_STATUSES
    )


class BreakerState(enum.IntEnum):
    """The values of the `depproxy_upstream_circuit_state` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """The breaker of one upstream registry; safe to share between threads.

    Closed, it counts consecutive failures that mean the registry is down, and any call that got
    an answer resets the count. Open, it refuses every call until the cooldown has passed; then
    the first call is the probe (half-open) and every other is refused while it runs. The probe's
    success closes the breaker, its failure opens it for another cooldown. Calls that were let
    through before the breaker opened decide nothing once it has.
    """

    def __init__(
        self,
        registry: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self.registry = registry
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def check(self) -> None:
        """Raise UpstreamCircuitOpen if a call now would be refused; admits nothing."""
        with self._lock:
            refusal = self._refusal()
        if refusal is not None:
            raise refusal

    @contextmanager
    def call(self) -> Iterator[None]:
        """One call to the registry: refused with UpstreamCircuitOpen while the breaker is open
        (or another call is its probe), and its outcome recorded when the block ends."""
        probe = self._admit()
        try:
            yield
        except UpstreamError as error:
            if means_down(error):
                self._record(probe, succeeded=False)
            elif isinstance(error, UpstreamRefused | UpstreamHeldBack):
                # Upstream was not asked, so it said nothing about its health.
                self._abandon(probe)
            else:
                self._record(probe, succeeded=True)
            raise
        except BaseException:
            self._abandon(probe)
            raise
        else:
            self._record(probe, succeeded=True)

    def _refusal(self) -> UpstreamCircuitOpen | None:
        if self._state is BreakerState.CLOSED:
            return None
        remaining = self._opened_at + COOLDOWN_SECONDS - self._clock()
        if self._state is BreakerState.OPEN and remaining > 0:
            retry_after = math.ceil(remaining)
        elif self._probing:
            retry_after = 1  # the probe's answer is due within one read timeout
        else:
            return None
        return UpstreamCircuitOpen(
            f"the upstream registry is unavailable: it failed {FAILURES_TO_OPEN} times in a row "
            f"and is not contacted for another {retry_after} s",
            retry_after=retry_after,
        )

    def _admit(self) -> bool:
        """Let one call through, or raise; whether it is the probe."""
        with self._lock:
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            if self._state is BreakerState.CLOSED:
                return False
            self._probing = True
            self._set(BreakerState.HALF_OPEN)
            return True

    def _record(self, probe: bool, *, succeeded: bool) -> None:
        with self._lock:
            if probe:
                self._probing = False
            elif self._state is not BreakerState.CLOSED:
                return
            if succeeded:
                self._failures = 0
                self._set(BreakerState.CLOSED)
                return
            self._failures += 1
            if probe or self._failures >= FAILURES_TO_OPEN:
                self._opened_at = self._clock()
                self._set(BreakerState.OPEN)

    def _abandon(self, probe: bool) -> None:
        if probe:
            with self._lock:
                self._probing = False

    def _set(self, state: BreakerState) -> None:
        """Called with the lock held."""
        previous, self._state = self._state, state
        if state is previous:
            return
        if previous is BreakerState.CLOSED:
            log.warning(
                "upstream %s failed %d times in a row (timeouts, refused or reset connections, "
                "502/503/504): not contacting it for %d s; cached manifests and blobs are "
                "served, uncached ones answer 503",
                self.registry,
                self._failures,
                COOLDOWN_SECONDS,
            )
        elif state is BreakerState.CLOSED:
            log.info("upstream %s answers again: contacting it as usual", self.registry)
        if self._on_change is not None:
            self._on_change(self.registry, state)


class Slot:
    """A place in the budget, held while waiting on upstream; `release` is idempotent."""

    def __init__(self, gate: UpstreamGate, registry: str) -> None:
        self._gate: UpstreamGate | None = gate
        self._registry = registry

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._release(self._registry)

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class UpstreamGate:
    """The budget of requests waiting on upstream in this process, and a breaker per registry."""

    def __init__(
        self,
        max_in_flight: int,
        registries: Iterable[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
        on_in_flight_change: Callable[[int], None] | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight
        # Called with 1 when a slot is taken and -1 when it is given back: changes, not the
        # count, so that gauges of several gates (or processes) add up.
        self._on_in_flight_change = on_in_flight_change
        self._lock = threading.Lock()
        self._in_flight = 0
        self._breakers = {
            registry: CircuitBreaker(registry, clock=clock, on_change=on_change)
            for registry in registries
        }
        self._held: Counter[str] = Counter()
        self.per_registry = (
            max_in_flight
            if len(self._breakers) == 1
            else max(1, math.floor(max_in_flight * REGISTRY_SHARE))
        )
        if on_change is not None:
            for registry in self._breakers:
                on_change(registry, BreakerState.CLOSED)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def breaker(self, registry: str) -> CircuitBreaker:
        return self._breakers[registry]

    def slot(self, registry: str) -> Slot:
        """A slot of the budget for a request to `registry`, or UpstreamBusy at once when none
        is free or `registry` holds its share."""
        with self._lock:
            if self._in_flight >= self.max_in_flight or self._held[registry] >= self.per_registry:
                raise UpstreamBusy(
                    "the proxy is waiting on too many upstream requests; retry later",
                    retry_after=BUSY_RETRY_AFTER,
                )
            self._in_flight += 1
            self._held[registry] += 1
        if self._on_in_flight_change is not None:
            self._on_in_flight_change(1)
        return Slot(self, registry)

    def _release(self, registry: str) -> None:
        with self._lock:
            self._in_flight -= 1
            self._held[registry] -= 1
        if self._on_in_flight_change is not None:
            self._on_in_flight_change(-1)

    @contextmanager
    def call(self, registry: str) -> Iterator[None]:
        """A call to `registry` that holds a slot while it waits."""
        with self.breaker(registry).call(), self.slot(registry):
            yield
