"""Groups, users, memberships and the credentials that stand for them."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    Boolean,
    Enum,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .meta import Base
from .types import UTCDateTime, utcnow


class Visibility(enum.StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"


class Role(enum.IntEnum):
    """GitLab's access levels: a higher role includes everything a lower one may do."""

    GUEST = 10
    REPORTER = 20
    DEVELOPER = 30
    MAINTAINER = 40
    OWNER = 50


class Scope(enum.StrEnum):
    READ_REGISTRY = "read_registry"
    API = "api"


class Group(Base):
    __tablename__ = "depproxy_groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("depproxy_groups.id", ondelete="CASCADE"), index=True
    )
    # The full slash-separated path is stored so a nested group resolves with one lookup.
    path: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    visibility: Mapped[Visibility] = mapped_column(
        Enum(
            Visibility, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]
        ),
        default=Visibility.PRIVATE,
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    parent: Mapped[Group | None] = relationship(remote_side=[id])
    proxy_settings: Mapped[ProxySettings | None] = relationship(
        back_populates="group", uselist=False, cascade="all, delete-orphan"
    )
    ttl_policy: Mapped[ImageTtlPolicy | None] = relationship(
        back_populates="group", uselist=False, cascade="all, delete-orphan"
    )
    upstream_credentials: Mapped[list[UpstreamCredential]] = relationship(
        back_populates="group", cascade="all, delete-orphan"
    )


class User(Base):
    __tablename__ = "depproxy_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Membership(Base):
    __tablename__ = "depproxy_memberships"
    __table_args__ = (UniqueConstraint("group_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("depproxy_groups.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(
        ForeignKey("depproxy_users.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[Role] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    group: Mapped[Group] = relationship()
    user: Mapped[User] = relationship()


class PersonalAccessToken(Base):
    __tablename__ = "depproxy_personal_access_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("depproxy_users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    # SHA-256 hex of the secret: the secret itself is shown once and never stored.
    token_digest: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    user: Mapped[User] = relationship()

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(self.scopes.split())


class DeployToken(Base):
    __tablename__ = "depproxy_deploy_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(
        ForeignKey("depproxy_groups.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    username: Mapped[str] = mapped_column(String(255), unique=True)
    token_digest: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    group: Mapped[Group] = relationship()

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(self.scopes.split())


class ProxySettings(Base):
    __tablename__ = "depproxy_group_settings"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("depproxy_groups.id", ondelete="CASCADE"), primary_key=True
    )
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    group: Mapped[Group] = relationship(back_populates="proxy_settings")


class UpstreamCredential(Base):
    """A group's credentials for one upstream registry; they are sent to nothing else."""

    __tablename__ = "depproxy_upstream_credentials"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("depproxy_groups.id", ondelete="CASCADE"), primary_key=True
    )
    # The registry host as configured: the default upstream's host[:port], or a host of
    # depproxy.upstream.registries.
    registry_host: Mapped[str] = mapped_column(String(255), primary_key=True)
    username: Mapped[str] = mapped_column(String(255))
    # A Fernet token of the password under the newest of depproxy.encryption.keys.
    password_encrypted: Mapped[str] = mapped_column(String(1024))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    group: Mapped[Group] = relationship(back_populates="upstream_credentials")


class ImageTtlPolicy(Base):
    __tablename__ = "depproxy_image_ttl_policies"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("depproxy_groups.id", ondelete="CASCADE"), primary_key=True
    )
    enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    ttl_days: Mapped[int] = mapped_column(Integer, default=90)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    group: Mapped[Group] = relationship(back_populates="ttl_policy")
