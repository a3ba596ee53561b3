"""Named permissions and the principals group ACLs are written in.

Every principal the add-on grants starts with `depproxy:`, and only the add-on's own policy
hands them out: a host principal such as `role:admin` means nothing here.
"""

from __future__ import annotations

import enum

from .models import Role


class Permission(enum.StrEnum):
    VIEW = "group:view"
    PULL = "dependency_proxy:pull"
    ADMINISTER = "dependency_proxy:administer"


INSTANCE_ADMIN = "depproxy:admin"
# Every signed-in account, and no deploy token: a public group lets any account pull from it,
# while a deploy token pulls only within its own group's hierarchy.
SIGNED_IN_ACCOUNT = "depproxy:account"
# A caller without credentials: on the token endpoint, or holding the token it was given there.
# Only the mirror group, when the operator opens it, grants it anything (pulls).
ANONYMOUS_PULLER = "depproxy:anonymous"


def account_principal(account_id: str) -> str:
    return f"depproxy:account:{account_id}"


def member_principal(group_path: str, role: Role) -> str:
    """Held by members of the group at `group_path` whose role is at least `role`."""
    return f"depproxy:group:{group_path}:{role.name.lower()}"


def deploy_token_principal(group_path: str) -> str:
    return f"depproxy:group:{group_path}:deploy"
