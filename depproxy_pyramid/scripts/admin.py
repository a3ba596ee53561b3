"""`depproxy-admin CONFIG_URI <command>`: the operator's command line."""

from __future__ import annotations

import argparse
import configparser
import json
import os
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from pyramid.paster import bootstrap, get_appsettings, setup_logging
from pyramid.registry import Registry
from sqlalchemy import delete, func, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, joinedload

from ..audit import CLI_ACTOR, Action, record
from ..credentials import (
    DEPLOY_TOKEN_PREFIX,
    PERSONAL_TOKEN_PREFIX,
    Keyring,
    hash_password,
    new_token,
    token_digest,
)
from ..migrations import upgrade
from ..models import (
    AuditEvent,
    CachedBlob,
    CachedManifest,
    CacheStatus,
    DeployToken,
    Group,
    Membership,
    PersonalAccessToken,
    ProxySettings,
    Role,
    Scope,
    User,
    Visibility,
    database_prefix,
    engine_from_settings,
)
from ..models.accounts import UpstreamCredential
from ..names import group_path_problem
from ..services import group_admin
from ..services.cleanup import ORPHAN_GRACE, SPOOL_GRACE, Cleanup
from ..services.storage_migration import StorageFailed, StorageMigration
from ..settings import ConfigurationError, Settings, parse_settings
from ..storage import Storage, storage_from_settings
from ..upstream.routing import default_registry_host, registry_hosts

MAX_PASSWORD = 1024
AUDIT_LIMIT = 50


class CommandError(Exception):
    """A problem to report to the operator in one line."""


def _read_secret(prompt: str) -> str:
    if sys.stdin.isatty():
        import getpass

        value = getpass.getpass(prompt)
    else:
        value = sys.stdin.readline().rstrip("\r\n")
    if not value:
        raise CommandError("an empty password was given on standard input")
    if len(value) > MAX_PASSWORD:
        raise CommandError(f"passwords are at most {MAX_PASSWORD} characters")
    return value


def _user(dbsession: Session, username: str) -> User:
    user = dbsession.scalar(select(User).where(User.username == username))
    if user is None:
        raise CommandError(f"no user named {username!r}")
    return user


def _group(dbsession: Session, path: str) -> Group:
    group = dbsession.scalar(select(Group).where(Group.path == path))
    if group is None:
        raise CommandError(f"no group at {path!r}")
    return group


def _expiry(days: int | None) -> datetime | None:
    if days is None:
        return None
    if days < 1:
        raise CommandError("--expires-days must be at least 1")
    return datetime.now(UTC) + timedelta(days=days)


def _scopes(values: Sequence[str], allowed: set[str]) -> str:
    scopes = {item for value in values for item in value.replace(",", " ").split()}
    unknown = scopes - allowed
    if unknown or not scopes:
        raise CommandError(
            f"unknown scope {sorted(unknown)[0]!r}; choose from {', '.join(sorted(allowed))}"
            if unknown
            else "at least one --scope is needed"
        )
    return " ".join(sorted(scopes))


def user_add(dbsession: Session, args: argparse.Namespace, settings) -> str:
    if not args.name or len(args.name) > 255 or any(c.isspace() or c == ":" for c in args.name):
        raise CommandError("user names are 1-255 characters without spaces or ':'")
    if dbsession.scalar(select(User).where(User.username == args.name)) is not None:
        raise CommandError(f"a user named {args.name!r} already exists")
    password = _read_secret(f"Password for {args.name}: ")
    dbsession.add(
        User(username=args.name, password_hash=hash_password(password), is_admin=args.admin)
    )
    record(dbsession, CLI_ACTOR, Action.USER_ADD, target=args.name, detail={"admin": args.admin})
    return f"created user {args.name}" + (" (instance admin)" if args.admin else "")


def token_add(dbsession: Session, args: argparse.Namespace, settings) -> str:
    user = _user(dbsession, args.user)
    token = new_token(PERSONAL_TOKEN_PREFIX)
    row = PersonalAccessToken(
        user_id=user.id,
        name=args.name,
        token_digest=token_digest(token),
        scopes=_scopes(args.scope, {s.value for s in Scope}),
        expires_at=_expiry(args.expires_days),
    )
    dbsession.add(row)
    record(
        dbsession,
        CLI_ACTOR,
        Action.TOKEN_ISSUE,
        target=user.username,
        detail={"name": row.name, "scopes": row.scopes, "expires_at": row.expires_at},
    )
    return token


