"""Copying the cache to another storage: `depproxy-admin CONFIG_URI migrate-storage --to OTHER`.

What is copied: every storage key a manifest or blob row refers to, except keys only
`pending_destruction` rows refer to. Those are never served again; a re-pull that makes such a
row live again uploads its object afresh, to whichever storage the app then uses; and `cleanup`
deletes them from the old storage. Copying them would only cost time.

Each object is read from the source in `CHUNK`-sized pieces into a spool file of the
destination, hashed on the way, and published with the destination's `put_file` only once its
length and digest match its row: a copy interrupted at any point leaves at most a spool file
(which `cleanup` deletes), never a partial object under its key. An object already at the
destination with its row's size was therefore verified when it was written, and is skipped
without reading it again, unless `verify_existing` asks for its digest to be checked too.

The rows are read in batches as the run goes; objects cached meanwhile by a running app may be
missed, and the next run copies them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ..models import CacheStatus
from ..names import DIGEST_RE
from ..storage import BlobNotFound, Storage
from .cleanup import BATCH, MODELS

CHUNK = 1024 * 1024
PROGRESS_OBJECTS = 100
PROGRESS_BYTES = 1024**3
SPOOL_PREFIX = "migrate-"
_MIB = 1024 * 1024


class StorageFailed(Exception):
    """A storage failed as a whole (unreachable, refusing, full): the run stops there, and the
    next run resumes where it stopped."""


class _Mismatch(Exception):
    """An object's bytes are not those its row records."""


@dataclass(frozen=True)
class CachedObject:
    """One storage key and what its rows say it holds (the key names the digest, so every row
    with the key records the same digest and size)."""

    key: str
    digest: str
    size: int


@dataclass
class MigrationCounts:
    objects: int = 0
    bytes: int = 0
    checked_objects: int = 0
    checked_bytes: int = 0
    copied_objects: int = 0
    copied_bytes: int = 0
    present_objects: int = 0
    vanished_objects: int = 0
    """Objects whose rows were destroyed during the run: nothing to copy any more."""
    failures: list[str] = field(default_factory=list)
    """One line per object not copied, naming it and why."""

    def summary(self) -> str:
        return (
            f"{self.checked_objects}/{self.objects} object(s), "
            f"{_mib(self.checked_bytes)}/{_mib(self.bytes)}: "
            f"{self.copied_objects} copied ({_mib(self.copied_bytes)}), "
            f"{self.present_objects} already there, {len(self.failures)} not copied"
            + (f", {self.vanished_objects} destroyed meanwhile" if self.vanished_objects else "")
        )


