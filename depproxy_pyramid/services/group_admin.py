"""What a group's owners and instance admins read and change of its Dependency Proxy.

Shared by the HTML pages, the JSON API and the CLI. Every change is audited in the caller's
transaction, so a change and its record are committed, or rolled back, together. Upstream
passwords are write-only: they are encrypted here and never read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..audit import Action, record
from ..credentials import Keyring
from ..models import (
    AuditEvent,
    CachedBlob,
    CachedManifest,
    CachedTag,
    CacheStatus,
    Group,
    ImageTtlPolicy,
    ProxySettings,
)
from ..models.accounts import UpstreamCredential
from ..upstream import DOCKER_MANIFEST_LIST, OCI_INDEX
from .purge import PurgeCounts, purge_group

# GitLab offers 1, 7, 14, 30 and 90 days; any whole number of days up to a year is taken.
TTL_DAYS_MIN, TTL_DAYS_MAX = 1, 365
MAX_UPSTREAM_USERNAME = 255
MAX_UPSTREAM_PASSWORD = 1024


class InvalidChange(ValueError):
    """A change refused, with a message written to be shown to whoever asked for it."""


@dataclass(frozen=True)
class ProxyConfig:
    """A group's Dependency Proxy settings; `credential_registries` names the registries it
    has upstream credentials for, never the credentials."""

    enabled: bool
    ttl_enabled: bool
    ttl_days: int
    credential_registries: tuple[str, ...]


def proxy_config(session: Session, group: Group) -> ProxyConfig:
    proxy = group.proxy_settings
    ttl = group.ttl_policy
    registries = session.scalars(
        select(UpstreamCredential.registry_host)
        .where(UpstreamCredential.group_id == group.id)
        .order_by(UpstreamCredential.registry_host)
    ).all()
    return ProxyConfig(
        enabled=proxy.enabled if proxy is not None else True,
        ttl_enabled=ttl.enabled if ttl is not None else False,
        ttl_days=ttl.ttl_days if ttl is not None else 90,
        credential_registries=tuple(registries),
    )


def change_proxy(
    session: Session,
    group: Group,
    actor: str,
    *,
    enabled: bool | None = None,
    ttl_enabled: bool | None = None,
    ttl_days: int | None = None,
) -> ProxyConfig:
    """Change what is given (None: unchanged); audit each setting that changed, old and new."""
    if ttl_days is not None and not TTL_DAYS_MIN <= ttl_days <= TTL_DAYS_MAX:
        raise InvalidChange(f"the TTL is {TTL_DAYS_MIN} to {TTL_DAYS_MAX} days")
    before = proxy_config(session, group)
    if enabled is not None and enabled != before.enabled:
        proxy = group.proxy_settings or ProxySettings(group=group)
        proxy.enabled = enabled
        session.add(proxy)
        record(
            session,
            actor,
            Action.PROXY_SETTINGS,
            group_path=group.path,
            detail={"enabled": [before.enabled, enabled]},
        )
    changed = {}
    if ttl_enabled is not None and ttl_enabled != before.ttl_enabled:
        changed["enabled"] = [before.ttl_enabled, ttl_enabled]
    if ttl_days is not None and ttl_days != before.ttl_days:
        changed["ttl_days"] = [before.ttl_days, ttl_days]
    if changed:
        policy = group.ttl_policy or ImageTtlPolicy(group=group)
        policy.enabled = ttl_enabled if ttl_enabled is not None else before.ttl_enabled
        policy.ttl_days = ttl_days if ttl_days is not None else before.ttl_days
        session.add(policy)
        record(session, actor, Action.TTL_POLICY, group_path=group.path, detail=changed)
    session.flush()
    return proxy_config(session, group)


def set_upstream_credentials(
    session: Session,
    group: Group,
    actor: str,
    registry: str,
    username: str,
    password: str,
    keyring: Keyring,
) -> None:
    """Store the group's credentials for `registry` (a configured registry host), encrypted."""
    if not username or len(username) > MAX_UPSTREAM_USERNAME:
        raise InvalidChange(f"an upstream user name has 1 to {MAX_UPSTREAM_USERNAME} characters")
    if not password or len(password) > MAX_UPSTREAM_PASSWORD:
        raise InvalidChange(f"an upstream password has 1 to {MAX_UPSTREAM_PASSWORD} characters")
    stored = session.get(UpstreamCredential, (group.id, registry))
    if stored is None:
        stored = UpstreamCredential(group=group, registry_host=registry)
        session.add(stored)
    stored.username = username
    stored.password_encrypted = keyring.encrypt(password)
    record(
        session,
        actor,
        Action.CREDENTIALS_SET,
        group_path=group.path,
        target=registry,
        detail={"username": username},
    )