def group_add(dbsession: Session, args: argparse.Namespace, settings) -> str:
    problem = group_path_problem(args.path)
    if problem:
        raise CommandError(f"invalid group path {args.path!r}: {problem}")
    if dbsession.scalar(select(Group).where(Group.path == args.path)) is not None:
        raise CommandError(f"a group at {args.path!r} already exists")
    parent_path, _, name = args.path.rpartition("/")
    parent = _group(dbsession, parent_path) if parent_path else None
    visibility = Visibility.PUBLIC if args.public else Visibility.PRIVATE
    if parent is not None and parent.visibility == Visibility.PRIVATE and args.public:
        raise CommandError(f"a subgroup of private group {parent_path!r} cannot be public")
    group = Group(path=args.path, name=name, parent=parent, visibility=visibility)
    group.proxy_settings = ProxySettings(enabled=True)
    dbsession.add(group)
    record(
        dbsession,
        CLI_ACTOR,
        Action.GROUP_ADD,
        group_path=args.path,
        detail={"visibility": visibility.value},
    )
    return f"created {visibility.value} group {args.path}"


def member_add(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.group)
    user = _user(dbsession, args.user)
    role = Role[args.role.upper()]
    membership = dbsession.scalar(
        select(Membership).where(Membership.group_id == group.id, Membership.user_id == user.id)
    )
    if membership is None:
        dbsession.add(Membership(group_id=group.id, user_id=user.id, role=role))
        record(
            dbsession,
            CLI_ACTOR,
            Action.MEMBER_ADD,
            group_path=group.path,
            target=user.username,
            detail={"role": role.name.lower()},
        )
    else:
        _change_role(dbsession, membership, group, user, role)
    return f"{user.username} is {role.name.lower()} of {group.path}"


def deploy_token_add(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.group)
    token = new_token(DEPLOY_TOKEN_PREFIX)
    deploy_token = DeployToken(
        group_id=group.id,
        name=args.name,
        username=f"depproxy+deploy-token-{secrets.token_hex(6)}",
        token_digest=token_digest(token),
        scopes=_scopes(args.scope, {Scope.READ_REGISTRY.value}),
        expires_at=_expiry(args.expires_days),
    )
    dbsession.add(deploy_token)
    record(
        dbsession,
        CLI_ACTOR,
        Action.DEPLOY_TOKEN_ISSUE,
        group_path=group.path,
        target=deploy_token.name,
        detail={
            "username": deploy_token.username,
            "scopes": deploy_token.scopes,
            "expires_at": deploy_token.expires_at,
        },
    )
    return f"username: {deploy_token.username}\ntoken: {token}"


def proxy_set(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.group)
    config = group_admin.change_proxy(dbsession, group, CLI_ACTOR, enabled=args.state == "enable")
    return f"dependency proxy {'enabled' if config.enabled else 'disabled'} for {group.path}"


def _registry(settings: Settings, name: str | None, *, configured: bool = True) -> str:
    """The registry host credentials for `name` are stored under; the default upstream's.

    `configured=False` also accepts a host no longer configured, to clear what it left behind.
    """
    if name is None:
        return default_registry_host(settings.upstream_url)
    hosts = registry_hosts(
        settings.upstream_url, settings.upstream_registries, settings.upstream_docker_hub_mirrors
    )
    registry = hosts.get(name.lower(), None if configured else name.lower())
    if registry is None:
        raise CommandError(
            f"upstream registry {name!r} is not configured "
            "(depproxy.upstream.url or depproxy.upstream.registries)"
        )
    return registry


def proxy_credentials(dbsession: Session, args: argparse.Namespace, settings: Settings) -> str:
    group = _group(dbsession, args.group)
    registry = _registry(settings, args.registry, configured=not args.clear)
    if args.clear:
        if args.username:
            raise CommandError("--clear takes no --username")
        if not group_admin.clear_upstream_credentials(dbsession, group, CLI_ACTOR, registry):
            return f"{group.path} has no upstream credentials for {registry}"
        return f"upstream credentials for {registry} cleared for {group.path}"
    if not args.username:
        raise CommandError("--username is needed (or --clear)")
    password = _read_secret(f"Password of {args.username} at {registry}: ")
    try:
        group_admin.set_upstream_credentials(
            dbsession,
            group,
            CLI_ACTOR,
            registry,
            args.username,
            password,
            Keyring(settings.encryption_keys),
        )
    except group_admin.InvalidChange as error:
        raise CommandError(str(error)) from error
    if group.proxy_settings is None:
        group.proxy_settings = ProxySettings(enabled=True)
    return f"upstream credentials for {registry} set for {group.path}"


