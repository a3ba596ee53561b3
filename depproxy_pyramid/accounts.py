"""Who may sign in to the registry, and which groups they belong to.

This is the one extension point through which a host portal brings its own users: it registers
an `IAccountSource` with `config.set_dependency_proxy_accounts(source)` after including the
add-on. Without one, the add-on's own tables (users, passwords, personal access tokens and
memberships, managed with `depproxy-admin`) answer. Group deploy tokens are the add-on's own
credentials and work with either source.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pyramid.config import Configurator
from pyramid.request import Request
from sqlalchemy import select
from zope.interface import Interface, implementer

from .credentials import RecentlyVerified, burn_password_check, token_digest
from .models import Group, Membership, PersonalAccessToken, Role, Scope, User
from .throttle import password_check

log = logging.getLogger(__name__)

MAX_ACCOUNT_ID = 200


@dataclass(frozen=True)
class Account:
    """A person (or robot) as the registry sees one.

    `id` is stable and unique within the source: registry tokens carry it, and it is looked up
    again (with its memberships) once `depproxy.lookup_cache_seconds` have passed. `scopes`
    limit what the credential that signed in may do (`read_registry` to pull, `api` to
    administer); a password allows everything.
    `personal_access_token_id` names the add-on's own personal access token that signed in,
    if one did: registry tokens minted from it stop working when it is revoked or expires.
    """

    id: str
    name: str
    is_admin: bool = False
    scopes: frozenset[str] = field(default_factory=lambda: frozenset(Scope))
    personal_access_token_id: int | None = None


class IAccountSource(Interface):
    """Answers "who is this, given these credentials" and "which groups and roles".

    A host whose people already sign in to it may also give its source a method
    `signed_in_account(request)`: the `Account` signed in to the host on this page request (from
    the host's own session), or None. The add-on's HTML pages then take that, and do not offer
    a sign-in form of their own; without it they sign people in with `authenticate`. It must
    not read `request.identity` (on the pages, that asks the add-on's page policy, which asks
    this method), and an `Account` it returns with a `personal_access_token_id` is refused.
    """

    def authenticate(request, username, password):
        """The `Account` that `username` and `password` sign in, or None.

        Called on `/jwt/auth` (what `docker login` and every pull's token request reach).
        """

    def account(request, account_id):
        """The `Account` with this id while it may still sign in, or None (disabled, deleted).

        Its `name` must be the one `authenticate` gave: registry tokens name their subject, and
        one whose id now answers to another name (an id given again) is refused.

        Each process reuses the answer, and that of `memberships`, for
        `depproxy.lookup_cache_seconds`: a change is refused within that time.
        """

    def memberships(request, account):
        """`{group path: Role}` for each add-on group the account is a member of.

        Membership of a group includes its subgroups. Paths that name no group are ignored.
        """


class IPersonalAccessTokenSource(Interface):
    """Optional, beside `IAccountSource`: signs in with a personal access token alone, as the
    JSON API (`/api/v4/...`) receives one. A source without it opens the API to no one."""

    def authenticate_token(request, token):
        """The `Account` the live token signs in (with the token's scopes and id), or None."""


def valid_account(account: object) -> Account | None:
    """The account a source returned, or None (with a warning) when it is not one: fail closed."""
    if account is None:
        return None
    if (
        not isinstance(account, Account)
        or not isinstance(account.id, str)
        or not 0 < len(account.id) <= MAX_ACCOUNT_ID
        or not account.id.isprintable()
    ):
        log.warning("the account source returned %r, not an Account; refusing", type(account))
        return None
    return account


def valid_memberships(memberships: object) -> dict[str, Role]:
    """Only well-formed (group path, Role) pairs of what a source returned."""
    if not isinstance(memberships, Mapping):
        log.warning("the account source returned %r as memberships; ignoring", type(memberships))
        return {}
    valid: dict[str, Role] = {}
    for path, role in memberships.items():
        if isinstance(path, str) and isinstance(role, Role):
            valid[path] = role
        else:
            log.warning("ignoring membership %r: %r (a group path and a Role)", path, role)
    return valid


@implementer(IAccountSource, IPersonalAccessTokenSource)
class DatabaseAccounts:
    """The default source: the add-on's own users, personal access tokens and memberships.

    Each password check (about 40 ms of CPU and 16 MiB of memory) takes one of the process's
    slots, `depproxy.auth.password_check_concurrency` of them.
    """

    def __init__(self) -> None:
        # Repeated CI logins skip the deliberately slow password hash for a few minutes.
        self._recently_verified = RecentlyVerified()

    def authenticate(self, request: Request, username: str, password: str) -> Account | None:
        dbsession = request.depproxy_dbsession
        user = dbsession.scalar(select(User).where(User.username == username))
        if user is None:
            password_check(request, burn_password_check, password)
            return None
        if not user.is_active:
            return None
        token = dbsession.scalar(
            select(PersonalAccessToken).where(
                PersonalAccessToken.token_digest == token_digest(password),
                PersonalAccessToken.user_id == user.id,
            )
        )
        if token is not None:
            return _token_account(user, token)
        verified = password_check(
            request, self._recently_verified.verify, password, user.password_hash
        )
        return _account(user, frozenset(Scope)) if verified else None

    def authenticate_token(self, request: Request, token: str) -> Account | None:
        # Looked up by digest: the secret itself is never stored or compared.
        found = request.depproxy_dbsession.scalar(
            select(PersonalAccessToken).where(
                PersonalAccessToken.token_digest == token_digest(token)
            )
        )
        if found is None or not found.user.is_active:
            return None
        return _token_account(found.user, found)

    def account(self, request: Request, account_id: str) -> Account | None:
        if not account_id.isdigit():
            return None
        user = request.depproxy_dbsession.get(User, int(account_id))
        if user is None or not user.is_active:
            return None
        return _account(user, frozenset(Scope))

    def memberships(self, request: Request, account: Account) -> dict[str, Role]:
        rows = request.depproxy_dbsession.execute(
            select(Group.path, Membership.role)
            .join(Membership, Membership.group_id == Group.id)
            .where(Membership.user_id == int(account.id))
        )
        return {path: Role(role) for path, role in rows}


def _token_account(user: User, token: PersonalAccessToken) -> Account | None:
    if token.revoked or (token.expires_at is not None and token.expires_at <= datetime.now(UTC)):
        return None
    token.last_used_at = datetime.now(UTC)
    return _account(user, token.scope_set, token.id)


def _account(user: User, scopes: frozenset[str], token_id: int | None = None) -> Account:
    return Account(
        id=str(user.id),
        name=user.username,
        is_admin=user.is_admin,
        scopes=scopes,
        personal_access_token_id=token_id,
    )


def set_dependency_proxy_accounts(config: Configurator, source: object) -> None:
    """Config directive: the `IAccountSource` that signs registry users in.

    A host calls it after `config.include("depproxy_pyramid")`; its call wins over the add-on's
    default by Pyramid's usual include-order conflict resolution.
    """
    source = config.maybe_dotted(source)
    if not IAccountSource.providedBy(source):
        raise TypeError(
            f"{source!r} does not provide IAccountSource: pass an instance of a class "
            "decorated with @implementer(IAccountSource)"
        )

    def register() -> None:
        config.registry.registerUtility(source, IAccountSource)

    config.action(IAccountSource, register)


def includeme(config: Configurator) -> None:
    config.add_directive("set_dependency_proxy_accounts", set_dependency_proxy_accounts)
    config.set_dependency_proxy_accounts(DatabaseAccounts())
