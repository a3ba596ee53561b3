"""Single-flight fills at unit level: upstream mocked with `responses`, spool and threads real."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest
import responses

from depproxy_pyramid.services import fills as fills_module
from depproxy_pyramid.services.fills import (
    BlobFills,
    BlobTooLarge,
    FillError,
    FillLimits,
    SpoolBudget,
    SpoolFull,
)
from depproxy_pyramid.upstream import UpstreamClient, UpstreamNotFound, UpstreamUnavailable

UPSTREAM = "https://registry.test"
BODY = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()


def blob_url(digest: str = DIGEST) -> str:
    return f"{UPSTREAM}/v2/library/app/blobs/{digest}"


class Committed:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str, bytes]] = []
        self.event = threading.Event()

    def __call__(self, group_id: int, fill) -> None:
        with open(fill.spool_path, "rb") as spool:
            self.calls.append((group_id, fill.digest, spool.read()))
        os.unlink(fill.spool_path)
        self.event.set()


@pytest.fixture
def committed() -> Committed:
    return Committed()


@pytest.fixture
def fills(tmp_path, committed) -> BlobFills:
    return BlobFills(str(tmp_path), committed)


def opener(digest: str = DIGEST):
    client = UpstreamClient(UPSTREAM)
    return lambda: client.open_blob("library/app", digest)


def upstream_held_until_released() -> threading.Event:
    """The upstream answers the blob only once the returned event is set."""
    gate = threading.Event()

    def held(request):
        gate.wait(5)
        return 200, {"Content-Length": str(len(BODY))}, BODY

    responses.add_callback(responses.GET, blob_url(), callback=held)
    return gate


def start(fills: BlobFills, digest: str = DIGEST):
    fill = fills.join_or_start(1, digest, lambda: False, opener(digest))
    fill.wait_started()
    return fill


@responses.activate
def test_readers_get_the_verified_blob_and_it_is_committed_once(fills, committed, tmp_path):
    # Held, so the fill is still running when the second request joins (a 3 MiB body could
    # otherwise be fetched and committed in between on a busy machine).
    released = upstream_held_until_released()
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    again = fills.join_or_start(1, DIGEST, lambda: False, opener())
    assert again is fill
    released.set()
    fill.wait_started()
    assert b"".join(fill.read()) == BODY
    assert b"".join(fill.read(10, 20)) == BODY[10:20]
    assert committed.event.wait(5)
    assert committed.calls == [(1, DIGEST, BODY)]
    assert len(responses.calls) == 1
    assert os.listdir(tmp_path) == []


@responses.activate
def test_unknown_length_is_verified_before_the_last_byte(fills, committed):
    responses.get(blob_url(), body=BODY)  # no Content-Length: size unknown until the end
    fill = start(fills)
    assert b"".join(fill.read()) == BODY
    assert committed.event.wait(5)


@pytest.mark.parametrize(
    "body",
    [BODY[:-1] + bytes([BODY[-1] ^ 1]), BODY + b"extra", b""],
    ids=["last-byte-flipped", "longer", "empty"],
)
@responses.activate
def test_wrong_bytes_never_reach_a_reader_whole(fills, committed, tmp_path, body):
    responses.get(blob_url(), body=body)
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    received = bytearray()
    with pytest.raises(FillError):
        fill.wait_started()
        for chunk in fill.read():
            received += chunk
    assert len(received) < max(len(body), 1)
    assert committed.calls == []
    assert os.listdir(tmp_path) == []


@responses.activate
def test_truncated_body_fails(fills, committed):
    responses.get(
        blob_url(), body=BODY[: len(BODY) // 2],
        headers={"Content-Length": str(len(BODY))}, auto_calculate_content_length=False,
    )
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    # Upstream's own error when the fill fails before anyone waits, a reader's after.
    with pytest.raises((UpstreamUnavailable, FillError)):
        fill.wait_started()
        for _ in fill.read():
            pass
    assert committed.calls == []


@responses.activate
def test_upstream_error_is_raised_to_every_waiter(fills, committed):
    responses.get(blob_url(), status=404)
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    with pytest.raises(UpstreamNotFound):
        fill.wait_started()
    with pytest.raises(UpstreamNotFound):
        fill.wait_started()
    assert committed.calls == []


@responses.activate
def test_empty_blob(fills, committed):
    digest = "sha256:" + hashlib.sha256(b"").hexdigest()
    responses.get(blob_url(digest), body=b"", auto_calculate_content_length=True)
    fill = start(fills, digest)
    assert b"".join(fill.read()) == b""
    assert committed.event.wait(5)


def test_a_cached_blob_starts_no_fill(fills):
    assert fills.join_or_start(1, DIGEST, lambda: True, opener()) is None
    assert fills.in_flight() == 0


@responses.activate
def test_concurrent_joiners_share_one_transfer(fills, committed):
    gate = upstream_held_until_released()
    results: list[bytes] = []
    lock = threading.Lock()

    def pull() -> None:
        fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
        if fill is None:
            return
        fill.wait_started()
        data = b"".join(fill.read())
        with lock:
            results.append(data)

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join(10)
    assert results == [BODY] * 8
    assert len(responses.calls) == 1
    assert committed.event.wait(5)
    assert len(committed.calls) == 1


@responses.activate
def test_spool_files_of_dead_fills_are_removed_at_start(tmp_path, committed):
    gate = upstream_held_until_released()
    abandoned = tmp_path / "fill-abandoned"
    abandoned.write_bytes(b"half a layer")
    fills = BlobFills(str(tmp_path), committed)
    assert not abandoned.exists()
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    # A second process starting now must not take the spool file of a fill in progress.
    BlobFills(str(tmp_path), committed)
    assert os.path.exists(fill.spool_path)
    gate.set()
    fill.wait_started()
    assert b"".join(fill.read()) == BODY


@responses.activate
def test_a_verified_fill_keeps_its_spool_file_locked_until_committed(tmp_path):
    responses.add(responses.GET, blob_url(), body=BODY)
    survived = []
    done = threading.Event()

    def commit(group_id: int, fill) -> None:
        # Another process starting (or `depproxy-admin cleanup`) while this one uploads.
        fills_module.remove_abandoned_spool_files(str(tmp_path))
        survived.append(os.path.exists(fill.spool_path))
        os.unlink(fill.spool_path)
        done.set()

    fills = BlobFills(str(tmp_path), commit)
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    assert b"".join(fill.read()) == BODY
    assert done.wait(5)
    assert survived == [True]


# -- bounds: what a hostile upstream cannot make a fill do ---------------------------------

MiB = 1024 * 1024


class Disk:
    """A stand-in for `shutil.disk_usage`, with as much free space as a test says."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, path: str) -> Disk:
        return self


