"""`depproxy-admin CONFIG_URI <command>`: the operator's command line."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from pyramid.paster import bootstrap, get_appsettings, setup_logging
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, joinedload

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
    DeployToken,
    Group,
    Membership,
    PersonalAccessToken,
    ProxySettings,
    Role,
    Scope,
    User,
    Visibility,
    engine_from_settings,
)
from ..models.accounts import UpstreamCredential
from ..names import group_path_problem
from ..settings import Settings, parse_settings
from ..upstream.routing import default_registry_host, registry_hosts

MAX_PASSWORD = 1024


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
    return f"created user {args.name}" + (" (instance admin)" if args.admin else "")


def token_add(dbsession: Session, args: argparse.Namespace, settings) -> str:
    user = _user(dbsession, args.user)
    token = new_token(PERSONAL_TOKEN_PREFIX)
    dbsession.add(
        PersonalAccessToken(
            user_id=user.id,
            name=args.name,
            token_digest=token_digest(token),
            scopes=_scopes(args.scope, {s.value for s in Scope}),
            expires_at=_expiry(args.expires_days),
        )
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
    else:
        membership.role = role
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
    return f"username: {deploy_token.username}\ntoken: {token}"


def proxy_set(dbsession: Session, args: argparse.Namespace, settings) -> str:
    group = _group(dbsession, args.group)
    proxy = group.proxy_settings or ProxySettings(group=group)
    proxy.enabled = args.state == "enable"
    dbsession.add(proxy)
    return f"dependency proxy {'enabled' if proxy.enabled else 'disabled'} for {group.path}"


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
    stored = dbsession.get(UpstreamCredential, (group.id, registry))
    if args.clear:
        if args.username:
            raise CommandError("--clear takes no --username")
        if stored is None:
            return f"{group.path} has no upstream credentials for {registry}"
        dbsession.delete(stored)
        return f"upstream credentials for {registry} cleared for {group.path}"
    if not args.username:
        raise CommandError("--username is needed (or --clear)")
    if len(args.username) > 255:
        raise CommandError("upstream user names are at most 255 characters")
    password = _read_secret(f"Password of {args.username} at {registry}: ")
    encrypted = Keyring(settings.encryption_keys).encrypt(password)
    if stored is None:
        stored = UpstreamCredential(group=group, registry_host=registry)
        dbsession.add(stored)
    stored.username = args.username
    stored.password_encrypted = encrypted
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
    return f"re-encrypted {len(rows)} upstream credential(s) under the newest encryption key"


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

    token = commands.add_parser("token").add_subparsers(dest="action", required=True)
    add = token.add_parser("add", help="add a personal access token and print it once")
    add.add_argument("user")
    add.add_argument("--name", required=True)
    add.add_argument("--scope", action="append", required=True, metavar="SCOPE")
    add.add_argument("--expires-days", type=int)
    add.set_defaults(handler=token_add)

    group = commands.add_parser("group").add_subparsers(dest="action", required=True)
    add = group.add_parser("add", help="add a group; its parents must exist")
    add.add_argument("path")
    add.add_argument("--public", action="store_true")
    add.set_defaults(handler=group_add)

    member = commands.add_parser("member").add_subparsers(dest="action", required=True)
    add = member.add_parser("add", help="add a member to a group, or change its role")
    add.add_argument("group")
    add.add_argument("user")
    add.add_argument("--role", required=True, choices=[r.name.lower() for r in Role])
    add.set_defaults(handler=member_add)

    deploy = commands.add_parser("deploy-token").add_subparsers(dest="action", required=True)
    add = deploy.add_parser("add", help="add a group deploy token and print it once")
    add.add_argument("group")
    add.add_argument("--name", required=True)
    add.add_argument("--scope", action="append", required=True, metavar="SCOPE")
    add.add_argument("--expires-days", type=int)
    add.set_defaults(handler=deploy_token_add)

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
    return parser


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
    handler: Callable[[Session, argparse.Namespace, object], str] = args.handler
    with bootstrap(args.config_uri) as env:
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
        print(run(argv))
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
