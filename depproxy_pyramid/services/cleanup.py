"""Destroying what the cache no longer keeps: `depproxy-admin CONFIG_URI cleanup`.

Four passes, each safe to repeat and to run while pulls go on:

1. Expiry: in each group whose `ImageTtlPolicy` is enabled, manifests and blobs not read within
   `ttl_days` (counting `READ_AT_LAG` beyond their read_at, which trails real reads) are marked
   `pending_destruction`, and tags left without their manifest are deleted.
2. Destruction: each `pending_destruction` row is deleted only while it is still pending (a
   re-pull's commit makes the same row `default` again, with the same storage key), and its
   object only once, after that delete is committed, no live row refers to the key. A live row
   committed while the object was being deleted is deleted too, so the next pull refetches.
3. Orphans: objects no row refers to (left by a removed group, a commit that failed after the
   upload) are deleted once they are older than `ORPHAN_GRACE`: a fill uploads its object just
   before it records the row.
4. Spool leftovers older than `SPOOL_GRACE` and not locked by a running fill.

A reader already streaming an object is not cut: a file open on the filesystem outlives its
unlink, as does an S3 GET under way. A presigned S3 URL handed out before the delete answers 404.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from ..audit import Action, record
from ..models import CachedBlob, CachedManifest, CachedTag, CacheStatus, Group, ImageTtlPolicy
from ..storage import Storage
from .read_times import READ_AT_LAG

log = logging.getLogger(__name__)

ORPHAN_GRACE = timedelta(hours=1)
SPOOL_GRACE = timedelta(hours=1)
# Rows per transaction, and keys per query: SQLite binds a few thousand parameters at least.
BATCH = 500
# The keys `services.proxy.storage_key` makes, and the per-group ones it made before objects
# were shared; nothing else in the store is ours to delete.
CACHE_KEY = re.compile(r"([0-9]+/)?(blobs|manifests)/[a-z0-9]+/[a-f0-9]+")

CacheModel = type[CachedBlob] | type[CachedManifest]
MODELS: tuple[CacheModel, ...] = (CachedManifest, CachedBlob)


@dataclass
class CleanupCounts:
    expired_manifests: int = 0
    expired_blobs: int = 0
    destroyed_manifests: int = 0
    destroyed_blobs: int = 0
    deleted_objects: int = 0
    orphaned_objects: int = 0
    spool_files: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def anything_done(self) -> bool:
        return any(
            (
                self.expired_manifests,
                self.expired_blobs,
                self.destroyed_manifests,
                self.destroyed_blobs,
                self.deleted_objects,
                self.orphaned_objects,
                self.spool_files,
            )
        )


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Cleanup:
    """One run of the four passes; `progress` hears a line for each thing done."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        storage: Storage,
        actor: str,
        *,
        progress: Callable[[str], None] = lambda line: None,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.session_factory = session_factory
        self.storage = storage
        self.actor = actor
        self.progress = progress
        self.now = now
        self.counts = CleanupCounts()

    def run(self) -> CleanupCounts:
        self.expire()
        self.destroy_pending()
        self.remove_orphans()
        self.remove_spool_leftovers()
        return self.counts

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self.session_factory() as session, session.begin():
            yield session

    # 1. expiry

    def expire(self) -> None:
        with self._transaction() as session:
            policies = session.execute(
                select(Group.id, Group.path, ImageTtlPolicy.ttl_days)
                .join(ImageTtlPolicy, ImageTtlPolicy.group_id == Group.id)
                .where(ImageTtlPolicy.enabled.is_(True))
                .order_by(Group.path)
            ).all()
        for group_id, path, ttl_days in policies:
            self._expire_group(group_id, path, ttl_days)

    def _expire_group(self, group_id: int, path: str, ttl_days: int) -> None:
        cutoff = self.now() - timedelta(days=ttl_days) - READ_AT_LAG
        with self._transaction() as session:
            expired = [
                session.execute(
                    update(model)
                    .where(
                        model.group_id == group_id,
                        model.status == CacheStatus.DEFAULT,
                        model.read_at < cutoff,
                    )
                    .values(status=CacheStatus.PENDING_DESTRUCTION)
                    .execution_options(synchronize_session=False)
                ).rowcount
                for model in MODELS
            ]
            if not any(expired):
                return
            cached = exists().where(
                CachedManifest.group_id == CachedTag.group_id,
                CachedManifest.image == CachedTag.image,
                CachedManifest.digest == CachedTag.digest,
                CachedManifest.status == CacheStatus.DEFAULT,
            )
            tags = session.execute(
                delete(CachedTag)
                .where(CachedTag.group_id == group_id, ~cached)
                .execution_options(synchronize_session=False)
            ).rowcount
            record(
                session,
                self.actor,
                Action.CACHE_EXPIRE,
                group_path=path,
                detail={
                    "ttl_days": ttl_days,
                    "manifests": expired[0],
                    "blobs": expired[1],
                    "tags": tags,
                },
            )
        self.counts.expired_manifests += expired[0]
        self.counts.expired_blobs += expired[1]
        self.progress(
            f"{path}: {expired[0]} manifest(s) and {expired[1]} blob(s) unread for "
            f"{ttl_days} day(s) marked for destruction"
        )

    # 2. destruction

    def destroy_pending(self) -> None:
        for model in MODELS:
            after = 0
            while True:
                with self._transaction() as session:
                    rows = session.execute(
                        select(model.id, model.group_id, model.storage_key)
                        .where(model.status == CacheStatus.PENDING_DESTRUCTION, model.id > after)
                        .order_by(model.id)
                        .limit(BATCH)
                    ).all()
                if not rows:
                    break
                after = rows[-1].id
                self._destroy(model, rows)

    def _destroy(self, model: CacheModel, rows: list) -> None:
        destroyed: dict[int, int] = {}
        keys = set()
        with self._transaction() as session:
            for row in rows:
                # Still pending? A re-pull may have committed the same row as `default` again.
                deleted = session.execute(
                    delete(model)
                    .where(model.id == row.id, model.status == CacheStatus.PENDING_DESTRUCTION)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if deleted:
                    destroyed[row.group_id] = destroyed.get(row.group_id, 0) + 1
                    keys.add(row.storage_key)
            paths = dict(
                session.execute(
                    select(Group.id, Group.path).where(Group.id.in_(list(destroyed)))
                ).all()
            )
            kind = "manifests" if model is CachedManifest else "blobs"
            for group_id, count in sorted(destroyed.items()):
                record(
                    session,
                    self.actor,
                    Action.CACHE_CLEANUP,
                    group_path=paths.get(group_id),
                    detail={f"destroyed_{kind}": count},
                )
        count = sum(destroyed.values())
        if model is CachedManifest:
            self.counts.destroyed_manifests += count
        else:
            self.counts.destroyed_blobs += count
        deleted = self._delete_unreferenced(model, keys)
        self.counts.deleted_objects += deleted
        if count:
            self.progress(f"destroyed {count} {kind}, deleting {deleted} stored object(s)")

    def _live_keys(self, session: Session, keys: Iterable[str]) -> set[str]:
        """Which of `keys` a live (not pending destruction) row of either table refers to."""
        keys = list(keys)
        live: set[str] = set()
        for start in range(0, len(keys), BATCH):
            chunk = keys[start : start + BATCH]
            for model in MODELS:
                live.update(
                    session.scalars(
                        select(model.storage_key).where(
                            model.storage_key.in_(chunk),
                            model.status != CacheStatus.PENDING_DESTRUCTION,
                        )
                    )
                )
        return live

    def _delete_unreferenced(self, model: CacheModel, keys: set[str]) -> int:
        """Delete the objects of `keys` no live row refers to; return how many."""
        with self._transaction() as session:
            unreferenced = sorted(keys - self._live_keys(session, keys))
        deleted = []
        for key in unreferenced:
            try:
                self.storage.delete(key)
            except Exception as error:  # noqa: BLE001 - one object's failure stops no other
                self.counts.errors.append(f"deleting {key}: {type(error).__name__}: {error}")
                continue
            deleted.append(key)
        self._forget_rows_without_object(deleted)
        return len(deleted)

    def _forget_rows_without_object(self, deleted: list[str]) -> None:
        """A re-pull that committed its row while its object was being deleted would serve a
        missing object (a presigned URL to a 404): delete such rows, so the next pull
        refetches."""
        if not deleted:
            return
        with self._transaction() as session:
            lost = self._live_keys(session, deleted)
            for key in sorted(lost):
                log.warning("a row was committed for %s while cleanup deleted it; forgetting", key)
                for model in MODELS:
                    session.execute(
                        delete(model)
                        .where(model.storage_key == key)
                        .execution_options(synchronize_session=False)
                    )

    # 3. orphans

    def remove_orphans(self) -> None:
        cutoff = self.now() - ORPHAN_GRACE
        candidates: list[str] = []
        for item in self.storage.objects():
            if CACHE_KEY.fullmatch(item.key) and item.modified < cutoff:
                candidates.append(item.key)
                if len(candidates) == BATCH:
                    self._remove_orphans(candidates)
                    candidates = []
        if candidates:
            self._remove_orphans(candidates)

    def _remove_orphans(self, keys: list[str]) -> None:
        with self._transaction() as session:
            referenced: set[str] = set()
            for model in MODELS:
                referenced.update(
                    session.scalars(select(model.storage_key).where(model.storage_key.in_(keys)))
                )
        orphans = [key for key in keys if key not in referenced]
        removed = []
        for key in orphans:
            try:
                self.storage.delete(key)
            except Exception as error:  # noqa: BLE001 - one object's failure stops no other
                self.counts.errors.append(f"deleting {key}: {type(error).__name__}: {error}")
                continue
            removed.append(key)
        self._forget_rows_without_object(removed)
        self.counts.orphaned_objects += len(removed)
        if removed:
            self.progress(f"deleted {len(removed)} orphaned object(s)")

    # 4. spool

    def remove_spool_leftovers(self) -> None:
        cutoff = (self.now() - SPOOL_GRACE).timestamp()
        removed = 0
        for entry in os.scandir(self.storage.spool_dir):
            try:
                if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            if _remove_unless_locked(entry.path):
                removed += 1
        self.counts.spool_files += removed
        if removed:
            self.progress(f"deleted {removed} spool file(s) left by interrupted transfers")


def _remove_unless_locked(path: str) -> bool:
    """Unlink `path` unless a running fill holds its lock (a fill keeps it from start to
    commit, however long its upstream takes)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)
