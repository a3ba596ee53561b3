"""The pages' views. Every change is a plain form post with a CSRF token, judged by the
server: what a page does not show a caller, the caller cannot post either."""

from __future__ import annotations

import logging
from datetime import datetime
from urllib.parse import urlsplit

from pyramid.authorization import DENY_ALL
from pyramid.config import Configurator
from pyramid.csrf import get_csrf_token, new_csrf_token
from pyramid.exceptions import BadCSRFOrigin, BadCSRFToken
from pyramid.httpexceptions import HTTPException, HTTPForbidden, HTTPNotFound, HTTPSeeOther
from pyramid.renderers import render_to_response
from pyramid.request import Request
from pyramid.response import Response
from pyramid.security import NO_PERMISSION_REQUIRED
from pyramid.view import view_config

from ..accounts import IAccountSource, valid_memberships
from ..credentials import Keyring
from ..models import Group
from ..permissions import Permission
from ..resources import GroupResource, Root
from ..services import group_admin
from ..services.overview import instance_overview
from ..throttle import SignInRefused
from ..upstream.routing import default_registry_host
from .routes import RENDERER, ROUTES
from .security import (
    forget_account,
    offers_own_sign_in,
    remember_account,
    safe_next_path,
    sign_in_with_password,
)

log = logging.getLogger(__name__)

PAGE_SIZE = 20
MAX_PAGE = 10_000
FLASH_QUEUE = "depproxy"


class HTTPBadRequestPage(HTTPException):
    """A form that makes no sense (a registry not configured, say), answered with its reason."""

    code = 400
    title = "Bad request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MissingGroup:
    """No group at this path: nothing is allowed, so the answer is that of a private group."""

    __acl__ = [DENY_ALL]

    def __init__(self, root: Root) -> None:
        self.__parent__ = root
        self.__name__ = ""


def group_factory(request: Request) -> GroupResource | MissingGroup:
    root = Root(request)
    try:
        # Fresh: a page shows a group's settings as they are, not as another request saw them.
        return root.find(request.matchdict["group"], fresh=True)
    except KeyError:
        return MissingGroup(root)


def template(name: str) -> str:
    return f"templates/{name}{RENDERER}"


