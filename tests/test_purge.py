"""Purge marks a group's cache for destruction and records itself; other groups keep theirs."""

from __future__ import annotations

import json

from sqlalchemy import func, select

from depproxy_pyramid.audit import CLI_ACTOR, Action, record
from depproxy_pyramid.caching import BoundedCache
from depproxy_pyramid.models import (
    AuditEvent,
    CachedBlob,
    CachedListing,
    CachedManifest,
    CachedTag,
    CacheStatus,
    Group,
    ListingKind,
    Visibility,
)
from depproxy_pyramid.services.purge import PurgeCounts, purge_group


def _cached_group(session, path: str) -> Group:
    group = Group(path=path, name=path, visibility=Visibility.PRIVATE)
    session.add(group)
    session.flush()
    digest = "sha256:" + "a" * 64
    session.add_all(
        [
            CachedBlob(
                group_id=group.id, digest=digest, size=3, content_type="x", storage_key=f"{path}/b"
            ),
            CachedManifest(
                group_id=group.id,
                image="library/alpine",
                digest=digest,
                size=3,
                content_type="x",
                storage_key=f"{path}/m",
            ),
            CachedTag(group_id=group.id, image="library/alpine", tag="latest", digest=digest),
            CachedListing(
                group_id=group.id,
                image="library/alpine",
                kind=ListingKind.TAGS,
                query="",
                content="{}",
            ),
        ]
    )
    return group


def _count(session, model, group: Group, **where) -> int:
    query = select(func.count()).select_from(model).where(model.group_id == group.id)
    for name, value in where.items():
        query = query.where(getattr(model, name) == value)
    return session.scalar(query)


def test_purge_marks_only_that_groups_cache(database):
    manager, session = database.session()
    with manager:
        purged, kept = _cached_group(session, "purged"), _cached_group(session, "kept")
    manager, session = database.session()
    with manager:
        counts = purge_group(session, purged.id)
        record(session, CLI_ACTOR, Action.CACHE_PURGE, group_path="purged", detail={"blobs": 1})
    assert counts == PurgeCounts(manifests=1, blobs=1)
    manager, session = database.session()
    with manager:
        pending = CacheStatus.PENDING_DESTRUCTION
        assert _count(session, CachedBlob, purged, status=pending) == 1
        assert _count(session, CachedManifest, purged, status=pending) == 1
        assert _count(session, CachedTag, purged) == _count(session, CachedListing, purged) == 0
        for model in (CachedBlob, CachedManifest):
            assert _count(session, model, kept, status=CacheStatus.DEFAULT) == 1
        assert _count(session, CachedTag, kept) == _count(session, CachedListing, kept) == 1
        event = session.scalars(select(AuditEvent).where(AuditEvent.group_path == "purged")).one()
        assert (event.actor, event.action) == ("cli", "cache.purge")
        assert json.loads(event.detail) == {"blobs": 1}
        # A second purge finds nothing left to mark.
        assert purge_group(session, purged.id) == PurgeCounts(manifests=0, blobs=0)


def test_discard_where_drops_only_matching_keys():
    cache: BoundedCache[tuple[int, str], str] = BoundedCache(10)
    for key in [(1, "a"), (1, "b"), (2, "a")]:
        cache.put(key, "v")
    cache.discard_where(lambda key: key[0] == 1)
    assert len(cache) == 1 and cache.size == 1
    assert cache.get((2, "a")) == "v"
