"""What an instance admin sees of the whole instance: each group's cache, the largest cached
images, the storage in use and the recent audit log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, literal, select, union_all
from sqlalchemy.orm import Session

from ..models import AuditEvent, CachedBlob, CachedManifest, CacheStatus, Group, ProxySettings


@dataclass(frozen=True)
class GroupUsage:
    path: str
    visibility: str
    enabled: bool
    manifests: int
    blobs: int
    bytes: int
    # The last pull that read its cache (purged rows included, until they are deleted) or
    # the last change made to it, whichever came later.
    last_activity: datetime | None


@dataclass(frozen=True)
class LargeImage:
    """A cached image manifest and what pulling it moves (`CachedManifest.image_size`)."""

    group_path: str
    image: str
    digest: str
    image_size: int
    read_at: datetime


@dataclass(frozen=True)
class InstanceOverview:
    groups: list[GroupUsage]
    largest_images: list[LargeImage]
    # Bytes the cache serves, and bytes purged but not yet deleted from storage.
    bytes_in_use: int
    bytes_pending_deletion: int
    recent_events: list[AuditEvent]


def instance_overview(session: Session, *, largest: int = 10, events: int = 50) -> InstanceOverview:
    # One row per cached object, manifests and blobs alike.
    rows = union_all(
        *(
            select(
                model.group_id,
                model.status,
                model.size,
                model.read_at,
                literal(int(model is CachedManifest)).label("is_m"),
            )
            for model in (CachedManifest, CachedBlob)
        )
    ).subquery()
    serving = rows.c.status == CacheStatus.DEFAULT
    per_group = (
        select(
            rows.c.group_id,
            func.coalesce(func.sum(rows.c.is_m).filter(serving), 0).label("manifests"),
            func.coalesce(func.sum(1 - rows.c.is_m).filter(serving), 0).label("blobs"),
            func.coalesce(func.sum(rows.c.size).filter(serving), 0).label("bytes"),
            func.max(rows.c.read_at).label("last_read"),
        )
        .group_by(rows.c.group_id)
        .subquery()
    )
    last_changes = dict(
        session.execute(
            select(AuditEvent.group_path, func.max(AuditEvent.created_at)).group_by(
                AuditEvent.group_path
            )
        ).all()
    )
    groups = [
        GroupUsage(
            path,
            str(visibility),
            enabled if enabled is not None else True,
            int(manifests or 0),
            int(blobs or 0),
            int(size or 0),
            _latest(last_read, last_changes.get(path)),
        )
        for path, visibility, enabled, manifests, blobs, size, last_read in session.execute(
            select(
                Group.path,
                Group.visibility,
                ProxySettings.enabled,
                per_group.c.manifests,
                per_group.c.blobs,
                per_group.c.bytes,
                per_group.c.last_read,
            )
            .outerjoin(ProxySettings, ProxySettings.group_id == Group.id)
            .outerjoin(per_group, per_group.c.group_id == Group.id)
            .order_by(Group.path)
        )
    ]
    largest_images = [
        LargeImage(*row)
        for row in session.execute(
            select(
                Group.path,
                CachedManifest.image,
                CachedManifest.digest,
                CachedManifest.image_size,
                CachedManifest.read_at,
            )
            .join(Group, Group.id == CachedManifest.group_id)
            .where(
                CachedManifest.status == CacheStatus.DEFAULT,
                CachedManifest.image_size.is_not(None),
            )
            .order_by(CachedManifest.image_size.desc(), CachedManifest.digest)
            .limit(largest)
        )
    ]
    # Per stored object, not per row: groups that pulled the same blob share one object, which
    # is in use while any of their rows serves it.
    objects = union_all(
        *(
            select(model.storage_key, model.size, model.status)
            for model in (CachedManifest, CachedBlob)
        )
    ).subquery()
    per_object = (
        select(
            func.max(objects.c.size).label("size"),
            func.max(case((objects.c.status == CacheStatus.DEFAULT, 1), else_=0)).label("serving"),
        )
        .group_by(objects.c.storage_key)
        .subquery()
    )
    in_use, pending = session.execute(
        select(
            func.coalesce(func.sum(per_object.c.size).filter(per_object.c.serving == 1), 0),
            func.coalesce(func.sum(per_object.c.size).filter(per_object.c.serving == 0), 0),
        )
    ).one()
    recent = session.scalars(
        select(AuditEvent)
        .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
        .limit(events)
    ).all()
    return InstanceOverview(groups, largest_images, int(in_use), int(pending), list(recent))


def _latest(*moments: datetime | None) -> datetime | None:
    known = [moment for moment in moments if moment is not None]
    return max(known) if known else None
