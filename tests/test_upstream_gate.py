"""The upstream budget and the circuit breaker at unit level, on a clock the tests move."""

from __future__ import annotations

import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from depproxy_pyramid.services.fills import Fill, FillStream
from depproxy_pyramid.services.proxy import upstream_error
from depproxy_pyramid.storage.filesystem import FilesystemStorage
from depproxy_pyramid.upstream import (
    UpstreamAuthFailed,
    UpstreamBadDigest,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from depproxy_pyramid.upstream.gate import (
    BUSY_RETRY_AFTER,
    COOLDOWN_SECONDS,
    FAILURES_TO_OPEN,
    BreakerState,
    CircuitBreaker,
    UpstreamBusy,
    UpstreamCircuitOpen,
    UpstreamGate,
    means_down,
)

REGISTRY = "registry.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def changes() -> list[tuple[str, BreakerState]]:
    return []


@pytest.fixture
def breaker(clock, changes) -> CircuitBreaker:
    return CircuitBreaker(REGISTRY, clock=clock, on_change=lambda *change: changes.append(change))


def fail(breaker: CircuitBreaker, error: UpstreamError | None = None) -> None:
    error = error or UpstreamTimeout("upstream timed out")
    with pytest.raises(type(error)), breaker.call():
        raise error


def succeed(breaker: CircuitBreaker) -> None:
    with breaker.call():
        pass


def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(FAILURES_TO_OPEN):
        fail(breaker)
    assert breaker.state is BreakerState.OPEN


DOWN = [
    UpstreamTimeout("read timed out"),
    UpstreamUnreachable("connection refused"),
    UpstreamUnavailable("bad gateway", status=502),
    UpstreamUnavailable("unavailable", status=503),
    UpstreamUnavailable("gateway timeout", status=504),
]
ANSWERED = [
    UpstreamNotFound("no such manifest", status=404),
    UpstreamNotFound("denied", status=401),
    UpstreamRateLimited("slow down", retry_after=7),
    UpstreamAuthFailed("rejected", status=401),
    UpstreamBadDigest("wrong bytes"),
    UpstreamInvalid("not a manifest", detail="text/html"),
    UpstreamUnavailable("internal error", status=500),
]


@pytest.mark.parametrize("error", DOWN, ids=lambda e: type(e).__name__ + str(e.status or ""))
def test_timeouts_refusals_and_gateway_errors_mean_down(error):
    assert means_down(error)


@pytest.mark.parametrize("error", ANSWERED, ids=lambda e: type(e).__name__ + str(e.status or ""))
def test_answers_mean_up(error):
    assert not means_down(error)


def test_the_gate_s_own_refusals_mean_nothing():
    assert not means_down(UpstreamBusy("busy", retry_after=5))
    assert not means_down(UpstreamCircuitOpen("open", retry_after=5))


def test_consecutive_failures_open_the_breaker(breaker, changes):
    for _ in range(FAILURES_TO_OPEN - 1):
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert changes == [(REGISTRY, BreakerState.OPEN)]


@pytest.mark.parametrize("answer", ANSWERED, ids=lambda e: type(e).__name__ + str(e.status or ""))
def test_an_answer_resets_the_count(breaker, answer):
    for _ in range(FAILURES_TO_OPEN - 1):
        fail(breaker)
    fail(breaker, answer)
    for _ in range(FAILURES_TO_OPEN - 1):
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED


def test_a_refused_name_neither_counts_nor_resets(breaker):
    for _ in range(FAILURES_TO_OPEN - 1):
        fail(breaker)
    fail(breaker, UpstreamRefused("unsafe name"))
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_open_breaker_refuses_without_calling_for_the_cooldown(breaker, clock):
    open_breaker(breaker)
    clock.now += 3.5
    called = False
    with pytest.raises(UpstreamCircuitOpen) as refused, breaker.call():
        called = True
    assert not called
    assert refused.value.retry_after == 7  # what is left of the cooldown, rounded up
    assert "upstream registry is unavailable" in refused.value.message
    with pytest.raises(UpstreamCircuitOpen):
        breaker.check()
    clock.now += COOLDOWN_SECONDS - 3.5 - 0.01
    with pytest.raises(UpstreamCircuitOpen) as refused:
        breaker.check()
    assert refused.value.retry_after == 1


def test_after_the_cooldown_exactly_one_probe_goes_through(breaker, clock, changes):
    open_breaker(breaker)
    clock.now += COOLDOWN_SECONDS
    breaker.check()  # would let a call through, and admits none itself
    with breaker.call():
        assert breaker.state is BreakerState.HALF_OPEN
        with pytest.raises(UpstreamCircuitOpen) as refused:
            breaker.check()
        assert refused.value.retry_after == 1
        with pytest.raises(UpstreamCircuitOpen), breaker.call():
            pytest.fail("a second call went through while the probe ran")
    assert breaker.state is BreakerState.CLOSED
    assert changes == [
        (REGISTRY, BreakerState.OPEN),
        (REGISTRY, BreakerState.HALF_OPEN),
        (REGISTRY, BreakerState.CLOSED),
    ]


def test_a_failed_probe_opens_the_breaker_for_another_cooldown(breaker, clock):
    open_breaker(breaker)
    clock.now += COOLDOWN_SECONDS + 60
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(UpstreamCircuitOpen) as refused:
        breaker.check()
    assert refused.value.retry_after == COOLDOWN_SECONDS


@pytest.mark.parametrize(
    "abandon",
    [UpstreamRefused("unsafe name"), RuntimeError("a bug"), UpstreamBusy("", retry_after=5)],
)
def test_an_abandoned_probe_lets_the_next_call_probe(breaker, clock, abandon):
    open_breaker(breaker)
    clock.now += COOLDOWN_SECONDS
    with pytest.raises(type(abandon)), breaker.call():
        raise abandon
    assert breaker.state is BreakerState.HALF_OPEN
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED


def test_calls_let_through_before_the_breaker_opened_decide_nothing_after(breaker, clock):
    early_success, early_failure = breaker.call(), breaker.call()
    early_success.__enter__()
    early_failure.__enter__()
    open_breaker(breaker)
    early_success.__exit__(None, None, None)
    assert breaker.state is BreakerState.OPEN
    clock.now += COOLDOWN_SECONDS
    with breaker.call():  # the probe
        late = UpstreamTimeout("late")
        assert early_failure.__exit__(UpstreamTimeout, late, None) is False
        assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.state is BreakerState.CLOSED


def test_state_changes_are_logged_once(breaker, clock, caplog):
    caplog.set_level(logging.INFO, logger="depproxy_pyramid.upstream.gate")
    open_breaker(breaker)
    for _ in range(3):
        with pytest.raises(UpstreamCircuitOpen), breaker.call():
            pass
    clock.now += COOLDOWN_SECONDS
    fail(breaker)  # the probe fails: still the same outage
    clock.now += COOLDOWN_SECONDS
    succeed(breaker)
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(records) == 2
    assert records[0][0] == "WARNING"
    assert f"upstream {REGISTRY} failed {FAILURES_TO_OPEN} times in a row" in records[0][1]
    assert records[1] == ("INFO", f"upstream {REGISTRY} answers again: contacting it as usual")


def eventually(condition, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_only_one_of_many_concurrent_calls_is_the_probe(breaker, clock):
    open_breaker(breaker)
    clock.now += COOLDOWN_SECONDS
    inside = threading.Event()
    release = threading.Event()
    start = threading.Barrier(16)

    def attempt() -> str:
        start.wait()
        try:
            with breaker.call():
                inside.set()
                release.wait(5)
                return "probe"
        except UpstreamCircuitOpen:
            return "refused"

    with ThreadPoolExecutor(16) as pool:
        results = [pool.submit(attempt) for _ in range(16)]
        assert inside.wait(5)
        # Everyone but the probe is refused while it is still in flight.
        assert eventually(lambda: sum(result.done() for result in results) == 15)
        release.set()
        outcomes = sorted(result.result(5) for result in results)
    assert outcomes == ["probe"] + ["refused"] * 15
    assert breaker.state is BreakerState.CLOSED


# -- the budget ---------------------------------------------------------------------------


@pytest.fixture
def gate(clock) -> UpstreamGate:
    return UpstreamGate(4, [REGISTRY, "other.test"], clock=clock)


def test_a_full_budget_refuses_at_once(gate):
    slots = [gate.slot(REGISTRY) for _ in range(3)] + [gate.slot("other.test")]
    assert gate.in_flight == 4
    with pytest.raises(UpstreamBusy) as busy:
        gate.slot("other.test")
    assert busy.value.retry_after == BUSY_RETRY_AFTER
    assert busy.value.message == "the proxy is waiting on too many upstream requests; retry later"
    slots[0].release()
    assert gate.in_flight == 3
    gate.slot("other.test")
    assert gate.in_flight == 4


def test_one_of_several_registries_holds_at_most_its_share(gate):
    assert gate.per_registry == 3
    held = [gate.slot(REGISTRY) for _ in range(3)]
    with pytest.raises(UpstreamBusy):
        gate.slot(REGISTRY)
    # A registry that hangs leaves the others room until its breaker opens.
    with gate.slot("other.test"):
        assert gate.in_flight == 4
    held[0].release()
    gate.slot(REGISTRY)


def test_a_lone_registry_may_take_the_whole_budget():
    gate = UpstreamGate(4, [REGISTRY])
    held = [gate.slot(REGISTRY) for _ in range(4)]
    assert gate.in_flight == len(held) == 4
    with pytest.raises(UpstreamBusy):
        gate.slot(REGISTRY)


def test_a_slot_is_released_once(gate):
    slot = gate.slot(REGISTRY)
    other = gate.slot(REGISTRY)
    slot.release()
    slot.release()
    assert gate.in_flight == 1
    with other:
        pass
    assert gate.in_flight == 0



def test_the_changes_reported_add_up_to_the_slots_in_use():
    changes: list[int] = []
    gate = UpstreamGate(2, [REGISTRY], on_in_flight_change=changes.append)
    slot = gate.slot(REGISTRY)
    with gate.slot(REGISTRY):
        with pytest.raises(UpstreamBusy):
            gate.slot(REGISTRY)
        assert sum(changes) == gate.in_flight == 2
    slot.release()
    slot.release()
    assert changes == [1, 1, -1, -1]

def test_the_budget_is_shared_by_every_registry(gate):
    with gate.call(REGISTRY), gate.call("other.test"), gate.call(REGISTRY), gate.call("other.test"):
        assert gate.in_flight == 4
        with pytest.raises(UpstreamBusy), gate.call("other.test"):
            pass
    assert gate.in_flight == 0


def test_a_refused_call_takes_no_slot_and_an_open_breaker_is_said_first(gate, clock):
    for _ in range(FAILURES_TO_OPEN):
        with pytest.raises(UpstreamTimeout), gate.call(REGISTRY):
            raise UpstreamTimeout("hung")
    assert gate.in_flight == 0
    held = [gate.slot(REGISTRY) for _ in range(3)]
    with pytest.raises(UpstreamCircuitOpen), gate.call(REGISTRY):
        pass
    # Past the cooldown a busy budget refuses the probe without spending it.
    clock.now += COOLDOWN_SECONDS
    with pytest.raises(UpstreamBusy), gate.call(REGISTRY):
        pass
    held[0].release()
    with gate.call(REGISTRY):
        assert gate.breaker(REGISTRY).state is BreakerState.HALF_OPEN
    assert gate.breaker(REGISTRY).state is BreakerState.CLOSED
    assert gate.breaker("other.test").state is BreakerState.CLOSED
    assert gate.in_flight == 2


def test_every_registry_starts_closed_on_the_gauge():
    seen: list[tuple[str, BreakerState]] = []
    UpstreamGate(1, [REGISTRY, "other.test"], on_change=lambda *change: seen.append(change))
    assert sorted(seen) == [("other.test", BreakerState.CLOSED), (REGISTRY, BreakerState.CLOSED)]


def test_of_many_racing_for_slots_exactly_the_budget_gets_one():
    gate = UpstreamGate(8, [REGISTRY])
    start = threading.Barrier(32)
    release = threading.Event()

    def race() -> bool:
        start.wait()
        try:
            slot = gate.slot(REGISTRY)
        except UpstreamBusy:
            return False
        with slot:
            release.wait(5)
        return True

    with ThreadPoolExecutor(32) as pool:
        results = [pool.submit(race) for _ in range(32)]
        assert eventually(lambda: sum(result.done() for result in results) == 24)
        assert gate.in_flight == 8
        release.set()
        assert sorted(result.result(5) for result in results) == [False] * 24 + [True] * 8
    assert gate.in_flight == 0


def test_churning_slots_leaves_none_held():
    gate = UpstreamGate(8, [REGISTRY])
    lock = threading.Lock()
    held = most = 0

    def churn() -> None:
        nonlocal held, most
        for _ in range(300):
            try:
                slot = gate.slot(REGISTRY)
            except UpstreamBusy:
                continue
            with lock:
                held += 1
                most = max(most, held)
            time.sleep(0)
            with lock:
                held -= 1
            slot.release()
            slot.release()

    threads = [threading.Thread(target=churn) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= most <= 8
    assert gate.in_flight == 0


# -- a fill's reader holds its slot until closed --------------------------------------------


@pytest.fixture
def fill(tmp_path) -> Fill:
    digest = "sha256:" + "0" * 64
    return Fill(digest, FilesystemStorage(str(tmp_path)), "blobs/sha256/" + "0" * 64)


def test_closing_a_fill_stream_releases_its_slot_once(gate, fill):
    stream = FillStream(fill, gate.slot(REGISTRY).release)
    other = gate.slot(REGISTRY)
    reader = stream.read()
    stream.close()
    stream.close()
    assert gate.in_flight == 1
    assert reader.gi_frame is None  # closed: it will not wait for more bytes
    other.release()
    assert gate.in_flight == 0


def test_a_fill_stream_dropped_unclosed_releases_its_slot(gate, fill):
    stream = FillStream(fill, gate.slot(REGISTRY).release)
    assert gate.in_flight == 1
    del stream
    gc.collect()
    assert gate.in_flight == 0


def test_a_fill_stream_is_closed_when_building_its_response_fails(gate, fill):
    stream = FillStream(fill, gate.slot(REGISTRY).release)
    with pytest.raises(LookupError), stream.closed_on_error():
        raise LookupError("416")
    assert gate.in_flight == 0
    other = FillStream(fill, gate.slot(REGISTRY).release)
    with other.closed_on_error():
        pass
    assert gate.in_flight == 1  # no error: the response body owns it now
    other.close()
    assert gate.in_flight == 0


@pytest.mark.parametrize(
    ("refusal", "retry_after"),
    [
        (UpstreamBusy("the proxy is waiting on too many upstream requests", retry_after=5), "5"),
        (UpstreamCircuitOpen("the upstream registry is unavailable", retry_after=7), "7"),
    ],
)
def test_a_refusal_is_a_503_with_retry_after_and_no_log_line(refusal, retry_after, caplog):
    caplog.set_level(logging.DEBUG)
    error = upstream_error(refusal, "BLOB_UNKNOWN", "sha256:" + "0" * 64)
    assert (error.status, error.code, error.message) == (503, "UNAVAILABLE", refusal.message)
    assert error.headers == {"Retry-After": retry_after}
    assert caplog.records == []
