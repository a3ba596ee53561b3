"""Single-flight fills at unit level: upstream mocked with `responses`; filesystem storage,
spool and threads real."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import time
import uuid

import pytest
import responses

from depproxy_pyramid.services import fills as fills_module
from depproxy_pyramid.services.fills import (
    CHUNK_SIZE,
    BlobFills,
    BlobTooLarge,
    FillError,
    FillLimits,
    SpoolBudget,
    SpoolFull,
)
from depproxy_pyramid.storage import UPLOAD_PREFIX, Storage, storage_from_settings
from depproxy_pyramid.storage.filesystem import FilesystemStorage
from depproxy_pyramid.storage.s3 import UPLOAD_PART_SIZE, S3Storage
from depproxy_pyramid.upstream import UpstreamClient, UpstreamNotFound, UpstreamUnavailable
from tests.server import wait_for

UPSTREAM = "https://registry.test"
BODY = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()


def blob_url(digest: str = DIGEST) -> str:
    return f"{UPSTREAM}/v2/library/app/blobs/{digest}"


def blob_key(digest: str) -> str:
    return f"blobs/{digest.replace(':', '/')}"


class Committed:
    """The commit callback: records what storage holds under the fill's key when called."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.calls: list[tuple[int, str, bytes]] = []
        self.event = threading.Event()

    def __call__(self, group_id: int, fill) -> None:
        with self.storage.open(fill.storage_key) as stored:
            self.calls.append((group_id, fill.digest, stored.read()))
        self.event.set()


@pytest.fixture
def storage(tmp_path) -> FilesystemStorage:
    return FilesystemStorage(str(tmp_path / "store"))


@pytest.fixture
def committed(storage) -> Committed:
    return Committed(storage)


@pytest.fixture
def fills(storage, committed) -> BlobFills:
    return BlobFills(storage, blob_key, committed)


def assert_nothing_kept(storage: FilesystemStorage) -> None:
    assert os.listdir(storage.spool_dir) == []
    assert list(storage.objects()) == []


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
def test_readers_get_the_verified_blob_and_it_is_committed_once(fills, committed, storage):
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
    assert os.listdir(storage.spool_dir) == []
    assert [item.key for item in storage.objects()] == [blob_key(DIGEST)]


@responses.activate
def test_the_last_byte_waits_until_the_blob_is_recorded(storage):
    responses.get(blob_url(), body=BODY, auto_calculate_content_length=True)
    recording, recorded = threading.Event(), threading.Event()

    def commit(group_id: int, fill) -> None:
        recording.set()
        assert recorded.wait(5)

    fill = start(BlobFills(storage, blob_key, commit))
    received = bytearray()

    def follow() -> None:
        for chunk in fill.read():
            received.extend(chunk)

    reader = threading.Thread(target=follow)
    reader.start()
    assert recording.wait(5)
    wait_for(lambda: len(received) == len(BODY) - 1)
    reader.join(0.2)

    assert reader.is_alive()
    assert len(received) == len(BODY) - 1
    recorded.set()
    reader.join(5)
    assert bytes(received) == BODY


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
def test_wrong_bytes_never_reach_a_reader_whole(fills, committed, storage, body):
    responses.get(blob_url(), body=body)
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    received = bytearray()
    with pytest.raises(FillError):
        fill.wait_started()
        for chunk in fill.read():
            received += chunk
    assert len(received) < max(len(body), 1)
    assert committed.calls == []
    assert_nothing_kept(storage)


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
def test_spool_files_of_dead_fills_are_removed_at_start(storage, committed):
    gate = upstream_held_until_released()
    abandoned = os.path.join(storage.spool_dir, UPLOAD_PREFIX + "abandoned")
    with open(abandoned, "wb") as file:
        file.write(b"half a layer")
    fills = BlobFills(storage, blob_key, committed)
    assert not os.path.exists(abandoned)
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    running = os.listdir(storage.spool_dir)
    assert len(running) == 1 and running[0].startswith(UPLOAD_PREFIX)
    # A second process starting now must not take the spool file of a fill in progress.
    BlobFills(storage, blob_key, committed)
    assert os.listdir(storage.spool_dir) == running
    gate.set()
    fill.wait_started()
    assert b"".join(fill.read()) == BODY
    assert committed.event.wait(5)
    assert os.listdir(storage.spool_dir) == []


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
def test_a_blob_declared_over_the_cap_is_refused_before_any_download(fills, committed, storage):
    responses.get(blob_url(), body=BODY, auto_calculate_content_length=True)
    fill = start_limited(fills, FillLimits(max_size=MiB))
    with pytest.raises(BlobTooLarge, match=f"limit of {MiB} bytes"):
        fill.wait_started()
    assert fill.written == 0
    assert committed.calls == []
    assert_nothing_kept(storage)


