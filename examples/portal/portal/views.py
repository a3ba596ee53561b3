"""The portal's pages: plain HTML, every value escaped."""

from __future__ import annotations

from html import escape

from pyramid.csrf import check_csrf_token, new_csrf_token
from pyramid.exceptions import BadCSRFToken
from pyramid.httpexceptions import HTTPSeeOther
from pyramid.request import Request
from pyramid.response import Response
from pyramid.security import forget, remember
from pyramid.view import (
    exception_view_config,
    forbidden_view_config,
    notfound_view_config,
    view_config,
)
from sqlalchemy import select

from .models import Note, PortalUser, RegistryTeam, authenticate_user


def page(request: Request, title: str, body: str, status: int = 200) -> Response:
    """A whole HTML page around `body`, which the caller has already escaped."""
    user = request.identity
    if user is None:
        who = f'<a href="{request.route_path("login")}">Sign in</a>'
    else:
        who = (
            f"Signed in as <b>{escape(user.username)}</b> ({escape(user.role)}) "
            f'<form method="post" action="{request.route_path("logout")}" style="display:inline">'
            f"{csrf_field(request)}<button>Sign out</button></form>"
        )
    html = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"</head><body><nav>{who}</nav><h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    return Response(html, status=status, content_type="text/html", charset="utf-8")


def csrf_field(request: Request) -> str:
    token = escape(request.session.get_csrf_token())
    return f'<input type="hidden" name="csrf_token" value="{token}">'


@view_config(route_name="home", request_method="GET")
def home(request: Request) -> Response:
    rows = request.dbsession.execute(
        select(Note.text, Note.created_at, PortalUser.username)
        .join(PortalUser, PortalUser.id == Note.author_id)
        .order_by(Note.id.desc())
    )
    notes = "".join(
        f"<li>{escape(text)} <small>({escape(author)}, {created:%Y-%m-%d %H:%M})</small></li>"
        for text, created, author in rows
    )
    body = f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "<p>No notes yet.</p>"
    if request.identity is not None:
        body += (
            f'<form method="post" action="{request.route_path("notes")}">{csrf_field(request)}'
            '<input name="text" required maxlength="1000"> <button>Add note</button></form>'
        )
    return page(request, "Portal", body)


def login_form(
    request: Request, username: str = "", error: str = "", status: int = 200
) -> Response:
    message = f'<p class="error">{escape(error)}</p>' if error else ""
    body = (
        f'{message}<form method="post" action="{request.route_path("login")}">'
        f"{csrf_field(request)}"
        f'<label>User name <input name="username" value="{escape(username)}"></label> '
        '<label>Password <input name="password" type="password"></label> '
        "<button>Sign in</button></form>"
    )
    return page(request, "Sign in", body, status=status)


@view_config(route_name="login", request_method="GET")
def login(request: Request) -> Response:
    return login_form(request)


@view_config(route_name="login", request_method="POST")
def login_post(request: Request) -> Response:
    check_csrf_token(request)
    username = request.POST.get("username", "")
    user = authenticate_user(request.dbsession, username, request.POST.get("password", ""))
    if user is None:
        return login_form(request, username, "wrong username or password", status=400)
    # A new token for the new session: one seen before signing in is no longer valid.
    new_csrf_token(request)
    return HTTPSeeOther(request.route_url("home"), headers=remember(request, user.id))


@view_config(route_name="logout", request_method="POST")
def logout(request: Request) -> Response:
    check_csrf_token(request)
    new_csrf_token(request)
    return HTTPSeeOther(request.route_url("home"), headers=forget(request))


@view_config(route_name="notes", request_method="POST", permission="portal:write")
def add_note(request: Request) -> Response:
    check_csrf_token(request)
    text = request.POST.get("text", "").strip()
    if text:
        request.dbsession.add(Note(author_id=request.identity.id, text=text[:1000]))
    return HTTPSeeOther(request.route_url("home"))


@view_config(route_name="admin", request_method="GET", permission="portal:admin")
def admin(request: Request) -> Response:
    users = request.dbsession.scalars(select(PortalUser).order_by(PortalUser.username))
    teams = request.dbsession.scalars(select(RegistryTeam))
    paths: dict[int, list[str]] = {}
    for team in teams:
        paths.setdefault(team.user_id, []).append(f"{team.group_path} ({team.role})")
    rows = "".join(
        f"<tr><td>{escape(user.username)}</td><td>{escape(user.role)}</td>"
        f"<td>{escape(', '.join(paths.get(user.id, [])))}</td></tr>"
        for user in users
    )
    body = f"<table><tr><th>User</th><th>Portal role</th><th>Registry teams</th></tr>{rows}</table>"
    return page(request, "Users", body)


# Registered for every path: on the add-on's own paths its JSON error views have a path
# predicate and win, so registry clients never get these pages.
@forbidden_view_config()
def forbidden(request: Request) -> Response:
    """Anonymous visitors are sent to sign in; a signed-in user gets a 403 page."""
    if request.identity is None:
        return HTTPSeeOther(request.route_url("login"))
    return page(request, "portal 403", "<p>You may not see this page.</p>", status=403)


@notfound_view_config()
def notfound(request: Request) -> Response:
    return page(request, "portal 404", "<p>There is no such page.</p>", status=404)


@exception_view_config(BadCSRFToken)
def bad_csrf_token(request: Request) -> Response:
    body = "<p>The form has expired or came from another site. Reload it and try again.</p>"
    return page(request, "portal 400", body, status=400)
