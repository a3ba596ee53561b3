"""Traversal: the root resolves nested group paths; a group's ACL comes from its members.

Every registry request resolves its group and the group's ancestors. They change rarely, so
`GroupDirectory` shares what it found between requests for `depproxy.lookup_cache_seconds`:
a group disabled, made private or removed elsewhere is refused within that time.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyramid.authorization import ALL_PERMISSIONS, DENY_ALL, Allow, Deny, Everyone
from pyramid.config import Configurator
from pyramid.request import Request
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload
from zope.interface import Interface, implementer

from .caching import MISSING, BoundedCache
from .models import Group, Role, Visibility
from .names import Repository, group_path_problem
from .permissions import (
    ANONYMOUS_PULLER,
    INSTANCE_ADMIN,
    SIGNED_IN_ACCOUNT,
    Permission,
    deploy_token_principal,
    member_principal,
)


@dataclass(frozen=True)
class GroupInfo:
    """What authorization needs of a group, detached from any session so requests share it."""

    id: int
    path: str
    name: str
    visibility: Visibility
    proxy_enabled: bool

    @classmethod
    def of(cls, group: Group) -> GroupInfo:
        settings = group.proxy_settings
        return cls(
            id=group.id,
            path=group.path,
            name=group.name,
            visibility=Visibility(group.visibility),
            proxy_enabled=settings is None or settings.enabled,
        )


class IGroupDirectory(Interface):
    def chain(request, path, fresh=False):
        """The group at `path` and its ancestors, top-level first; None when one is missing.

        `fresh` looks them up again, and shares what it found from then on.
        """

    def forget(path):
        """Drop what was looked up of the group at `path`, once a change to it committed."""


@implementer(IGroupDirectory)
class GroupDirectory:
    MAX_ENTRIES = 4096

    def __init__(self, seconds: float) -> None:
        self._cache: BoundedCache[str, tuple[GroupInfo, ...] | None] = BoundedCache(
            self.MAX_ENTRIES, ttl=seconds
        )

    def chain(
        self, request: Request, path: str, fresh: bool = False
    ) -> tuple[GroupInfo, ...] | None:
        found = MISSING if fresh else self._cache.get(path)
        if found is MISSING:
            found = self._load(request.depproxy_dbsession, path)
            # Unknown paths too: a client asking for one again and again costs no query.
            self._cache.put(path, found)
        return found  # type: ignore[return-value]

    def forget(self, path: str) -> None:
        # A subgroup's chain holds this group too, but only a group's own settings decide
        # its ACL, so dropping its own entry is enough.
        self._cache.discard(path)

    @staticmethod
    def _load(dbsession: Session, path: str) -> tuple[GroupInfo, ...] | None:
        segments = path.split("/")
        wanted = ["/".join(segments[: i + 1]) for i in range(len(segments))]
        rows = dbsession.scalars(
            select(Group).where(Group.path.in_(wanted)).options(selectinload(Group.proxy_settings))
        ).all()
        by_path = {group.path: GroupInfo.of(group) for group in rows}
        if len(by_path) != len(wanted):
            return None
        return tuple(by_path[p] for p in wanted)


class GroupResource:
    """A group as the security policy sees it: its ACL, and whether its proxy is on."""

    def __init__(
        self,
        group: GroupInfo,
        ancestors: list[GroupInfo],
        parent: object,
        *,
        anonymous_pull: bool = False,
    ) -> None:
        self.group = group
        # Nearest first, ending at the top-level group; the group itself is included.
        self.ancestors = ancestors
        # The mirror group the operator opened to callers without credentials.
        self.anonymous_pull = anonymous_pull
        self.__name__ = group.name
        self.__parent__ = parent

    @property
    def path(self) -> str:
        return self.group.path

    @property
    def proxy_enabled(self) -> bool:
        return self.group.proxy_enabled

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
        if self.anonymous_pull:
            # Pulls only: seeing the group (its settings, its members) still takes membership.
            acl.append((Allow, ANONYMOUS_PULLER, Permission.PULL))
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

    def find(self, path: str, *, fresh: bool = False) -> GroupResource:
        """The group at `path`; KeyError (a 404) when the path is malformed or unknown.

        `fresh` skips what other requests looked up within `depproxy.lookup_cache_seconds`.
        """
        if group_path_problem(path):
            raise KeyError(path)
        directory = self.request.registry.getUtility(IGroupDirectory)
        chain = directory.chain(self.request, path, fresh)
        if chain is None:
            raise KeyError(path)
        settings = self.request.registry["depproxy.settings"]
        parent: object = self
        resource = None
        for depth, group in enumerate(chain):
            resource = GroupResource(
                group,
                list(reversed(chain[: depth + 1])),
                parent,
                anonymous_pull=settings.mirror_anonymous and group.path == settings.mirror_group,
            )
            parent = resource
        assert resource is not None
        return resource

    def __getitem__(self, name: str) -> GroupResource:
        return self.find(name)


def root_factory(request: Request) -> Root:
    return Root(request)


def includeme(config: Configurator) -> None:
    settings = config.registry["depproxy.settings"]
    config.registry.registerUtility(
        GroupDirectory(settings.lookup_cache_seconds), IGroupDirectory
    )
