"""A small population of groups, users and tokens that authorization tests share."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from pyramid.router import Router
from sqlalchemy import select

from depproxy_pyramid.credentials import (
    DEPLOY_TOKEN_PREFIX,
    PERSONAL_TOKEN_PREFIX,
    hash_password,
    new_token,
    token_digest,
)
from depproxy_pyramid.models import (
    DeployToken,
    Group,
    Membership,
    PersonalAccessToken,
    ProxySettings,
    Role,
    User,
    Visibility,
)

if TYPE_CHECKING:
    from tests.conftest import Database

PASSWORD = "correct horse battery staple"


@dataclass
class World:
    # name -> (username, password) as a client would send them with HTTP Basic
    credentials: dict[str, tuple[str, str]] = field(default_factory=dict)


def build_world(database) -> World:
    world = World()
    manager, session = database.session()
    with manager:
        groups = {}
        for path, visibility, enabled in [
            ("pub", Visibility.PUBLIC, True),
            ("priv", Visibility.PRIVATE, True),
            ("priv/nested", Visibility.PRIVATE, True),
            ("off", Visibility.PRIVATE, False),
        ]:
            parent = groups.get(path.rpartition("/")[0])
            group = Group(path=path, name=path.rpartition("/")[2], parent=parent)
            group.visibility = visibility
            group.proxy_settings = ProxySettings(enabled=enabled)
            session.add(group)
            groups[path] = group

        users: dict[str, User] = {}

        def user(name: str, *, admin: bool = False, active: bool = True) -> User:
            row = User(
                username=name,
                password_hash=hash_password(PASSWORD),
                is_admin=admin,
                is_active=active,
            )
            session.add(row)
            users[name] = row
            world.credentials[name] = (name, PASSWORD)
            return row

        def pat(label: str, owner: User, scopes: str, **extra) -> None:
            secret = new_token(PERSONAL_TOKEN_PREFIX)
            session.add(
                PersonalAccessToken(
                    user=owner,
                    name=label,
                    token_digest=token_digest(secret),
                    scopes=scopes,
                    **extra,
                )
            )
            world.credentials[label] = (owner.username, secret)

        user("admin", admin=True)
        user("stranger")
        user("inactive", active=False)
        for role in Role:
            member = user(role.name.lower())
            for path in ("pub", "priv", "priv/nested", "off"):
                session.add(Membership(group=groups[path], user=member, role=role))
        elder = user("elder")
        session.add(Membership(group=groups["priv"], user=elder, role=Role.OWNER))

        owner = users["owner"]
        now = datetime.now(UTC)
        pat("owner_read_token", owner, "read_registry")
        pat("owner_api_token", owner, "api")
        pat("revoked_token", owner, "read_registry api", revoked=True)
        pat("expired_token", owner, "read_registry api", expires_at=now - timedelta(minutes=1))
        world.credentials["wrong_password"] = ("owner", "not the password")

        for label, group_path, extra in [
            ("deploy_token", "priv", {}),
            ("pub_deploy_token", "pub", {}),
            ("revoked_deploy_token", "priv", {"revoked": True}),
            ("expired_deploy_token", "priv", {"expires_at": now - timedelta(seconds=1)}),
        ]:
            secret = new_token(DEPLOY_TOKEN_PREFIX)
            username = f"depproxy+deploy-token-{label}"
            session.add(
                DeployToken(
                    group=groups[group_path],
                    name=label,
                    username=username,
                    token_digest=token_digest(secret),
                    scopes="read_registry",
                    **extra,
                )
            )
            world.credentials[label] = (username, secret)
        session.flush()
    return world


def add_personal_access_token(
    database: Database, username: str, scopes: str
) -> tuple[tuple[str, str], int]:
    """A fresh live token of `username`: (the Basic credentials, its id)."""
    secret = new_token(PERSONAL_TOKEN_PREFIX)
    manager, session = database.session()
    with manager:
        owner = session.scalar(select(User).where(User.username == username))
        token = PersonalAccessToken(
            user=owner, name=f"t-{secret[-8:]}", token_digest=token_digest(secret), scopes=scopes
        )
        session.add(token)
        session.flush()
        token_id = token.id
    return (username, secret), token_id


def end_personal_access_token(database: Database, token_id: int, how: str) -> None:
    """Revoke the token (`how="revoke"`) or let it expire (`how="expire"`)."""
    manager, session = database.session()
    with manager:
        token = session.get(PersonalAccessToken, token_id)
        if how == "revoke":
            token.revoked = True
        else:
            token.expires_at = datetime.now(UTC) - timedelta(seconds=1)


def deploy_token_id(database: Database, label: str) -> int:
    manager, session = database.session()
    with manager:
        return session.scalar(select(DeployToken.id).where(DeployToken.name == label))


def fresh_sign_in_limits(app: Router) -> None:
    """Forget the failed sign-ins counted so far: a module's tests share one app."""
    from depproxy_pyramid.throttle import ISignInGuard, SignInGuard

    settings = app.registry["depproxy.settings"]
    app.registry.registerUtility(SignInGuard.from_settings(settings), ISignInGuard)
