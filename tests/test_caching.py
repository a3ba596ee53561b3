"""The bounded in-memory cache cached pulls rely on, and the batched read_at writes."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from depproxy_pyramid.caching import MISSING, BoundedCache
from depproxy_pyramid.models import CachedBlob, CachedManifest, Group
from depproxy_pyramid.services.read_times import READ_AT_GRANULARITY, ReadTimes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_absent_key_answers_the_default():
    cache: BoundedCache[str, int] = BoundedCache(3)
    assert cache.get("a") is MISSING
    assert cache.get("a", None) is None
    cache.put("a", 0)
    assert cache.get("a") == 0


def test_none_is_a_value_not_an_absence():
    cache: BoundedCache[str, None] = BoundedCache(3)
    cache.put("unknown group", None)
    assert cache.get("unknown group") is None


def test_the_count_bound_evicts_the_least_recently_used():
    cache: BoundedCache[str, int] = BoundedCache(3)
    for key, value in (("a", 1), ("b", 2), ("c", 3)):
        cache.put(key, value)
    assert cache.get("a") == 1  # now "b" is the least recently used
    cache.put("d", 4)
    assert len(cache) == 3
    assert cache.get("b") is MISSING
    assert [cache.get(k) for k in ("a", "c", "d")] == [1, 3, 4]


def test_the_size_bound_counts_what_size_of_says():
    cache: BoundedCache[str, bytes] = BoundedCache(10, size_of=len)
    cache.put("a", b"x" * 4)
    cache.put("b", b"x" * 4)
    assert cache.size == 8
    cache.put("c", b"x" * 4)
    assert (cache.get("a"), cache.size, len(cache)) == (MISSING, 8, 2)
    cache.put("b", b"x" * 1)  # replacing an entry gives its size back
    assert cache.size == 5


def test_a_value_larger_than_the_capacity_is_not_kept_and_evicts_nothing():
    cache: BoundedCache[str, bytes] = BoundedCache(10, size_of=len)
    cache.put("small", b"x" * 3)
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is MISSING
    assert cache.get("small") == b"xxx"
    assert cache.size == 3


def test_entries_expire_after_the_ttl():
    clock = Clock()
    cache: BoundedCache[str, int] = BoundedCache(3, ttl=5, clock=clock)
    cache.put("a", 1)
    clock.now += 4.9
    assert cache.get("a") == 1
    clock.now += 0.1
    assert cache.get("a") is MISSING
    assert (len(cache), cache.size) == (0, 0)


def test_a_shorter_lifetime_wins_over_the_ttl_and_never_extends_it():
    clock = Clock()
    cache: BoundedCache[str, int] = BoundedCache(3, ttl=5, clock=clock)
    cache.put("short", 1, lifetime=2)
    cache.put("long", 2, lifetime=60)
    clock.now += 2
    assert cache.get("short") is MISSING
    assert cache.get("long") == 2
    clock.now += 3
    assert cache.get("long") is MISSING


def test_without_a_ttl_only_the_lifetime_ends_an_entry():
    clock = Clock()
    cache: BoundedCache[str, int] = BoundedCache(3, clock=clock)
    cache.put("forever", 1)
    cache.put("token", 2, lifetime=900)
    clock.now += 900
    assert (cache.get("forever"), cache.get("token")) == (1, MISSING)


@pytest.mark.parametrize(("ttl", "lifetime"), [(0, None), (5, 0), (5, -3)])
def test_nothing_is_kept_for_no_time(ttl, lifetime):
    cache: BoundedCache[str, int] = BoundedCache(3, ttl=ttl)
    cache.put("a", 1)
    cache.put("a", 2, lifetime=lifetime)
    assert cache.get("a") is MISSING
    assert len(cache) == 0


def test_discard_and_clear():
    cache: BoundedCache[str, int] = BoundedCache(3)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.discard("a")
    cache.discard("never there")
    assert (cache.get("a"), cache.get("b")) == (MISSING, 2)
    cache.clear()
    assert (len(cache), cache.size) == (0, 0)


def test_threads_hammering_one_cache_keep_it_within_its_bound_and_consistent():
    cache: BoundedCache[int, bytes] = BoundedCache(1000, size_of=len)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(offset: int) -> None:
        try:
            start.wait()
            for i in range(5000):
                key = (offset * 7 + i) % 300
                cache.put(key, bytes([key % 256]) * (key % 17 + 1))
                value = cache.get((key * 13) % 300)
                assert value is MISSING or value == bytes([(key * 13) % 300 % 256]) * (
                    (key * 13) % 300 % 17 + 1
                )
                if i % 97 == 0:
                    cache.discard(key)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.size <= 1000
    assert cache.size == sum(len(cache.get(k)) for k in range(300) if cache.get(k) is not MISSING)


# read_at batching against a real database -------------------------------------------------


@pytest.fixture(scope="module")
def rows(database):
    """A group with one cached manifest and one cached blob, both last read two days ago."""
    manager, session = database.session()
    with manager:
        group = Group(path="read-times", name="read-times")
        session.add(group)
        session.flush()
        common = {"group_id": group.id, "size": 1, "content_type": "x", "storage_key": "k"}
        manifest = CachedManifest(image="i", digest="sha256:" + "1" * 64, **common)
        blob = CachedBlob(digest="sha256:" + "2" * 64, **common)
        session.add_all([manifest, blob])
        session.flush()
        return manifest.id, blob.id


def _read_at(database, model, row_id) -> datetime:
    manager, session = database.session()
    with manager:
        return session.scalar(select(model.read_at).where(model.id == row_id))


def _set_read_at(database, model, row_id, value: datetime) -> None:
    manager, session = database.session()
    with manager:
        session.get(model, row_id).read_at = value


def test_reads_are_written_together_once_the_flush_interval_is_over(database, rows):
    manifest_id, blob_id = rows
    long_ago = datetime.now(UTC) - timedelta(days=2)
    for model, row_id in ((CachedManifest, manifest_id), (CachedBlob, blob_id)):
        _set_read_at(database, model, row_id, long_ago)
    clock = Clock()
    read_times = ReadTimes(database.session_factory, flush_seconds=10, clock=clock)

    read_times.touch(CachedManifest, manifest_id)
    read_times.touch(CachedBlob, blob_id)
    assert _read_at(database, CachedManifest, manifest_id) == long_ago
    assert _read_at(database, CachedBlob, blob_id) == long_ago

    clock.now += 10
    before = datetime.now(UTC)
    read_times.touch(CachedManifest, manifest_id)  # the next hit, of any row, writes them all
    deadline = time.monotonic() + 10
    while _read_at(database, CachedBlob, blob_id) == long_ago:
        assert time.monotonic() < deadline, "the notes were not written"
        time.sleep(0.05)
    for model, row_id in ((CachedManifest, manifest_id), (CachedBlob, blob_id)):
        assert _read_at(database, model, row_id) >= before - timedelta(seconds=1)


def test_a_note_is_written_without_another_hit(database, rows):
    _, blob_id = rows
    long_ago = datetime.now(UTC) - timedelta(days=2)
    _set_read_at(database, CachedBlob, blob_id, long_ago)
    read_times = ReadTimes(database.session_factory, flush_seconds=0.2)

    read_times.touch(CachedBlob, blob_id)

    deadline = time.monotonic() + 10
    while _read_at(database, CachedBlob, blob_id) == long_ago:
        assert time.monotonic() < deadline, "the note waited for another hit"
        time.sleep(0.05)


def test_a_row_is_written_at_most_once_per_granularity(database, rows):
    manifest_id, _ = rows
    clock = Clock()
    read_times = ReadTimes(database.session_factory, flush_seconds=10, clock=clock)
    read_times.touch(CachedManifest, manifest_id)
    read_times.flush()
    written = _read_at(database, CachedManifest, manifest_id)
    long_ago = datetime.now(UTC) - timedelta(days=2)
    _set_read_at(database, CachedManifest, manifest_id, long_ago)

    clock.now += READ_AT_GRANULARITY.total_seconds() - 1
    read_times.touch(CachedManifest, manifest_id)
    read_times.flush()
    assert _read_at(database, CachedManifest, manifest_id) == long_ago
    clock.now += 1
    read_times.touch(CachedManifest, manifest_id)
    read_times.flush()
    assert _read_at(database, CachedManifest, manifest_id) > written - timedelta(seconds=1)


def test_a_row_read_within_the_hour_elsewhere_is_not_written_again(database, rows):
    manifest_id, _ = rows
    recently = datetime.now(UTC) - timedelta(minutes=5)
    _set_read_at(database, CachedManifest, manifest_id, recently)
    read_times = ReadTimes(database.session_factory)
    read_times.touch(CachedManifest, manifest_id)
    read_times.flush()
    assert _read_at(database, CachedManifest, manifest_id) == recently
