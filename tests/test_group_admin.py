"""Purge and the other group administration services: each change audited, other groups' caches
untouched."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from depproxy_pyramid.audit import CLI_ACTOR, Action, record
from depproxy_pyramid.caching import BoundedCache
from depproxy_pyramid.credentials import Keyring
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
from depproxy_pyramid.services import group_admin
from depproxy_pyramid.services.proxy import image_size
from depproxy_pyramid.services.purge import PurgeCounts, purge_group
from depproxy_pyramid.upstream import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Manifest

KEYRING = Keyring(["k" * 40])


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


def test_group_admin_changes_are_audited_and_summarised(database):
    manager, session = database.session()
    with manager:
        group = _cached_group(session, "admin-view")
        group_id = group.id
    manager, session = database.session()
    with manager:
        group = session.get(Group, group_id)
        config = group_admin.change_proxy(
            session, group, "user:owner", enabled=False, ttl_enabled=True, ttl_days=7
        )
        assert (config.enabled, config.ttl_enabled, config.ttl_days) == (False, True, 7)
        with pytest.raises(group_admin.InvalidChange):
            group_admin.change_proxy(session, group, "user:owner", ttl_days=0)
        group_admin.set_upstream_credentials(
            session, group, "user:owner", "registry-1.docker.io", "bot", "s3cret", KEYRING
        )
        assert group_admin.proxy_config(session, group).credential_registries == (
            "registry-1.docker.io",
        )
        summary = group_admin.cache_summary(session, group_id)
        assert (summary.manifests, summary.blobs, summary.total_bytes) == (1, 1, 6)
        images, total = group_admin.cached_images(session, group_id, offset=0, limit=10)
        assert total == 1 and [(i.image, i.tag) for i in images] == [("library/alpine", "latest")]
        blobs, total = group_admin.cached_blobs(session, group_id, offset=0, limit=10)
        assert total == 1 and blobs[0].size == 3
        group_admin.purge(session, group, "user:owner")
    manager, session = database.session()
    with manager:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.group_path == "admin-view").order_by(AuditEvent.id)
        ).all()
        assert [(e.actor, e.action) for e in events] == [
            ("user:owner", "proxy.settings"),
            ("user:owner", "proxy.ttl_policy"),
            ("user:owner", "credentials.set"),
            ("user:owner", "cache.purge"),
        ]
        assert json.loads(events[1].detail) == {"enabled": [False, True], "ttl_days": [90, 7]}
        assert "s3cret" not in " ".join(e.detail for e in events)
        assert group_admin.recent_changes(session, "admin-view", limit=2) == events[:1:-1]
        assert group_admin.cache_summary(session, group_id).manifests == 0


def test_image_size_counts_the_manifest_config_and_layers():
    layers = [{"size": 100}, {"size": 2000}]
    image = json.dumps({"schemaVersion": 2, "config": {"size": 7}, "layers": layers}).encode()
    assert image_size(Manifest(image, OCI_MANIFEST, "sha256:x")) == len(image) + 2107
    assert image_size(Manifest(image, DOCKER_MANIFEST, "sha256:x")) == len(image) + 2107
    index = json.dumps({"schemaVersion": 2, "manifests": [{"size": 5}]}).encode()
    assert image_size(Manifest(index, OCI_INDEX, "sha256:x")) is None
    for bad in (
        {"config": {}, "layers": []},
        {"config": {"size": -1}, "layers": []},
        {"config": {"size": 1}, "layers": [{"size": "9"}]},
        {"config": {"size": 1}},
    ):
        assert image_size(Manifest(json.dumps(bad).encode(), OCI_MANIFEST, "sha256:x")) is None