def page(request: Request, name: str, values: dict, status: int = 200) -> Response:
    identity = request.identity
    response = render_to_response(
        template(name),
        {
            "identity": identity,
            "own_sign_in": offers_own_sign_in(request),
            "csrf_token": get_csrf_token(request),
            "messages": request.session.pop_flash(FLASH_QUEUE),
            "is_admin": identity is not None and identity.account.is_admin,
            "size": human_size,
            "when": human_time,
            **values,
        },
        request=request,
    )
    response.status_int = status
    # Pages show what their viewer may see: no shared cache keeps one person's for another.
    response.cache_control = "no-store"
    # Never inside another site's frame, where a click could be borrowed for a purge.
    response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def human_time(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment is not None else "never"


def flash(request: Request, message: str, kind: str = "info") -> None:
    request.session.flash({"kind": kind, "text": message}, queue=FLASH_QUEUE)


def actor(request: Request) -> str:
    return f"user:{request.identity.name}"


def registry_host(request: Request) -> str:
    external = request.registry["depproxy.settings"].external_url
    return urlsplit(external).netloc if external else request.host


def configured_registries(request: Request) -> list[str]:
    settings = request.registry["depproxy.settings"]
    return [default_registry_host(settings.upstream_url), *settings.upstream_registries]


def group_row(request: Request) -> Group:
    group = request.depproxy_dbsession.get(Group, request.context.group.id)
    if group is None:
        raise HTTPNotFound()
    return group


def back_to_group(request: Request) -> HTTPSeeOther:
    return HTTPSeeOther(
        request.route_path("depproxy.pages.group", group=request.context.group.path)
    )


def sign_in_location(request: Request, next_path: str | None) -> str:
    query = {"next": next_path} if next_path else {}
    return request.route_path("depproxy.pages.sign_in", _query=query)


# Sign-in and sign-out: only where the host brings no sign-in of its own.


@view_config(
    route_name="depproxy.pages.sign_in",
    request_method="GET",
    permission=NO_PERMISSION_REQUIRED,
)
def sign_in_form(request: Request) -> Response:
    if not offers_own_sign_in(request):
        raise HTTPNotFound()
    identity = request.identity
    groups = []
    if identity is not None:
        source = request.registry.getUtility(IAccountSource)
        groups = sorted(valid_memberships(source.memberships(request, identity.account)))
    return page(
        request,
        "sign_in",
        {
            "title": "Sign in" if identity is None else "Dependency Proxy",
            "next": safe_next_path(request.GET.get("next")) or "",
            "username": "",
            "error": None,
            "groups": groups,
        },
    )


@view_config(
    route_name="depproxy.pages.sign_in",
    request_method="POST",
    permission=NO_PERMISSION_REQUIRED,
    require_csrf=True,
)
def sign_in(request: Request) -> Response:
    if not offers_own_sign_in(request):
        raise HTTPNotFound()
    username = request.POST.get("username", "")[:255]
    password = request.POST.get("password", "")
    next_path = safe_next_path(request.POST.get("next"))
    values = {"title": "Sign in", "next": next_path or "", "username": username, "groups": []}
    if not username or not password:
        return page(request, "sign_in", {**values, "error": "Enter a user name and password."}, 400)
    try:
        account = sign_in_with_password(request, username, password)
    except SignInRefused as refusal:
        response = page(request, "sign_in", {**values, "error": refusal.message}, 429)
        response.headers["Retry-After"] = str(refusal.retry_after)
        return response
    if account is None:
        return page(request, "sign_in", {**values, "error": "Wrong user name or password."}, 400)
    remember_account(request, account)
    # A new token for the signed-in session: one seen before signing in is no longer valid.
    new_csrf_token(request)
    return HTTPSeeOther(next_path or request.route_path("depproxy.pages.sign_in"))


@view_config(
    route_name="depproxy.pages.sign_out",
    request_method="POST",
    permission=NO_PERMISSION_REQUIRED,
    require_csrf=True,
)
def sign_out(request: Request) -> Response:
    if not offers_own_sign_in(request):
        raise HTTPNotFound()
    forget_account(request)
    new_csrf_token(request)
    return HTTPSeeOther(request.route_path("depproxy.pages.sign_in"))


# A group's Dependency Proxy.


@view_config(route_name="depproxy.pages.group", request_method="GET", permission=Permission.VIEW)
def group_page(request: Request) -> Response:
    group = group_row(request)
    session = request.depproxy_dbsession
    try:
        page_number = min(max(int(request.GET.get("page", "1")), 1), MAX_PAGE)
    except ValueError:
        page_number = 1
    images, total = group_admin.cached_images(
        session, group.id, offset=(page_number - 1) * PAGE_SIZE, limit=PAGE_SIZE
    )
    prefix = f"{registry_host(request)}/{group.path}/dependency_proxy/containers"
    can_administer = bool(request.has_permission(Permission.ADMINISTER))
    return page(
        request,
        "group",
        {
            "title": f"{group.path}: Dependency Proxy",
            "group": group,
            "config": group_admin.proxy_config(session, group),
            "summary": group_admin.cache_summary(session, group.id),
            "images": images,
            "total_images": total,
            "page_number": page_number,
            "pages": max(1, -(-total // PAGE_SIZE)),
            "registry_host": registry_host(request),
            "prefix": prefix,
            "registries": configured_registries(request),
            "can_administer": can_administer,
            # The group's own audit log: its owners' business, as its controls are.
            "changes": group_admin.recent_changes(session, group.path) if can_administer else [],
            "ttl_min": group_admin.TTL_DAYS_MIN,
            "ttl_max": group_admin.TTL_DAYS_MAX,
        },
    )


@view_config(
    route_name="depproxy.pages.group_settings",
    request_method="POST",
    permission=Permission.ADMINISTER,
    require_csrf=True,
)
def change_enabled(request: Request) -> Response:
    enabled = request.POST.get("enabled")
    if enabled not in ("true", "false"):
        raise HTTPBadRequestPage("The form did not say whether to enable the proxy.")
    group_admin.change_proxy(
        request.depproxy_dbsession, group_row(request), actor(request), enabled=enabled == "true"
    )
    flash(request, "Dependency Proxy enabled." if enabled == "true" else "Dependency Proxy off.")
    return back_to_group(request)


@view_config(
    route_name="depproxy.pages.group_ttl",
    request_method="POST",
    permission=Permission.ADMINISTER,
    require_csrf=True,
)
def change_ttl(request: Request) -> Response:
    try:
        days = int(request.POST.get("ttl_days", ""))
        group_admin.change_proxy(
            request.depproxy_dbsession,
            group_row(request),
            actor(request),
            ttl_enabled=request.POST.get("ttl_enabled") == "on",
            ttl_days=days,
        )
    except ValueError as error:
        # InvalidChange explains itself; a number that is not one gets the same rule.
        message = (
            str(error)
            if isinstance(error, group_admin.InvalidChange)
            else f"The TTL is {group_admin.TTL_DAYS_MIN} to {group_admin.TTL_DAYS_MAX} days."
        )
        flash(request, message, "error")
        return back_to_group(request)
    flash(request, "Cleanup policy saved.")
    return back_to_group(request)


@view_config(
    route_name="depproxy.pages.group_credentials",
    request_method="POST",
    permission=Permission.ADMINISTER,
    require_csrf=True,
)
def change_credentials(request: Request) -> Response:
    registry = request.POST.get("registry", "")
    if registry not in configured_registries(request):
        raise HTTPBadRequestPage("That registry is not one this instance pulls from.")
    group = group_row(request)
    session = request.depproxy_dbsession
    if request.POST.get("action") == "clear":
        group_admin.clear_upstream_credentials(session, group, actor(request), registry)
        flash(request, f"Credentials for {registry} removed.")
        return back_to_group(request)
    settings = request.registry["depproxy.settings"]
    try:
        group_admin.set_upstream_credentials(
            session,
            group,
            actor(request),
            registry,
            request.POST.get("username", "").strip(),
            request.POST.get("password", ""),
            Keyring(settings.encryption_keys),
        )
    except group_admin.InvalidChange as error:
        flash(request, str(error), "error")
        return back_to_group(request)
    flash(request, f"Credentials for {registry} saved.")
    return back_to_group(request)


@view_config(
    route_name="depproxy.pages.group_purge",
    request_method="GET",
    permission=Permission.ADMINISTER,
)
def purge_confirmation(request: Request) -> Response:
    group = group_row(request)
    return page(
        request,
        "purge",
        {
            "title": f"{group.path}: purge the cache?",
            "group": group,
            "summary": group_admin.cache_summary(request.depproxy_dbsession, group.id),
        },
    )


@view_config(
    route_name="depproxy.pages.group_purge",
    request_method="POST",
    permission=Permission.ADMINISTER,
    require_csrf=True,
)
def purge(request: Request) -> Response:
    group = group_row(request)
    counts = group_admin.purge(request.depproxy_dbsession, group, actor(request))
    proxy = request.registry["depproxy.proxy"]
    group_id = group.id

    def forget_after_commit(committed: bool) -> None:
        if committed:
            proxy.forget_group(group_id)

    request.tm.get().addAfterCommitHook(forget_after_commit)
    flash(request, f"Purged {counts.manifests} manifests and {counts.blobs} blobs.")
    return back_to_group(request)


# The instance admin overview.


@view_config(
    route_name="depproxy.pages.admin", request_method="GET", permission=Permission.ADMINISTER
)
def admin_overview(request: Request) -> Response:
    return page(
        request,
        "admin",
        {
            "title": "Dependency Proxy: instance overview",
            "overview": instance_overview(request.depproxy_dbsession),
        },
    )


# Errors on the pages' routes: HTML, whatever the host's or the registry's error views are.


def error_page(request: Request, status: int, title: str, message: str) -> Response:
    return page(request, "error", {"title": title, "message": message}, status)


def not_found(request: Request) -> Response:
    return error_page(request, 404, "Not found", "There is no such page, or you may not see it.")


def forbidden(exc: HTTPForbidden, request: Request) -> Response:
    if request.identity is None and offers_own_sign_in(request):
        next_path = request.path_qs if request.method == "GET" else None
        return HTTPSeeOther(sign_in_location(request, next_path))
    context = request.context
    if isinstance(context, GroupResource) and request.has_permission(Permission.VIEW, context):
        return error_page(
            request, 403, "Forbidden", "Only the group's owners and instance admins may do this."
        )
    # A private group is as missing to whoever may not see it.
    return not_found(request)


def bad_csrf(exc: Exception, request: Request) -> Response:
    return error_page(
        request,
        400,
        "The form has expired",
        "The form was sent without its security token, or from another site. "
        "Go back, reload the page and try again.",
    )


def http_error(exc: HTTPException, request: Request) -> Response:
    if exc.code == 404:
        return not_found(request)
    message = getattr(exc, "message", None) or exc.explanation or exc.title
    return error_page(request, exc.code or 500, exc.title, message)


def unexpected_error(exc: Exception, request: Request) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path_qs[:500])
    return error_page(request, 500, "Internal error", "The details are in the server log.")


def add_page_error_views(config: Configurator) -> None:
    for route_name in ROUTES:
        config.add_exception_view(forbidden, HTTPForbidden, route_name=route_name)
        config.add_exception_view(bad_csrf, BadCSRFToken, route_name=route_name)
        config.add_exception_view(bad_csrf, BadCSRFOrigin, route_name=route_name)
        config.add_exception_view(http_error, HTTPException, route_name=route_name)
        config.add_exception_view(unexpected_error, Exception, route_name=route_name)
