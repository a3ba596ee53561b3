"""Traversal: the root resolves nested group paths; a group's ACL comes from its members."""

from __future__ import annotations

from pyramid.authorization import ALL_PERMISSIONS, DENY_ALL, Allow, Deny, Everyone
from pyramid.request import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Group, Role, Visibility
from .names import Repository, group_path_problem
from .permissions import (
    INSTANCE_ADMIN,
    SIGNED_IN_ACCOUNT,
    Permission,
    deploy_token_principal,
    member_principal,
)


class GroupResource:
    """A group as the security policy sees it: its ACL, and whether its proxy is on."""

    def __init__(self, group: Group, ancestors: list[Group], parent: object) -> None:
        self.group = group
        # Nearest first, ending at the top-level group; the group itself is included.
        self.ancestors = ancestors
        self.__name__ = group.name
        self.__parent__ = parent

    @property
    def path(self) -> str:
        return self.group.path

    @property
    def proxy_enabled(self) -> bool:
        settings = self.group.proxy_settings
        return settings is None or settings.enabled

    @property
    def __acl__(self) -> list:
        acl: list = []
        if not self.proxy_enabled:
            acl.append((Deny, Everyone, Permission.PULL))
        acl.append((Allow, INSTANCE_ADMIN, ALL_PERMISSIONS))
        for group in self.ancestors:
            acl.append(
                (
                    Allow,
                    member_principal(group.path, Role.GUEST),
                    (Permission.VIEW, Permission.PULL),
                )
            )
            acl.append(
                (Allow, deploy_token_principal(group.path), (Permission.VIEW, Permission.PULL))
            )
            acl.append((Allow, member_principal(group.path, Role.OWNER), Permission.ADMINISTER))
        if self.group.visibility == Visibility.PUBLIC:
            acl.append((Allow, Everyone, Permission.VIEW))
            acl.append((Allow, SIGNED_IN_ACCOUNT, Permission.PULL))
        acl.append(DENY_ALL)
        return acl

    def __getitem__(self, name: str) -> GroupResource:
        return self.__parent__.find(f"{self.path}/{name}")  # type: ignore[attr-defined]


class RepositoryResource:
    """One proxied image inside a group; it inherits the group's ACL.

    `group` is None when no such group exists: then nothing is allowed, and the forbidden view
    answers as it does for a group the caller may not see.
    """

    def __init__(self, repository: Repository, group: GroupResource | None) -> None:
        self.repository = repository
        self.group = group
        self.__name__ = repository.image
        self.__parent__ = group

    @property
    def __acl__(self) -> list:
        return self.group.__acl__ if self.group is not None else [DENY_ALL]


class Root:
    __name__ = ""
    __parent__ = None
    __acl__ = [(Allow, INSTANCE_ADMIN, ALL_PERMISSIONS), DENY_ALL]

    def __init__(self, request: Request) -> None:
        self.request = request

    @property
    def dbsession(self) -> Session:
        return self.request.depproxy_dbsession

    def find(self, path: str) -> GroupResource:
        """The group at `path`; KeyError (a 404) when the path is malformed or unknown."""
        if group_path_problem(path):
            raise KeyError(path)
        segments = path.split("/")
        wanted = ["/".join(segments[: i + 1]) for i in range(len(segments))]
        rows = self.dbsession.scalars(select(Group).where(Group.path.in_(wanted))).all()
        by_path = {group.path: group for group in rows}
        if len(by_path) != len(wanted):
            raise KeyError(path)
        parent: object = self
        resource = None
        for group_path in wanted:
            group = by_path[group_path]
            ancestors = [by_path[p] for p in reversed(wanted[: wanted.index(group_path) + 1])]
            resource = GroupResource(group, ancestors, parent)
            parent = resource
        assert resource is not None
        return resource

    def __getitem__(self, name: str) -> GroupResource:
        return self.find(name)


def root_factory(request: Request) -> Root:
    return Root(request)
