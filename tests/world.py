"""A small population of groups, users and tokens that authorization tests share."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

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