@pytest.fixture
def disk(monkeypatch) -> Disk:
    disk = Disk(free=1 << 40)
    monkeypatch.setattr(fills_module.shutil, "disk_usage", disk)
    return disk


def start_limited(fills: BlobFills, limits: FillLimits, digest: str = DIGEST):
    return fills.join_or_start(1, digest, lambda: False, opener(digest), limits)


def read_all(fill) -> bytes:
    received = bytearray()
    for chunk in fill.read():
        received += chunk
    return bytes(received)


@responses.activate
def test_a_blob_declared_over_the_cap_is_refused_before_any_download(fills, committed, tmp_path):
    responses.get(blob_url(), body=BODY, auto_calculate_content_length=True)
    fill = start_limited(fills, FillLimits(max_size=MiB))
    with pytest.raises(BlobTooLarge, match=f"limit of {MiB} bytes"):
        fill.wait_started()
    assert fill.written == 0
    assert committed.calls == []
    assert os.listdir(tmp_path) == []


@responses.activate
def test_a_body_of_unknown_size_running_past_the_cap_is_cut(fills, committed, tmp_path):
    responses.get(blob_url(), body=BODY)  # no Content-Length
    fill = start_limited(fills, FillLimits(max_size=MiB))
    received = bytearray()
    with pytest.raises(BlobTooLarge):
        fill.wait_started()  # the cut may come before the readers do
        for chunk in fill.read():
            received += chunk
    assert len(received) < MiB
    assert fill.written <= MiB
    assert committed.calls == []
    assert os.listdir(tmp_path) == []


@responses.activate
def test_a_blob_of_exactly_the_cap_is_kept(fills, committed):
    responses.get(blob_url(), body=BODY, auto_calculate_content_length=True)
    fill = start_limited(fills, FillLimits(max_size=len(BODY)))
    fill.wait_started()
    assert read_all(fill) == BODY
    assert committed.event.wait(5)


