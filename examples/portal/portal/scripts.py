"""`portal-admin CONFIG_URI <command>`: the portal's tables, users and registry teams.

The add-on's own tables, groups and deploy tokens stay with `depproxy-admin CONFIG_URI ...`,
which works against the same ini file.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from pyramid.paster import bootstrap, setup_logging
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from depproxy_pyramid.names import group_path_problem

from .models import PORTAL_ROLES, TEAM_ROLES, Base, PortalUser, RegistryTeam, hash_password


class CommandError(Exception):
    """A problem to report in one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portal-admin", description=__doc__)
    parser.add_argument("config_uri", help="the ini file, e.g. portal.ini")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("initdb", help="create the portal's tables")
    user = commands.add_parser("user").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="add a user; the password is one line of standard input")
    add.add_argument("name")
    add.add_argument("--role", choices=PORTAL_ROLES, default="member")
    team = commands.add_parser("team").add_subparsers(dest="action", required=True)
    add = team.add_parser("add", help="add a user to a registry group, or change the role")
    add.add_argument("user")
    add.add_argument("group_path")
    add.add_argument("role", help=", ".join(TEAM_ROLES))
    return parser


def user_add(dbsession: Session, name: str, role: str) -> str:
    # ':' would end the name early in the HTTP Basic credentials `docker login` sends.
    if not 0 < len(name) <= 255 or any(c.isspace() or c == ":" for c in name):
        raise CommandError("user names are 1-255 characters without spaces or ':'")
    if dbsession.scalar(select(PortalUser).where(PortalUser.username == name)) is not None:
        raise CommandError(f"a user named {name!r} already exists")
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {name}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("no password on standard input")
    dbsession.add(PortalUser(username=name, password_hash=hash_password(password), role=role))
    return f"created {role} {name}"


def team_add(dbsession: Session, username: str, group_path: str, role: str) -> str:
    if role not in TEAM_ROLES:
        raise CommandError(f"unknown role {role!r}; choose from {', '.join(TEAM_ROLES)}")
    problem = group_path_problem(group_path)
    if problem:
        raise CommandError(f"invalid group path {group_path!r}: {problem}")
    user = dbsession.scalar(select(PortalUser).where(PortalUser.username == username))
    if user is None:
        raise CommandError(f"no user named {username!r}")
    team = dbsession.get(RegistryTeam, (user.id, group_path))
    if team is None:
        dbsession.add(RegistryTeam(user_id=user.id, group_path=group_path, role=role))
    else:
        team.role = role
    return f"{username} is {role} of {group_path}"


def run(argv: Sequence[str] | None = None) -> str:
    args = _parser().parse_args(argv)
    setup_logging(args.config_uri)
    with bootstrap(args.config_uri) as env:
        if args.command == "initdb":
            # Enough for an example; a real portal runs its own Alembic migrations (see README).
            engine = env["registry"]["portal.dbengine"]
            Base.metadata.create_all(engine)
            return f"portal tables are ready ({engine.url.render_as_string()})"
        request = env["request"]
        with request.tm:
            if args.command == "user":
                return user_add(request.dbsession, args.name, args.role)
            return team_add(request.dbsession, args.user, args.group_path, args.role)


def _first_line(error: BaseException) -> str:
    return str(error).strip().partition("\n")[0]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        print(run(argv))
    except CommandError as error:
        print(f"portal-admin: error: {error}", file=sys.stderr)
        return 1
    except SQLAlchemyError as error:
        detail = _first_line(getattr(error, "orig", None) or error)
        print(f"portal-admin: error: database: {detail} (has initdb been run?)", file=sys.stderr)
        return 1
    except Exception as error:  # a missing or broken ini file: one line, not a traceback
        print(f"portal-admin: error: {type(error).__name__}: {_first_line(error)}", file=sys.stderr)
        return 1
    return 0