def rotate_keys(dbsession: Session, args: argparse.Namespace, settings: Settings) -> str:
    """Re-encrypt every stored upstream password under the newest key; all or nothing."""
    keyring = Keyring(settings.encryption_keys)
    rows = dbsession.scalars(
        select(UpstreamCredential)
        .options(joinedload(UpstreamCredential.group))
        .order_by(UpstreamCredential.group_id, UpstreamCredential.registry_host)
    ).all()
    failed = []
    for row in rows:
        rotated = keyring.rotate(row.password_encrypted)
        if rotated is None:
            failed.append(f"group {row.group.path!r} ({row.registry_host})")
        else:
            row.password_encrypted = rotated
    if failed:
        raise CommandError(
            f"the upstream credentials of {', '.join(failed)} do not decrypt with any key in "
            "depproxy.encryption.keys: list the key they were encrypted under after the new "
            "one, or set them again with `proxy credentials`; nothing was changed"
        )
    if rows:
        record(dbsession, CLI_ACTOR, Action.CREDENTIALS_ROTATE, detail={"count": len(rows)})
    return f"re-encrypted {len(rows)} upstream credential(s) under the newest encryption key"


# Lists --------------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    return str(value)


def _listing(rows: Sequence[Mapping[str, object]], args: argparse.Namespace, empty: str) -> str:
    """`rows` as a table with a header line, or as JSON with `--json`."""
    if args.json:
        return json.dumps(list(rows), indent=2, default=str)
    if not rows:
        return empty
    columns = list(rows[0])
    cells = [[_cell(row[column]) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
    ]
    lines = [[column.upper().replace("_", " ") for column in columns], *cells]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _token_status(revoked: bool, expires_at: datetime | None) -> str:
    if revoked:
        return "revoked"
    if expires_at is not None and expires_at <= datetime.now(UTC):
        return "expired"
    return "active"


def user_list(dbsession: Session, args: argparse.Namespace, settings) -> str:
    users = dbsession.scalars(select(User).order_by(User.username)).all()
    rows = [
        {
            "name": user.username,
            "admin": user.is_admin,
            "active": user.is_active,
            "created": user.created_at,
        }
        for user in users
    ]
    return _listing(rows, args, "no users")


def token_list(dbsession: Session, args: argparse.Namespace, settings) -> str:
    query = (
        select(PersonalAccessToken)
        .options(joinedload(PersonalAccessToken.user))
        .join(User, User.id == PersonalAccessToken.user_id)
        .order_by(User.username, PersonalAccessToken.name, PersonalAccessToken.id)
    )
    if args.user is not None:
        query = query.where(PersonalAccessToken.user_id == _user(dbsession, args.user).id)
    rows = [
        {
            "user": token.user.username,
            "name": token.name,
            "scopes": token.scopes,
            "status": _token_status(token.revoked, token.expires_at),
            "expires": token.expires_at,
            "last_used": token.last_used_at,
            "created": token.created_at,
        }
        for token in dbsession.scalars(query)
    ]
    return _listing(rows, args, "no personal access tokens")


def member_list(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.group)
    memberships = dbsession.scalars(
        select(Membership)
        .options(joinedload(Membership.user))
        .join(User, User.id == Membership.user_id)
        .where(Membership.group_id == group.id)
        .order_by(Membership.role.desc(), User.username)
    ).all()
    rows = [
        {
            "user": membership.user.username,
            "role": Role(membership.role).name.lower(),
            "active": membership.user.is_active,
            "since": membership.created_at,
        }
        for membership in memberships
    ]
    return _listing(rows, args, f"{group.path} has no members of its own")


def deploy_token_list(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.group)
    tokens = dbsession.scalars(
        select(DeployToken)
        .where(DeployToken.group_id == group.id)
        .order_by(DeployToken.name, DeployToken.id)
    ).all()
    rows = [
        {
            "name": token.name,
            "username": token.username,
            "scopes": token.scopes,
            "status": _token_status(token.revoked, token.expires_at),
            "expires": token.expires_at,
            "created": token.created_at,
        }
        for token in tokens
    ]
    return _listing(rows, args, f"{group.path} has no deploy tokens")


def _cached_counts(dbsession: Session, model: type) -> dict[int, int]:
    return dict(
        dbsession.execute(
            select(model.group_id, func.count())
            .where(model.status == CacheStatus.DEFAULT)
            .group_by(model.group_id)
        ).all()
    )


def group_list(dbsession: Session, args: argparse.Namespace, settings) -> str:
    groups = dbsession.scalars(
        select(Group)
        .options(joinedload(Group.proxy_settings), joinedload(Group.ttl_policy))
        .order_by(Group.path)
    ).all()
    members = dict(
        dbsession.execute(
            select(Membership.group_id, func.count()).group_by(Membership.group_id)
        ).all()
    )
    manifests = _cached_counts(dbsession, CachedManifest)
    blobs = _cached_counts(dbsession, CachedBlob)
    rows = [
        {
            "path": group.path,
            "visibility": group.visibility.value,
            "proxy": group.proxy_settings is None or group.proxy_settings.enabled,
            "ttl_days": group.ttl_policy.ttl_days
            if group.ttl_policy is not None and group.ttl_policy.enabled
            else None,
            "members": members.get(group.id, 0),
            "manifests": manifests.get(group.id, 0),
            "blobs": blobs.get(group.id, 0),
        }
        for group in groups
    ]
    return _listing(rows, args, "no groups")


def audit_list(dbsession: Session, args: argparse.Namespace, settings) -> str:
    if args.limit < 1:
        raise CommandError("--limit must be at least 1")
    query = select(AuditEvent).order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
    if args.group is not None:
        # The group's own events and its subgroups'; the group itself may be gone by now.
        query = query.where(
            or_(
                AuditEvent.group_path == args.group,
                AuditEvent.group_path.startswith(args.group + "/", autoescape=True),
            )
        )
    rows = [
        {
            "time": event.created_at,
            "actor": event.actor,
            "action": event.action,
            "group": event.group_path,
            "target": event.target,
            "detail": json.loads(event.detail) if args.json else event.detail,
        }
        for event in dbsession.scalars(query.limit(args.limit))
    ]
    return _listing(rows, args, "no audit events")


# Taking away --------------------------------------------------------------------------------


def _ancestor_paths(path: str) -> list[str]:
    segments = path.split("/")
    return ["/".join(segments[: i + 1]) for i in range(len(segments))]


def _left_without_owner(dbsession: Session, user: User, groups: Sequence[Group]) -> list[str]:
    """The paths of `groups` that `user` owns directly and no one else owns, directly or
    through an ancestor group, once the user's ownership is gone."""
    orphaned = []
    for group in groups:
        others = dbsession.scalar(
            select(func.count())
            .select_from(Membership)
            .join(Group, Group.id == Membership.group_id)
            .where(
                Group.path.in_(_ancestor_paths(group.path)),
                Membership.role == Role.OWNER,
                Membership.user_id != user.id,
            )
        )
        if not others:
            orphaned.append(group.path)
    return orphaned


def _refuse_last_owner(dbsession: Session, user: User, groups: Sequence[Group], what: str) -> None:
    orphaned = _left_without_owner(dbsession, user, groups)
    if orphaned:
        raise CommandError(
            f"{user.username} is the last owner of {', '.join(orphaned)}: {what} would leave "
            "no one to administer it; make another member owner first (`member add GROUP USER "
            "--role owner`), or remove the group"
        )


def _owned_groups(dbsession: Session, user: User) -> list[Group]:
    return list(
        dbsession.scalars(
            select(Group)
            .join(Membership, Membership.group_id == Group.id)
            .where(Membership.user_id == user.id, Membership.role == Role.OWNER)
            .order_by(Group.path)
        )
    )


def _change_role(
    dbsession: Session, membership: Membership, group: Group, user: User, role: Role
) -> None:
    previous = Role(membership.role)
    if previous == role:
        return
    if previous == Role.OWNER:
        _refuse_last_owner(dbsession, user, [group], f"making them {role.name.lower()}")
    membership.role = role
    record(
        dbsession,
        CLI_ACTOR,
        Action.MEMBER_ROLE,
        group_path=group.path,
        target=user.username,
        detail={"from": previous.name.lower(), "to": role.name.lower()},
    )


def _membership(dbsession: Session, group: Group, user: User) -> Membership:
    membership = dbsession.scalar(
        select(Membership).where(Membership.group_id == group.id, Membership.user_id == user.id)
    )
    if membership is None:
        raise CommandError(f"{user.username} is not a member of {group.path}")
    return membership


def user_deactivate(dbsession: Session, args: argparse.Namespace, settings) -> str:
    user = _user(dbsession, args.name)
    if not user.is_active:
        return f"{user.username} is already deactivated"
    user.is_active = False
    record(dbsession, CLI_ACTOR, Action.USER_DEACTIVATE, target=user.username)
    return f"deactivated {user.username}: they can no longer sign in or pull"


def user_remove(dbsession: Session, args: argparse.Namespace, settings) -> str:
    user = _user(dbsession, args.name)
    _refuse_last_owner(dbsession, user, _owned_groups(dbsession, user), "removing them")
    memberships = dbsession.execute(
        select(Group.path, Membership.role)
        .join(Membership, Membership.group_id == Group.id)
        .where(Membership.user_id == user.id)
        .order_by(Group.path)
    ).all()
    tokens = dbsession.scalar(
        select(func.count())
        .select_from(PersonalAccessToken)
        .where(PersonalAccessToken.user_id == user.id)
    )
    # Memberships and personal access tokens go with the user (ON DELETE CASCADE).
    dbsession.execute(delete(User).where(User.id == user.id))
    record(
        dbsession,
        CLI_ACTOR,
        Action.USER_REMOVE,
        target=user.username,
        detail={
            "memberships": {path: Role(role).name.lower() for path, role in memberships},
            "personal_access_tokens": tokens,
        },
    )
    return (
        f"removed {user.username} with {len(memberships)} membership(s) and "
        f"{tokens} personal access token(s)"
    )


def token_revoke(dbsession: Session, args: argparse.Namespace, settings) -> str:
    user = _user(dbsession, args.user)
    tokens = dbsession.scalars(
        select(PersonalAccessToken).where(
            PersonalAccessToken.user_id == user.id, PersonalAccessToken.name == args.name
        )
    ).all()
    if not tokens:
        raise CommandError(f"{user.username} has no personal access token named {args.name!r}")
    live = [token for token in tokens if not token.revoked]
    if not live:
        return f"the token {args.name!r} of {user.username} is already revoked"
    for token in live:
        token.revoked = True
    record(
        dbsession,
        CLI_ACTOR,
        Action.TOKEN_REVOKE,
        target=user.username,
        detail={"name": args.name, "count": len(live)},
    )
    return f"revoked {len(live)} token(s) named {args.name!r} of {user.username}"


def member_remove(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.group)
    user = _user(dbsession, args.user)
    membership = _membership(dbsession, group, user)
    role = Role(membership.role)
    if role == Role.OWNER:
        _refuse_last_owner(dbsession, user, [group], "removing them")
    dbsession.delete(membership)
    record(
        dbsession,
        CLI_ACTOR,
        Action.MEMBER_REMOVE,
        group_path=group.path,
        target=user.username,
        detail={"role": role.name.lower()},
    )
    return f"removed {user.username} ({role.name.lower()}) from {group.path}"


def member_role(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.group)
    user = _user(dbsession, args.user)
    _change_role(
        dbsession, _membership(dbsession, group, user), group, user, Role[args.role.upper()]
    )
    return f"{user.username} is {args.role} of {group.path}"


def deploy_token_revoke(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.group)
    tokens = dbsession.scalars(
        select(DeployToken).where(DeployToken.group_id == group.id, DeployToken.name == args.name)
    ).all()
    if not tokens:
        raise CommandError(f"{group.path} has no deploy token named {args.name!r}")
    live = [token for token in tokens if not token.revoked]
    if not live:
        return f"the deploy token {args.name!r} of {group.path} is already revoked"
    for token in live:
        token.revoked = True
    record(
        dbsession,
        CLI_ACTOR,
        Action.DEPLOY_TOKEN_REVOKE,
        group_path=group.path,
        target=args.name,
        detail={"usernames": [token.username for token in live]},
    )
    return f"revoked {len(live)} deploy token(s) named {args.name!r} of {group.path}"


def group_remove(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.path)
    removed = dbsession.scalars(
        select(Group)
        .where(or_(Group.id == group.id, Group.path.startswith(group.path + "/", autoescape=True)))
        .order_by(Group.path.desc())
    ).all()
    subgroups = [g.path for g in removed if g.id != group.id]
    if subgroups and not args.recursive:
        raise CommandError(
            f"{group.path} has {len(subgroups)} subgroup(s) ({', '.join(sorted(subgroups)[:3])}"
            f"{', ...' if len(subgroups) > 3 else ''}): remove them first, or pass --recursive"
        )
    manifests, blobs = (
        _cached_counts(dbsession, CachedManifest),
        _cached_counts(dbsession, CachedBlob),
    )
    for each in removed:
        record(
            dbsession,
            CLI_ACTOR,
            Action.GROUP_REMOVE,
            group_path=each.path,
            detail={
                "cached_manifests": manifests.get(each.id, 0),
                "cached_blobs": blobs.get(each.id, 0),
            },
        )
    # Members, deploy tokens, settings, credentials and cache rows go with each group (ON
    # DELETE CASCADE); the stored objects become orphans for `cleanup`.
    dbsession.execute(delete(Group).where(Group.id.in_([g.id for g in removed])))
    objects = sum(manifests.get(g.id, 0) + blobs.get(g.id, 0) for g in removed)
    return (
        f"removed {group.path}"
        + (f" and {len(subgroups)} subgroup(s)" if subgroups else "")
        + (
            f"; `depproxy-admin CONFIG_URI cleanup` deletes its {objects} cached object(s) "
            "from storage"
            if objects
            else ""
        )
    )


# The cache ----------------------------------------------------------------------------------


def purge(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.group)
    counts = group_admin.purge(dbsession, group, CLI_ACTOR)
    return (
        f"purged {group.path}: {counts.manifests} manifest(s) and {counts.blobs} blob(s) are no "
        "longer served; `depproxy-admin CONFIG_URI cleanup` deletes them from storage"
    )


def cleanup(registry: Registry, args: argparse.Namespace) -> str:
    storage = registry["depproxy.proxy"].storage
    run = Cleanup(
        registry["depproxy.dbsession_factory"],
        storage,
        CLI_ACTOR,
        progress=lambda line: print(line, flush=True),
    )
    counts = run.run()
    for error in counts.errors:
        print(f"depproxy-admin: error: {error}", file=sys.stderr)
    if counts.errors:
        raise CommandError(
            f"cleanup could not delete {len(counts.errors)} object(s); the next run retries them"
        )
    if not counts.anything_done:
        return ""
    return (
        f"cleanup done: {counts.destroyed_manifests} manifest(s) and {counts.destroyed_blobs} "
        f"blob(s) destroyed, {counts.deleted_objects + counts.orphaned_objects} object(s) and "
        f"{counts.spool_files} spool file(s) deleted"
    )


def _database(settings: Mapping[str, str]) -> tuple[object, ...] | None:
    """What names the add-on's database in `settings`: two spellings of one (a relative SQLite
    path, another password) give the same."""
    text = settings.get(database_prefix(settings) + "url")
    if not text:
        return None
    url = make_url(text)
    database = url.database
    if url.get_backend_name() == "sqlite" and database and database != ":memory:":
        database = os.path.realpath(database)
    return (url.get_backend_name(), url.host, url.port, database)


def _destination(config_uri: str, other_uri: str, settings: Mapping[str, str]) -> Storage:
    """The storage `other_uri` configures, refused unless it names this database: the objects
    are copied for this database's rows, whose keys hold its group ids."""
    try:
        other = get_appsettings(other_uri)
    except (OSError, LookupError, ValueError, configparser.Error) as error:
        raise CommandError(f"cannot read --to {other_uri}: {_first_line(error)}") from error
    if _database(other) is None:
        raise CommandError(f"--to {other_uri} names no database (sqlalchemy.url)")
    if _database(other) != _database(settings):
        raise CommandError(
            f"--to {other_uri} names another database than {config_uri}: both must name the one "
            "whose rows refer to the objects"
        )
    try:
        return storage_from_settings(other)
    except (ConfigurationError, OSError) as error:
        raise CommandError(f"--to {other_uri}: {_first_line(error)}") from error


def migrate_storage(registry: Registry, args: argparse.Namespace) -> str:
    source = registry["depproxy.proxy"].storage
    destination = _destination(args.config_uri, args.to, registry.settings)
    if destination.location == source.location:
        raise CommandError(
            f"{args.config_uri} and --to {args.to} configure the same storage "
            f"({source.location}): there is nothing to copy"
        )
    run = StorageMigration(
        registry["depproxy.dbsession_factory"],
        source,
        destination,
        verify_existing=args.verify_existing,
        progress=(lambda line: None) if args.quiet else lambda line: print(line, flush=True),
        failed=lambda line: print(f"depproxy-admin: error: {line}", file=sys.stderr, flush=True),
    )
    try:
        counts = run.run()
    except StorageFailed as error:
        done = run.counts.checked_objects
        raise CommandError(
            str(error) + (f"; stopped after {done} object(s), run again to go on" if done else "")
        ) from error
    summary = "migrate-storage done: " + counts.summary()
    if counts.failures:
        print(summary, flush=True)
        raise CommandError(
            f"{len(counts.failures)} object(s) missing or corrupt in the source were not copied "
            "(named above)"
        )
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depproxy-admin", description=__doc__)
    parser.add_argument("config_uri", help="the ini file, e.g. production.ini")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser(
        "initdb", help="create or upgrade the add-on's tables (its own migrations, to head)"
    )

    user = commands.add_parser("user").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="add a user; the password is read from standard input")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="make the user an instance admin")
    add.set_defaults(handler=user_add)
    _list_parser(user, "users", user_list)
    deactivate = user.add_parser(
        "deactivate", help="stop a user signing in or pulling; memberships and tokens stay"
    )
    deactivate.add_argument("name")
    deactivate.set_defaults(handler=user_deactivate)
    remove = user.add_parser(
        "remove",
        help="remove a user with their memberships and personal access tokens (refused while "
        "they are the last owner of a group)",
    )
    remove.add_argument("name")
    remove.set_defaults(handler=user_remove)

    token = commands.add_parser("token").add_subparsers(dest="action", required=True)
    add = token.add_parser("add", help="add a personal access token and print it once")
    add.add_argument("user")
    add.add_argument("--name", required=True)
    add.add_argument("--scope", action="append", required=True, metavar="SCOPE")
    add.add_argument("--expires-days", type=int)
    add.set_defaults(handler=token_add)
    _list_parser(token, "personal access tokens (never their secrets)", token_list).add_argument(
        "user", nargs="?"
    )
    revoke = token.add_parser("revoke", help="revoke a user's personal access tokens by name")
    revoke.add_argument("user")
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(handler=token_revoke)

    group = commands.add_parser("group").add_subparsers(dest="action", required=True)
    add = group.add_parser("add", help="add a group; its parents must exist")
    add.add_argument("path")
    add.add_argument("--public", action="store_true")
    add.set_defaults(handler=group_add)
    _list_parser(group, "groups, with how much of their cache is kept", group_list)
    remove = group.add_parser(
        "remove",
        help="remove a group with its members, deploy tokens, settings and cache (its stored "
        "objects are deleted by `cleanup`)",
    )
    remove.add_argument("path")
    remove.add_argument(
        "--recursive", action="store_true", help="remove its subgroups too (else refused)"
    )
    remove.set_defaults(handler=group_remove)

    member = commands.add_parser("member").add_subparsers(dest="action", required=True)
    add = member.add_parser("add", help="add a member to a group, or change its role")
    add.add_argument("group")
    add.add_argument("user")
    add.add_argument("--role", required=True, choices=[r.name.lower() for r in Role])
    add.set_defaults(handler=member_add)
    _list_parser(member, "a group's own members", member_list).add_argument("group")
    remove = member.add_parser(
        "remove", help="remove a member from a group (refused for its last owner)"
    )
    remove.add_argument("group")
    remove.add_argument("user")
    remove.set_defaults(handler=member_remove)
    role = member.add_parser("role", help="change a member's role (its last owner stays owner)")
    role.add_argument("group")
    role.add_argument("user")
    role.add_argument("role", choices=[r.name.lower() for r in Role])
    role.set_defaults(handler=member_role)

    deploy = commands.add_parser("deploy-token").add_subparsers(dest="action", required=True)
    add = deploy.add_parser("add", help="add a group deploy token and print it once")
    add.add_argument("group")
    add.add_argument("--name", required=True)
    add.add_argument("--scope", action="append", required=True, metavar="SCOPE")
    add.add_argument("--expires-days", type=int)
    add.set_defaults(handler=deploy_token_add)
    _list_parser(deploy, "a group's deploy tokens (never their secrets)", deploy_token_list)
    deploy.choices["list"].add_argument("group")
    revoke = deploy.add_parser("revoke", help="revoke a group's deploy tokens by name")
    revoke.add_argument("group")
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(handler=deploy_token_revoke)

    proxy = commands.add_parser("proxy").add_subparsers(dest="action", required=True)
    for state in ("enable", "disable"):
        switch = proxy.add_parser(state, help=f"{state} the dependency proxy of a group")
        switch.add_argument("group")
        switch.set_defaults(handler=proxy_set, state=state)
    credentials = proxy.add_parser(
        "credentials",
        help="set the group's credentials for one upstream registry (password from standard "
        "input); they are sent to that registry and its allowed token realms only",
    )
    credentials.add_argument("group")
    credentials.add_argument(
        "--registry",
        metavar="HOST",
        help="a configured upstream registry host (default: that of depproxy.upstream.url)",
    )
    credentials.add_argument("--username")
    credentials.add_argument("--clear", action="store_true")
    credentials.set_defaults(handler=proxy_credentials)

    rotate = commands.add_parser(
        "rotate-keys",
        help="re-encrypt every stored upstream credential under the newest key of "
        "depproxy.encryption.keys",
    )
    rotate.set_defaults(handler=rotate_keys)

    purging = commands.add_parser(
        "purge",
        help="stop serving a group's cached images at once (not its subgroups'); `cleanup` "
        "deletes them from storage",
    )
    purging.add_argument("group")
    purging.set_defaults(handler=purge)
    commands.add_parser(
        "cleanup",
        help="destroy purged and expired cache entries, orphaned objects older than "
        f"{_hours(ORPHAN_GRACE)} and spool leftovers older than {_hours(SPOOL_GRACE)}; silent "
        "when there is nothing to do, exit status 1 when an object could not be deleted",
    )

    migrate = commands.add_parser(
        "migrate-storage",
        help="copy every object the cache's rows refer to into the storage another ini file "
        "configures, verifying each against its digest; run again to resume or catch up, then "
        "point the app at that ini",
    )
    migrate.add_argument(
        "--to",
        required=True,
        metavar="OTHER_CONFIG_URI",
        help="the ini file (of the same database) whose depproxy.storage settings say where to",
    )
    migrate.add_argument(
        "--verify-existing",
        action="store_true",
        help="re-hash objects already at the destination instead of trusting their size",
    )
    migrate.add_argument("--quiet", action="store_true", help="print no progress lines")

    audit = commands.add_parser("audit", help="the audit log, newest first")
    audit.add_argument("--group", metavar="PATH", help="only this group's (and subgroups') events")
    audit.add_argument("--limit", type=int, default=AUDIT_LIMIT, metavar="N")
    audit.add_argument("--json", action="store_true", help="print JSON instead of a table")
    audit.set_defaults(handler=audit_list)
    return parser


