"""The bridge to the add-on: portal users and teams, as the registry's accounts and groups."""

from __future__ import annotations

from pyramid.request import Request
from sqlalchemy import select
from zope.interface import implementer

from depproxy_pyramid.accounts import Account, IAccountSource
from depproxy_pyramid.models import Role

from .models import PortalUser, RegistryTeam, authenticate_user
from .security import signed_in_user


def _account(user: PortalUser) -> Account:
    # A portal admin is not a registry instance admin: what a host principal such as
    # `role:admin` allows on the portal grants nothing in the registry. Pulls from private
    # groups come only from explicit teams.
    return Account(id=str(user.id), name=user.username, is_admin=False)


@implementer(IAccountSource)
class PortalAccounts:
    """Registry sign-in (`docker login`, `/jwt/auth`) with portal user names and passwords."""

    def authenticate(self, request: Request, username: str, password: str) -> Account | None:
        user = authenticate_user(request.dbsession, username, password)
        return _account(user) if user is not None else None

    def account(self, request: Request, account_id: str) -> Account | None:
        if not account_id.isdigit():
            return None
        user = request.dbsession.get(PortalUser, int(account_id))
        return _account(user) if user is not None else None

    def signed_in_account(self, request: Request) -> Account | None:
        """The add-on's pages (`/registry/groups/.../-/dependency_proxy`) take the portal's
        sign-in: whoever is signed in to the portal is signed in there."""
        user = signed_in_user(request)
        return _account(user) if user is not None else None

    def memberships(self, request: Request, account: Account) -> dict[str, Role]:
        teams = request.dbsession.scalars(
            select(RegistryTeam).where(RegistryTeam.user_id == int(account.id))
        )
        return {team.group_path: Role[team.role.upper()] for team in teams}
