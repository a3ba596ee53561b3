"""The audit log: who changed what, and when."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .meta import Base
from .types import UTCDateTime, utcnow


class AuditEvent(Base):
    """One change: a purge, a settings or credential change, a token issued or revoked, an
    account, membership or group removed.

    The group is kept as its path, not a key: the record outlives the group it names.
    """

    __tablename__ = "depproxy_audit_events"
    __table_args__ = (
        Index("ix_depproxy_audit_events_created_at", "created_at"),
        Index("ix_depproxy_audit_events_group_path", "group_path", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # "cli", "user:<name>", "deploy_token:<name>": whoever made the change.
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    group_path: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # What inside the group (or instance) changed: a user, a token's name, a registry host.
    target: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # JSON: the particulars (counts, old and new values); never a secret.
    detail: Mapped[str] = mapped_column(Text, default="{}")
