"""Named permissions and the principals group ACLs are written in."""

from __future__ import annotations

import enum

from .models import Role


class Permission(enum.StrEnum):
    VIEW = "group:view"
    PULL = "dependency_proxy:pull"
    ADMINISTER = "dependency_proxy:administer"


INSTANCE_ADMIN = "role:admin"


def member_principal(group_id: int, role: Role) -> str:
    """Held by members of `group_id` whose role is at least `role`."""
    return f"group:{group_id}:{role.name.lower()}"


def deploy_token_principal(group_id: int) -> str:
    return f"group:{group_id}:deploy"