def clear_upstream_credentials(session: Session, group: Group, actor: str, registry: str) -> bool:
    """Remove the group's credentials for `registry`; False when it had none."""
    stored = session.get(UpstreamCredential, (group.id, registry))
    if stored is None:
        return False
    session.delete(stored)
    record(session, actor, Action.CREDENTIALS_REMOVE, group_path=group.path, target=registry)
    return True


def purge(session: Session, group: Group, actor: str) -> PurgeCounts:
    """Purge the group's cache (see `services.purge`) and audit it. The caller drops what its
    process keeps in memory once the transaction commits (`ProxyService.forget_group`)."""
    counts = purge_group(session, group.id)
    record(
        session,
        actor,
        Action.CACHE_PURGE,
        group_path=group.path,
        detail={"manifests": counts.manifests, "blobs": counts.blobs},
    )
    return counts


def recent_changes(session: Session, group_path: str, limit: int = 20) -> list[AuditEvent]:
    """The group's audit log, newest first."""
    return list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.group_path == group_path)
            .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
            .limit(limit)
        )
    )


@dataclass(frozen=True)
class CacheSummary:
    """What a group's cache serves: counts and bytes of manifests and blobs."""

    manifests: int
    manifest_bytes: int
    blobs: int
    blob_bytes: int
    last_read: datetime | None

    @property
    def total_bytes(self) -> int:
        return self.manifest_bytes + self.blob_bytes


def cache_summary(session: Session, group_id: int) -> CacheSummary:
    counts = []
    for model in (CachedManifest, CachedBlob):
        counts.append(
            session.execute(
                select(
                    func.count(), func.coalesce(func.sum(model.size), 0), func.max(model.read_at)
                ).where(model.group_id == group_id, model.status == CacheStatus.DEFAULT)
            ).one()
        )
    (manifests, manifest_bytes, manifest_read), (blobs, blob_bytes, blob_read) = counts
    reads = [read for read in (manifest_read, blob_read) if read is not None]
    return CacheSummary(
        manifests, int(manifest_bytes), blobs, int(blob_bytes), max(reads) if reads else None
    )


@dataclass(frozen=True)
class CachedImage:
    """A cached manifest, with the tag it was pulled by (None: pulled by digest, as a
    multi-platform image's platform manifests are)."""

    image: str
    tag: str | None
    digest: str
    media_type: str
    # The manifest's own bytes, and what pulling the image moves (see `CachedManifest`).
    size: int
    image_size: int | None
    read_at: datetime

    @property
    def is_index(self) -> bool:
        return self.media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST)


def cached_images(
    session: Session, group_id: int, *, offset: int, limit: int
) -> tuple[list[CachedImage], int]:
    """A page of the group's cached manifests (one row per tag pointing at one, one row for an
    untagged one), most recently read first, and how many rows there are in all."""
    tagged = (
        select(
            CachedManifest.image,
            CachedTag.tag,
            CachedManifest.digest,
            CachedManifest.content_type,
            CachedManifest.size,
            CachedManifest.image_size,
            CachedManifest.read_at,
        )
        .select_from(CachedManifest)
        .outerjoin(
            CachedTag,
            (CachedTag.group_id == CachedManifest.group_id)
            & (CachedTag.image == CachedManifest.image)
            & (CachedTag.digest == CachedManifest.digest),
        )
        .where(CachedManifest.group_id == group_id, CachedManifest.status == CacheStatus.DEFAULT)
        # A tag kept per set of accepted types may point here more than once.
        .distinct()
    )
    total = session.scalar(select(func.count()).select_from(tagged.subquery()))
    rows = session.execute(
        tagged.order_by(
            CachedManifest.read_at.desc(),
            CachedManifest.image,
            CachedTag.tag,
            CachedManifest.digest,
        )
        .offset(offset)
        .limit(limit)
    ).all()
    return [CachedImage(*row) for row in rows], total or 0


def cached_blobs(
    session: Session, group_id: int, *, offset: int, limit: int
) -> tuple[list[CachedBlob], int]:
    """A page of the group's cached blobs, largest first, and how many there are in all."""
    query = select(CachedBlob).where(
        CachedBlob.group_id == group_id, CachedBlob.status == CacheStatus.DEFAULT
    )
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(
        query.order_by(CachedBlob.size.desc(), CachedBlob.digest).offset(offset).limit(limit)
    ).all()
    return list(rows), total or 0
