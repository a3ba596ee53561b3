"""What the pull-through cache holds: blobs and manifests per group, where tags point, and the
last tag lists and referrers upstream gave."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import BigInteger, Enum, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ..upstream.client import MANIFEST_ACCEPT
from .meta import Base
from .types import UTCDateTime, utcnow


class CacheStatus(enum.StrEnum):
    DEFAULT = "default"
    PENDING_DESTRUCTION = "pending_destruction"
    PROCESSING = "processing"
    ERROR = "error"


def _status_column() -> Mapped[CacheStatus]:
    return mapped_column(
        Enum(
            CacheStatus,
            native_enum=False,
            length=32,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=CacheStatus.DEFAULT,
    )


class CachedBlob(Base):
    """That a group pulled a blob through its own upstream access, and where its bytes are.

    Objects are stored once by digest (`services.proxy.storage_key`), whichever groups pulled
    them: a group serves a blob only through a row of its own.
    """

    __tablename__ = "depproxy_blobs"
    __table_args__ = (
        UniqueConstraint("group_id", "digest"),
        Index("ix_depproxy_blobs_group_status_read", "group_id", "status", "read_at"),
        Index("ix_depproxy_blobs_storage_key", "storage_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("depproxy_groups.id", ondelete="CASCADE"))
    digest: Mapped[str] = mapped_column(String(135))
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(255))
    storage_key: Mapped[str] = mapped_column(String(512))
    status: Mapped[CacheStatus] = _status_column()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    read_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class CachedManifest(Base):
    """A manifest's exact bytes, cached per image by digest (digests never change content)."""

    __tablename__ = "depproxy_manifests"
    __table_args__ = (
        UniqueConstraint("group_id", "image", "digest"),
        Index("ix_depproxy_manifests_group_status_read", "group_id", "status", "read_at"),
        Index("ix_depproxy_manifests_storage_key", "storage_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("depproxy_groups.id", ondelete="CASCADE"))
    image: Mapped[str] = mapped_column(String(255))
    digest: Mapped[str] = mapped_column(String(135))
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(255))
    storage_key: Mapped[str] = mapped_column(String(512))
    # What pulling the image moves: the manifest, its config and its layers. None for an index
    # (each platform's manifest has its own) and for rows cached before it was recorded.
    image_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[CacheStatus] = _status_column()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    read_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class CachedTag(Base):
    """Where a tag pointed, for one set of accepted manifest types, when upstream last
    confirmed it.

    A registry answers a tag by what the client accepts (a platform manifest to a client that
    takes no manifest list), so each set has an answer of its own. `accept` is the Accept
    header that asked upstream for it (`ManifestAccept.header`); rows written without one are
    the answer to the four types every current client accepts.
    """

    __tablename__ = "depproxy_tags"
    __table_args__ = (UniqueConstraint("group_id", "image", "tag", "accept"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("depproxy_groups.id", ondelete="CASCADE"))
    image: Mapped[str] = mapped_column(String(255))
    tag: Mapped[str] = mapped_column(String(128))
    accept: Mapped[str] = mapped_column(String(255), server_default=MANIFEST_ACCEPT)
    digest: Mapped[str] = mapped_column(String(135))
    revalidated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ListingKind(enum.StrEnum):
    TAGS = "tags"
    REFERRERS = "referrers"


class CachedListing(Base):
    """A page of an image's tag list, or a subject's referrers, as upstream last answered.

    `query` names the answer: a tag list page's `n=..&last=..` (empty for the whole list), a
    subject's digest. `content` is the JSON the proxy built from upstream's answer, served when
    upstream fails and within `depproxy.manifest.freshness_seconds` of `fetched_at`.
    """

    __tablename__ = "depproxy_listings"
    __table_args__ = (UniqueConstraint("group_id", "image", "kind", "query"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("depproxy_groups.id", ondelete="CASCADE"))
    image: Mapped[str] = mapped_column(String(255))
    kind: Mapped[ListingKind] = mapped_column(
        Enum(
            ListingKind,
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        )
    )
    query: Mapped[str] = mapped_column(String(300))
    content: Mapped[str] = mapped_column(Text)
    fetched_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Lease(Base):
    """Which process fetches `key` from upstream for the whole fleet, and until when it is
    taken to be alive (`services.leases`)."""

    __tablename__ = "depproxy_leases"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(300))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