@responses.activate
def test_a_body_of_unknown_size_running_past_the_cap_is_cut(fills, committed, storage):
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
    assert_nothing_kept(storage)


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
def test_a_body_of_unknown_size_is_cut_at_the_spool_share(fills, committed, disk, storage):
    responses.get(blob_url(), body=BODY)  # no Content-Length
    disk.free = 2 * MiB
    fill = start_limited(fills, FillLimits(disk_share=0.5))
    with pytest.raises(SpoolFull):
        fill.wait_started()
        read_all(fill)
    assert fill.written <= MiB
    assert committed.calls == []
    assert_nothing_kept(storage)
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
def test_wait_verified_raises_for_wrong_bytes(fills, committed, storage):
    # The last byte flipped: a fixed replacement would equal the random original 1 time in 256.
    wrong = BODY[:-1] + bytes([BODY[-1] ^ 0xFF])
    responses.get(blob_url(), body=wrong, auto_calculate_content_length=True)
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    with pytest.raises(FillError, match="do not match"):
        fill.wait_verified()
    assert committed.calls == []
    assert_nothing_kept(storage)


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


# -- S3: parts sent as the blob comes, readers in memory or from the bucket -----------------

# Five parts, and more than the readers' window: a reader that stops for long falls out of it.
LARGE = os.urandom(5 * UPLOAD_PART_SIZE)
LARGE_DIGEST = "sha256:" + hashlib.sha256(LARGE).hexdigest()
assert len(LARGE) > fills_module.WINDOW_SIZE + CHUNK_SIZE


class HeldBody(io.RawIOBase):
    """An upstream body that stops after `held_after` bytes until `release` is set."""

    def __init__(self, data: bytes, held_after: int) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._position = 0
        self._held_after = held_after
        self.release = threading.Event()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        if self._position >= self._held_after:
            self.release.wait(30)
        limit = len(self._data) if self.release.is_set() else self._held_after
        count = min(len(buffer), limit - self._position)
        buffer[:count] = self._data[self._position : self._position + count]
        self._position += count
        return count


def upstream_serves_held(data: bytes, digest: str, held_after: int) -> HeldBody:
    body = HeldBody(data, held_after)
    responses.get(
        blob_url(digest),
        body=io.BufferedReader(body),
        headers={"Content-Length": str(len(data))},
        auto_calculate_content_length=False,
    )
    return body


@pytest.fixture
def s3_storage(moto_s3, tmp_path, monkeypatch) -> S3Storage:
    # A spool directory of its own, so that what a test finds there is its own doing.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    storage = storage_from_settings(moto_s3.settings(prefix=uuid.uuid4().hex))
    assert isinstance(storage, S3Storage)
    return storage


@pytest.fixture
def s3_committed(s3_storage) -> Committed:
    return Committed(s3_storage)


@pytest.fixture
def s3_fills(s3_storage, s3_committed) -> BlobFills:
    return BlobFills(s3_storage, blob_key, s3_committed)


def ranges_read(storage: S3Storage) -> list[str]:
    """The `Range` of every ranged GET the storage sends from now on (`Committed` reads whole
    objects)."""
    ranges: list[str] = []

    def record(params: dict, **_: object) -> None:
        if "Range" in params:
            ranges.append(params["Range"])

    # The client is private, but its events are the way to see what a real request asked for.
    storage._client.meta.events.register("before-parameter-build.s3.GetObject", record)
    return ranges


def left_in_bucket(moto_s3, storage: S3Storage) -> tuple[list[str], list[str]]:
    """The objects and the pending multipart uploads under the storage's prefix."""
    client = moto_s3.client()
    objects = client.list_objects_v2(Bucket=moto_s3.bucket, Prefix=storage._prefix)
    uploads = client.list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=storage._prefix)
    return (
        [item["Key"] for item in objects.get("Contents", [])],
        [item["Key"] for item in uploads.get("Uploads", [])],
    )


@responses.activate
def test_an_s3_fill_sends_parts_as_they_come_and_writes_no_local_file(
    s3_fills, s3_committed, s3_storage, moto_s3
):
    body = upstream_serves_held(LARGE, LARGE_DIGEST, held_after=3 * UPLOAD_PART_SIZE)
    fill = s3_fills.join_or_start(1, LARGE_DIGEST, lambda: False, opener(LARGE_DIGEST))
    fill.wait_started()
    wait_for(lambda: fill.written == 3 * UPLOAD_PART_SIZE)

    object_key = f"{s3_storage._prefix}/{blob_key(LARGE_DIGEST)}"
    assert left_in_bucket(moto_s3, s3_storage) == ([], [object_key])
    uploads = moto_s3.client().list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=object_key)
    parts = moto_s3.client().list_parts(
        Bucket=moto_s3.bucket, Key=object_key, UploadId=uploads["Uploads"][0]["UploadId"]
    )
    assert [part["Size"] for part in parts["Parts"]] == [UPLOAD_PART_SIZE] * 3
    assert os.listdir(s3_storage.spool_dir) == []

    body.release.set()
    assert hashlib.sha256(read_all(fill)).hexdigest() == LARGE_DIGEST[7:]
    assert s3_committed.event.wait(30)
    assert s3_committed.calls == [(1, LARGE_DIGEST, LARGE)]
    assert left_in_bucket(moto_s3, s3_storage) == ([object_key], [])
    head = moto_s3.client().head_object(Bucket=moto_s3.bucket, Key=object_key)
    assert head["ETag"].strip('"').endswith("-5")
    assert os.listdir(s3_storage.spool_dir) == []