def _hours(grace: timedelta) -> str:
    hours = grace / timedelta(hours=1)
    return f"{hours:g} hour" + ("" if hours == 1 else "s")


def _list_parser(
    actions: argparse._SubParsersAction, what: str, handler: Callable
) -> argparse.ArgumentParser:
    listing = actions.add_parser("list", help=f"list {what}")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=handler)
    return listing


def initdb(config_uri: str) -> str:
    """Run the add-on's own migrations on its database; a host ini's `[alembic]` plays no part."""
    settings = get_appsettings(config_uri)
    parsed = parse_settings(settings)
    engine = engine_from_settings(settings)
    try:
        upgrade(engine, default_registry=default_registry_host(parsed.upstream_url))
    finally:
        engine.dispose()
    return f"dependency proxy schema is up to date ({engine.url.render_as_string()})"


def run(argv: Sequence[str] | None = None) -> str:
    args = _parser().parse_args(argv)
    config_file = args.config_uri.partition("#")[0]
    if args.command == "initdb":
        setup_logging(config_file)
        return initdb(args.config_uri)
    with bootstrap(args.config_uri) as env:
        if args.command == "cleanup":
            return cleanup(env["registry"], args)
        if args.command == "migrate-storage":
            return migrate_storage(env["registry"], args)
        handler: Callable[[Session, argparse.Namespace, object], str] = args.handler
        request = env["request"]
        settings = env["registry"]["depproxy.settings"]
        with request.tm:
            output = handler(request.depproxy_dbsession, args, settings)
            request.depproxy_dbsession.flush()
        return output


def _first_line(error: object) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        output = run(argv)
        if output:
            print(output)
    except CommandError as error:
        print(f"depproxy-admin: error: {error}", file=sys.stderr)
        return 1
    except IntegrityError as error:
        print(
            f"depproxy-admin: error: conflicting data: {_first_line(error.orig)}", file=sys.stderr
        )
        return 1
    except SQLAlchemyError as error:
        print(
            f"depproxy-admin: error: database: {_first_line(getattr(error, 'orig', error))} "
            "(has `depproxy-admin CONFIG_URI initdb` been run?)",
            file=sys.stderr,
        )
        return 1
    except Exception as error:  # noqa: BLE001 - the operator gets one line, not a traceback
        print(
            f"depproxy-admin: error: {type(error).__name__}: {_first_line(error)}", file=sys.stderr
        )
        return 1
    return 0
