"""The cleanup service against real databases and both storage strategies: what it destroys,
what it must keep (re-pulls racing it, reads within the TTL, young objects, running fills)."""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import tempfile
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from depproxy_pyramid.models import (
    AuditEvent,
    CachedBlob,
    CachedManifest,
    CachedTag,
    CacheStatus,
    Group,
    ImageTtlPolicy,
    Visibility,
)
from depproxy_pyramid.services.cleanup import ORPHAN_GRACE, SPOOL_GRACE, Cleanup
from depproxy_pyramid.services.proxy import storage_key
from depproxy_pyramid.services.read_times import READ_AT_LAG
from depproxy_pyramid.storage import Storage, storage_from_settings

_paths = itertools.count()
PENDING = CacheStatus.PENDING_DESTRUCTION


@pytest.fixture(params=["filesystem", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "filesystem":
        return storage_from_settings(
            {"depproxy.storage": "filesystem", "depproxy.storage.path": str(tmp_path / "store")}
        )
    moto_s3 = request.getfixturevalue("moto_s3")
    return storage_from_settings(moto_s3.settings(prefix=uuid.uuid4().hex))


def new_group(database, ttl_days: int | None = None) -> tuple[int, str]:
    path = f"cleanup-{next(_paths)}-{uuid.uuid4().hex[:6]}"
    manager, session = database.session()
    with manager:
        group = Group(path=path, name=path, visibility=Visibility.PRIVATE)
        if ttl_days is not None:
            group.ttl_policy = ImageTtlPolicy(enabled=True, ttl_days=ttl_days)
        session.add(group)
        session.flush()
        return group.id, path


def put(storage: Storage, key: str, data: bytes) -> None:
    fd, path = tempfile.mkstemp(dir=storage.spool_dir)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    storage.put_file(key, path)


def cached(
    database,
    storage,
    model,
    group_id: int,
    *,
    image: str = "app",
    status=None,
    read_at: datetime | None = None,
    data: bytes | None = None,
) -> tuple[int, str]:
    """A cached row with its object in storage; (row id, storage key)."""
    data = data if data is not None else os.urandom(64)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    kind = "manifests" if model is CachedManifest else "blobs"
    key = storage_key(kind, digest)
    put(storage, key, data)
    values = {
        "group_id": group_id,
        "digest": digest,
        "size": len(data),
        "content_type": "application/octet-stream",
        "storage_key": key,
        "status": status or CacheStatus.DEFAULT,
        "read_at": read_at or datetime.now(UTC),
    }
    if model is CachedManifest:
        values["image"] = image
    manager, session = database.session()
    with manager:
        row = model(**values)
        session.add(row)
        session.flush()
        return row.id, key


def row_exists(database, model, row_id: int) -> bool:
    manager, session = database.session()
    with manager:
        return session.get(model, row_id) is not None


def cleanup(database, storage, **kw) -> Cleanup:
    return Cleanup(database.session_factory, storage, "cli", **kw)


def test_pending_rows_and_their_objects_go_and_nothing_else(database, storage):
    group_id, path = new_group(database)
    pending_blob, pending_blob_key = cached(database, storage, CachedBlob, group_id, status=PENDING)
    live_blob, live_blob_key = cached(database, storage, CachedBlob, group_id)
    # Two images' rows of one manifest share its object: one purged, one still served.
    data = os.urandom(64)
    purged_manifest, shared_key = cached(
        database, storage, CachedManifest, group_id, image="a", status=PENDING, data=data
    )
    served_manifest, _ = cached(database, storage, CachedManifest, group_id, image="b", data=data)

    counts = cleanup(database, storage).run()

    assert (counts.destroyed_blobs, counts.destroyed_manifests) >= (1, 1)
    assert not row_exists(database, CachedBlob, pending_blob)
    assert not row_exists(database, CachedManifest, purged_manifest)
    assert storage.size(pending_blob_key) is None
    assert row_exists(database, CachedBlob, live_blob)
    assert row_exists(database, CachedManifest, served_manifest)
    assert storage.size(live_blob_key) == 64
    assert storage.size(shared_key) == 64
    manager, session = database.session()
    with manager:
        details = [
            json.loads(event.detail)
            for event in session.scalars(
                select(AuditEvent).where(
                    AuditEvent.group_path == path, AuditEvent.action == "cache.cleanup"
                )
            )
        ]
    assert sorted(details, key=str) == [{"destroyed_blobs": 1}, {"destroyed_manifests": 1}]
    # A second run finds nothing to do.
    assert not cleanup(database, storage).run().anything_done


def test_a_row_a_re_pull_made_default_again_is_kept_with_its_object(database, storage, monkeypatch):
    group_id, _ = new_group(database)
    row_id, key = cached(database, storage, CachedBlob, group_id, status=PENDING)
    destroy = Cleanup._destroy

    def re_pull_commits_first(self, model, rows):
        # The re-pull's commit lands between cleanup reading the row and deleting it.
        manager, session = database.session()
        with manager:
            session.execute(
                update(CachedBlob).where(CachedBlob.id == row_id).values(status="default")
            )
        destroy(self, model, rows)

    monkeypatch.setattr(Cleanup, "_destroy", re_pull_commits_first)
    cleanup(database, storage).destroy_pending()

    assert row_exists(database, CachedBlob, row_id)
    assert storage.size(key) == 64


def test_an_object_a_re_pull_recorded_again_after_the_row_delete_is_kept(
    database, storage, monkeypatch
):
    group_id, _ = new_group(database)
    _, key = cached(database, storage, CachedBlob, group_id, status=PENDING)
    check = Cleanup._delete_unreferenced
    new_rows = []

    def re_pull_records_a_new_row(self, model, keys):
        # The row is gone; a re-pull (same storage key) inserts a new one before the check.
        manager, session = database.session()
        with manager:
            row = CachedBlob(
                group_id=group_id,
                digest="sha256:" + key.rsplit("/", 1)[1],
                size=64,
                content_type="x",
                storage_key=key,
            )
            session.add(row)
            session.flush()
            new_rows.append(row.id)
        return check(self, model, keys)

    monkeypatch.setattr(Cleanup, "_delete_unreferenced", re_pull_records_a_new_row)
    cleanup(database, storage).destroy_pending()

    manager, session = database.session()
    with manager:
        rows = session.scalars(select(CachedBlob).where(CachedBlob.storage_key == key)).all()
        # SQLite may give the new row the deleted one's id: what counts is that one is live.
        assert [(row.id, row.status) for row in rows] == [(new_rows[0], CacheStatus.DEFAULT)]
    assert storage.size(key) == 64


def test_a_row_committed_while_its_object_was_deleted_is_forgotten(database, storage):
    group_id, _ = new_group(database)
    row_id, key = cached(database, storage, CachedBlob, group_id, status=PENDING)
    committed = []

    class RacingStorage:
        """The store, with a re-pull recording its row just as the object is deleted."""

        def __getattr__(self, name):
            return getattr(storage, name)

        def delete(self, deleted: str) -> None:
            storage.delete(deleted)
            manager, session = database.session()
            with manager:
                row = CachedBlob(
                    group_id=group_id,
                    digest="sha256:" + deleted.rsplit("/", 1)[1],
                    size=64,
                    content_type="x",
                    storage_key=deleted,
                )
                session.add(row)
                session.flush()
                committed.append(row.id)

    Cleanup(database.session_factory, RacingStorage(), "cli").destroy_pending()

    assert not row_exists(database, CachedBlob, row_id)
    # Without its object it would be served as a 404 (a presigned URL): the next pull refetches.
    assert committed and not row_exists(database, CachedBlob, committed[0])


def test_ttl_expiry_destroys_only_what_was_not_read_within_it(database, storage):
    now = datetime.now(UTC)
    group_id, path = new_group(database, ttl_days=30)
    within = now - timedelta(days=30)  # read up to READ_AT_LAG later: still within the TTL
    beyond = now - timedelta(days=30) - READ_AT_LAG - timedelta(minutes=1)
    kept_manifest, kept_manifest_key = cached(
        database, storage, CachedManifest, group_id, image="kept", read_at=within
    )
    old_manifest, old_manifest_key = cached(
        database, storage, CachedManifest, group_id, image="old", read_at=beyond
    )
    kept_blob, kept_blob_key = cached(database, storage, CachedBlob, group_id, read_at=within)
    old_blob, old_blob_key = cached(database, storage, CachedBlob, group_id, read_at=beyond)
    # Without a policy, or with it disabled, nothing expires.
    no_policy, _ = new_group(database)
    unexpiring, unexpiring_key = cached(database, storage, CachedBlob, no_policy, read_at=beyond)
    disabled, _ = new_group(database, ttl_days=1)
    manager, session = database.session()
    with manager:
        session.execute(
            update(ImageTtlPolicy).where(ImageTtlPolicy.group_id == disabled).values(enabled=False)
        )
        for image, row_id in (("kept", kept_manifest), ("old", old_manifest)):
            digest = session.get(CachedManifest, row_id).digest
            session.add(CachedTag(group_id=group_id, image=image, tag="latest", digest=digest))
    switched_off, switched_off_key = cached(database, storage, CachedBlob, disabled, read_at=beyond)
    lines: list[str] = []

    counts = cleanup(database, storage, progress=lines.append).run()

    assert (counts.expired_manifests, counts.expired_blobs) == (1, 1)
    assert lines[0] == (
        f"{path}: 1 manifest(s) and 1 blob(s) unread for 30 day(s) marked for destruction"
    )
    for model, row_id, key in (
        (CachedManifest, old_manifest, old_manifest_key),
        (CachedBlob, old_blob, old_blob_key),
    ):
        assert not row_exists(database, model, row_id)
        assert storage.size(key) is None
    for model, row_id, key in (
        (CachedManifest, kept_manifest, kept_manifest_key),
        (CachedBlob, kept_blob, kept_blob_key),
        (CachedBlob, unexpiring, unexpiring_key),
        (CachedBlob, switched_off, switched_off_key),
    ):
        assert row_exists(database, model, row_id)
        assert storage.size(key) == 64
    manager, session = database.session()
    with manager:
        tags = session.scalars(select(CachedTag.image).where(CachedTag.group_id == group_id))
        assert list(tags) == ["kept"]
        event = session.scalars(
            select(AuditEvent).where(
                AuditEvent.group_path == path, AuditEvent.action == "cache.expire"
            )
        ).one()
        assert json.loads(event.detail) == {"ttl_days": 30, "manifests": 1, "blobs": 1, "tags": 1}
    assert not cleanup(database, storage).run().anything_done


def test_orphans_go_only_past_the_grace_period(database, storage):
    group_id, _ = new_group(database)
    _, referenced = cached(database, storage, CachedBlob, group_id)
    orphan = storage_key("blobs", "sha256:" + "ab" * 32)
    put(storage, orphan, b"left by a removed group")
    foreign = "notes/readme"
    put(storage, foreign, b"not the cache's")

    cleanup(database, storage).remove_orphans()
    assert storage.size(orphan) is not None  # younger than the grace period

    later = datetime.now(UTC) + ORPHAN_GRACE + timedelta(minutes=1)
    run = cleanup(database, storage, now=lambda: later)
    run.remove_orphans()

    assert run.counts.orphaned_objects == 1
    assert storage.size(orphan) is None
    assert storage.size(referenced) == 64
    assert storage.size(foreign) is not None


def test_spool_leftovers_go_past_the_grace_period_but_never_a_running_fills(database, tmp_path):
    storage = storage_from_settings(
        {"depproxy.storage": "filesystem", "depproxy.storage.path": str(tmp_path / "store")}
    )
    spool = tmp_path / "store" / ".tmp"
    old = (datetime.now(UTC) - SPOOL_GRACE - timedelta(minutes=1)).timestamp()
    leftover, fresh, running = spool / "manifest-left", spool / "fill-fresh", spool / "fill-run"
    for path in (leftover, fresh, running):
        path.write_bytes(b"partial")
    for path in (leftover, running):
        os.utime(path, (old, old))
    # A fill stalled upstream for longer than the grace period still holds its lock.
    with open(running, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        run = cleanup(database, storage)
        run.remove_spool_leftovers()

    assert run.counts.spool_files == 1
    assert not leftover.exists()
    assert fresh.exists() and running.exists()