@responses.activate
def test_a_reader_left_behind_the_window_continues_from_the_bucket(
    s3_fills, s3_committed, s3_storage
):
    body = upstream_serves_held(LARGE, LARGE_DIGEST, held_after=CHUNK_SIZE)
    ranges = ranges_read(s3_storage)
    fill = s3_fills.join_or_start(1, LARGE_DIGEST, lambda: False, opener(LARGE_DIGEST))
    fill.wait_started()
    reader = fill.read()
    first = next(reader)
    body.release.set()
    # The fill does not wait for the reader that stopped: it runs to its commit.
    assert s3_committed.event.wait(30)

    rest = b"".join(reader)

    assert hashlib.sha256(first + rest).hexdigest() == LARGE_DIGEST[7:]
    assert len(first + rest) == len(LARGE)
    assert ranges == [f"bytes={len(first)}-{len(LARGE) - 1}"]


@responses.activate
def test_s3_readers_at_every_pace_get_the_same_bytes(s3_fills, s3_committed, s3_storage):
    body = upstream_serves_held(LARGE, LARGE_DIGEST, held_after=8 * CHUNK_SIZE)
    ranges = ranges_read(s3_storage)
    results: dict[str, bytes] = {}
    ahead = threading.Barrier(3, timeout=30)

    def pull(name: str, pause: bool) -> None:
        fill = s3_fills.join_or_start(1, LARGE_DIGEST, lambda: False, opener(LARGE_DIGEST))
        fill.wait_started()
        received = bytearray()
        reader = fill.read()
        # Everyone has the bytes upstream sent so far, from memory, before upstream goes on.
        while len(received) < 8 * CHUNK_SIZE:
            received += next(reader)
        ahead.wait()
        if pause:
            assert s3_committed.event.wait(30)
        for chunk in reader:
            received += chunk
        results[name] = bytes(received)

    threads = [
        threading.Thread(target=pull, args=(name, pause))
        for name, pause in [("keeping up", False), ("stopping", True)]
    ]
    for thread in threads:
        thread.start()
    ahead.wait()
    assert ranges == []
    body.release.set()
    for thread in threads:
        thread.join(60)

    assert results == {"keeping up": LARGE, "stopping": LARGE}
    assert len(responses.calls) == 1
    assert s3_committed.calls == [(1, LARGE_DIGEST, LARGE)]
    # Only the reader that stopped went to the bucket, from where it stopped.
    assert ranges == [f"bytes={8 * CHUNK_SIZE}-{len(LARGE) - 1}"]


@pytest.mark.parametrize(
    "body",
    [LARGE[:-1] + bytes([LARGE[-1] ^ 0xFF]), LARGE[: 3 * UPLOAD_PART_SIZE + 5]],
    ids=["last-byte-flipped", "truncated"],
)
@responses.activate
def test_an_s3_fill_of_wrong_bytes_leaves_nothing_in_the_bucket(
    s3_fills, s3_committed, s3_storage, moto_s3, body
):
    responses.get(
        blob_url(LARGE_DIGEST),
        body=body,
        headers={"Content-Length": str(len(LARGE))},
        auto_calculate_content_length=False,
    )
    fill = s3_fills.join_or_start(1, LARGE_DIGEST, lambda: False, opener(LARGE_DIGEST))
    received = bytearray()
    with pytest.raises((FillError, UpstreamUnavailable)):
        fill.wait_started()
        for chunk in fill.read():
            received += chunk

    assert len(received) < len(LARGE)
    wait_for(lambda: s3_fills.in_flight() == 0)
    assert s3_committed.calls == []
    assert left_in_bucket(moto_s3, s3_storage) == ([], [])
    assert os.listdir(s3_storage.spool_dir) == []


@responses.activate
def test_an_empty_blob_is_stored_on_s3(s3_fills, s3_committed, s3_storage):
    digest = "sha256:" + hashlib.sha256(b"").hexdigest()
    responses.get(blob_url(digest), body=b"", auto_calculate_content_length=True)
    fill = start(s3_fills, digest)

    assert b"".join(fill.read()) == b""
    assert s3_committed.event.wait(30)
    assert s3_committed.calls == [(1, digest, b"")]
    assert s3_storage.size(blob_key(digest)) == 0