class StorageMigration:
    """One run; `progress` hears a line every `PROGRESS_OBJECTS` objects or `PROGRESS_BYTES`
    bytes checked, `failed` one for each object not copied."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        source: Storage,
        destination: Storage,
        *,
        verify_existing: bool = False,
        progress: Callable[[str], None] = lambda line: None,
        failed: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.session_factory = session_factory
        self.source = source
        self.destination = destination
        self.verify_existing = verify_existing
        self.progress = progress
        self.failed = failed
        self.counts = MigrationCounts()

    def run(self) -> MigrationCounts:
        # Both stores are asked once before anything else, so that one that cannot be reached
        # is named as such even when there is nothing to copy.
        for side, storage in (("source", self.source), ("destination", self.destination)):
            with _failing_as(side, storage):
                next(iter(storage.objects()), None)
        self._count()
        self.progress(
            f"copying {self.counts.objects} object(s), {_mib(self.counts.bytes)}, from "
            f"{self.source.location} to {self.destination.location}"
        )
        next_objects, next_bytes = PROGRESS_OBJECTS, PROGRESS_BYTES
        for item in self._objects():
            self._migrate(item)
            self.counts.checked_objects += 1
            self.counts.checked_bytes += item.size
            if (
                self.counts.checked_objects >= next_objects
                or self.counts.checked_bytes >= next_bytes
            ):
                self.progress(self.counts.summary())
                next_objects = self.counts.checked_objects + PROGRESS_OBJECTS
                next_bytes = self.counts.checked_bytes + PROGRESS_BYTES
        return self.counts

    def _count(self) -> None:
        with self.session_factory() as session:
            for model in MODELS:
                keys = (
                    select(model.storage_key, model.size)
                    .where(model.status != CacheStatus.PENDING_DESTRUCTION)
                    .distinct()
                    .subquery()
                )
                objects, size = session.execute(
                    select(func.count(), func.coalesce(func.sum(keys.c.size), 0))
                ).one()
                self.counts.objects += objects
                self.counts.bytes += size

    def _objects(self) -> Iterator[CachedObject]:
        for model in MODELS:
            after = ""
            while True:
                with self.session_factory() as session:
                    rows = session.execute(
                        select(model.storage_key, model.digest, model.size)
                        .where(
                            model.status != CacheStatus.PENDING_DESTRUCTION,
                            model.storage_key > after,
                        )
                        .distinct()
                        .order_by(model.storage_key)
                        .limit(BATCH)
                    ).all()
                if not rows:
                    break
                after = rows[-1].storage_key
                yield from (CachedObject(*row) for row in rows)

    def _migrate(self, item: CachedObject) -> None:
        if not DIGEST_RE.fullmatch(item.digest):
            self._fail(item, f"its row's digest {item.digest!r} is not sha256 or sha512")
            return
        if self._at_destination(item):
            self.counts.present_objects += 1
            return
        try:
            self._copy(item)
        except BlobNotFound:
            if self._still_live(item.key):
                self._fail(item, "missing from the source")
            else:
                self.counts.vanished_objects += 1
            return
        except _Mismatch as error:
            self._fail(item, f"the source's object {error}")
            return
        self.counts.copied_objects += 1
        self.counts.copied_bytes += item.size

    def _at_destination(self, item: CachedObject) -> bool:
        """Whether the destination holds the object already; one of another size (neither
        this command nor a fill publishes one) is copied over."""
        with _failing_as("destination", self.destination):
            if self.destination.size(item.key) != item.size:
                return False
            if not self.verify_existing:
                return True
            try:
                with self.destination.open(item.key) as stream:
                    _verified_read(stream, item, lambda chunk: None)
            except _Mismatch as error:
                self.progress(f"{item.key}: the destination's object {error}; copying it again")
                return False
            except BlobNotFound:
                return False
        return True

    def _copy(self, item: CachedObject) -> None:
        with _failing_as("destination", self.destination):
            fd, spool_path = tempfile.mkstemp(dir=self.destination.spool_dir, prefix=SPOOL_PREFIX)
        try:
            # `cleanup` leaves a locked spool file alone, however long the copy takes.
            fcntl.flock(fd, fcntl.LOCK_EX)
            with (
                _failing_as("destination", self.destination),
                os.fdopen(fd, "wb", closefd=False) as spool,
            ):

                def write(chunk: bytes) -> None:
                    # Named here, or the source's wrapper around the read would claim it.
                    with _failing_as("destination", self.destination):
                        spool.write(chunk)

                with _failing_as("source", self.source), self.source.open(item.key) as stream:
                    _verified_read(stream, item, write)
            with _failing_as("destination", self.destination):
                self.destination.put_file(item.key, spool_path)
        finally:
            # put_file consumed the file when it succeeded; anything else leaves it to remove.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool_path)
            os.close(fd)

    def _still_live(self, key: str) -> bool:
        with self.session_factory() as session:
            return any(
                session.scalar(
                    select(func.count())
                    .select_from(model)
                    .where(
                        model.storage_key == key, model.status != CacheStatus.PENDING_DESTRUCTION
                    )
                )
                for model in MODELS
            )

    def _fail(self, item: CachedObject, reason: str) -> None:
        line = f"{item.key}: {reason}; not copied"
        self.counts.failures.append(line)
        self.failed(line)


def _verified_read(stream: BinaryIO, item: CachedObject, write: Callable[[bytes], object]) -> None:
    """Pass the stream's bytes to `write` a chunk at a time; raise _Mismatch unless they are
    exactly the row's size and digest."""
    algorithm, _, expected = item.digest.partition(":")
    hasher = hashlib.new(algorithm)
    length = 0
    while chunk := stream.read(CHUNK):
        length += len(chunk)
        if length > item.size:
            raise _Mismatch(f"has more than the {item.size} bytes its row records")
        hasher.update(chunk)
        write(chunk)
    if length != item.size:
        raise _Mismatch(f"has {length} bytes where its row records {item.size}")
    if hasher.hexdigest() != expected:
        raise _Mismatch(f"does not match its {algorithm} digest")


@contextlib.contextmanager
def _failing_as(side: str, storage: Storage) -> Iterator[None]:
    """Name the storage in any failure but the per-object ones."""
    try:
        yield
    except (BlobNotFound, _Mismatch, StorageFailed):
        raise
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise StorageFailed(
            f"{side} storage {storage.location}: {type(error).__name__}: {reason}"
        ) from error


def _mib(size: int) -> str:
    return f"{size / _MIB:.1f} MiB"