class Claimant:
    """What the spool budget sees of a fill: how much it has written."""

    def __init__(self, written: int = 0) -> None:
        self.written = written


def test_fills_in_flight_share_the_spool_budget(tmp_path, disk):
    budget = SpoolBudget(str(tmp_path))
    disk.free = 10 * MiB
    first, second = Claimant(), Claimant()
    budget.claim(first, 3 * MiB, 0.5)
    with pytest.raises(SpoolFull):
        budget.claim(second, 3 * MiB, 0.5)
    budget.claim(second, 2 * MiB, 0.5)
    assert budget.claimed() == 5 * MiB
    budget.release(first)
    budget.claim(second, 5 * MiB, 0.5)
    assert budget.claimed() == 5 * MiB


def test_bytes_already_spooled_count_as_claimed_not_as_lost_free_space(tmp_path, disk):
    budget = SpoolBudget(str(tmp_path))
    first = Claimant()
    disk.free = 10 * MiB
    budget.claim(first, 4 * MiB, 0.5)
    # The first fill has written its 4 MiB: the disk has that much less free.
    first.written, disk.free = 4 * MiB, 6 * MiB
    budget.claim(Claimant(), 1 * MiB, 0.5)
    with pytest.raises(SpoolFull):
        budget.claim(Claimant(), 1 * MiB + 1, 0.5)


@responses.activate
def test_a_declared_size_over_the_spool_share_is_refused_up_front(fills, committed, disk):
    responses.get(blob_url(), body=BODY, auto_calculate_content_length=True)
    disk.free = 2 * len(BODY) - 1
    fill = start_limited(fills, FillLimits(disk_share=0.5))
    with pytest.raises(SpoolFull):
        fill.wait_started()
    assert fill.written == 0
    assert fills.budget.claimed() == 0
    error = SpoolFull("the proxy's spool has no room for this blob now").registry_error()
    assert (error.status, error.code, error.headers) == (503, "UNAVAILABLE", {"Retry-After": "60"})


@responses.activate
def test_a_body_of_unknown_size_is_cut_at_the_spool_share(fills, committed, disk, tmp_path):
    responses.get(blob_url(), body=BODY)  # no Content-Length
    disk.free = 2 * MiB
    fill = start_limited(fills, FillLimits(disk_share=0.5))
    with pytest.raises(SpoolFull):
        fill.wait_started()
        read_all(fill)
    assert fill.written <= MiB
    assert committed.calls == []
    assert os.listdir(tmp_path) == []
    deadline = time.monotonic() + 5
    while fills.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fills.budget.claimed() == 0


@responses.activate
def test_wait_verified_waits_for_the_digest(fills, committed):
    responses.get(blob_url(), body=BODY, auto_calculate_content_length=True)
    fill = start(fills)
    fill.wait_verified()
    assert fill.size == len(BODY)
    assert b"".join(fill.read(10, 20)) == BODY[10:20]


@responses.activate
def test_wait_verified_raises_for_wrong_bytes(fills, committed, tmp_path):
    # The last byte flipped: a fixed replacement would equal the random original 1 time in 256.
    wrong = BODY[:-1] + bytes([BODY[-1] ^ 0xFF])
    responses.get(blob_url(), body=wrong, auto_calculate_content_length=True)
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    with pytest.raises(FillError, match="do not match"):
        fill.wait_verified()
    assert committed.calls == []
    assert os.listdir(tmp_path) == []


class FailingBlob:
    """An upstream body that breaks after one chunk once `broken` is set, as urllib3 reports
    it (with host and port)."""

    size = None
    status = 200
    headers: dict[str, str] = {}
    broken = threading.Event()

    def iter_chunks(self, chunk_size: int):
        yield b"x" * 10
        self.broken.wait(5)
        raise UpstreamUnavailable(
            "upstream blob transfer failed: HTTPConnectionPool(host='10.0.0.1', port=5000): "
            "Read timed out."
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass


def test_a_reader_is_told_of_a_failure_without_the_upstream_message(fills, caplog):
    fill = fills.join_or_start(1, DIGEST, lambda: False, FailingBlob)
    fill.wait_started()
    FailingBlob.broken.set()
    with pytest.raises(FillError) as failure:
        read_all(fill)
    assert str(failure.value) == "the upstream transfer failed"
    assert "10.0.0.1" not in json.dumps(failure.value.registry_error(200).body())
    assert "10.0.0.1" in caplog.text
