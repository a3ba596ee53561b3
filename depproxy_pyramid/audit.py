"""Recording changes in the audit log, in the transaction that makes them: a change that is
rolled back leaves no record, and no change goes unrecorded."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from .models import AuditEvent

CLI_ACTOR = "cli"


class Action(enum.StrEnum):
    CACHE_PURGE = "cache.purge"
    CACHE_CLEANUP = "cache.cleanup"
    CACHE_EXPIRE = "cache.expire"
    PROXY_SETTINGS = "proxy.settings"
    TTL_POLICY = "proxy.ttl_policy"
    CREDENTIALS_SET = "credentials.set"
    CREDENTIALS_REMOVE = "credentials.remove"
    CREDENTIALS_ROTATE = "credentials.rotate"
    TOKEN_ISSUE = "token.issue"
    TOKEN_REVOKE = "token.revoke"
    DEPLOY_TOKEN_ISSUE = "deploy_token.issue"
    DEPLOY_TOKEN_REVOKE = "deploy_token.revoke"
    USER_ADD = "user.add"
    USER_DEACTIVATE = "user.deactivate"
    USER_REMOVE = "user.remove"
    MEMBER_ADD = "member.add"
    MEMBER_ROLE = "member.role"
    MEMBER_REMOVE = "member.remove"
    GROUP_ADD = "group.add"
    GROUP_REMOVE = "group.remove"


def record(
    session: Session,
    actor: str,
    action: Action,
    *,
    group_path: str | None = None,
    target: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Add one event to `session`; it is written when the session's transaction commits."""
    event = AuditEvent(
        actor=actor[:255],
        action=action.value,
        group_path=group_path,
        target=target[:255] if target is not None else None,
        detail=json.dumps(dict(detail or {}), sort_keys=True, default=str),
    )
    session.add(event)
    return event
