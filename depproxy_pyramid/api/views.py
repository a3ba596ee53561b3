"""The group's Dependency Proxy over `/api/v4/groups/:id/dependency_proxy/...`.

Reads need VIEW of the group (its members, any signed-in user on a public group); changes and
the purge need ADMINISTER (owners of the group or a parent group, instance admins). The
security policy also requires a personal access token with the `api` scope on every call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pyramid.authorization import DENY_ALL
from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.response import Response
from pyramid.security import NO_PERMISSION_REQUIRED
from pyramid.view import view_config
from sqlalchemy import select

from ..credentials import Keyring
from ..models import Group
from ..permissions import Permission
from ..resources import GroupResource, IGroupDirectory, Root
from ..security import caller
from ..services import group_admin
from ..services.group_admin import InvalidChange, ProxyConfig
from ..upstream.routing import registry_hosts
from .errors import ApiError, bad_request, group_not_found, method_not_allowed
from .pagination import GROUPS_PATH, add_page_headers, requested_page

# The same grammar as `auth.API_PATHS`, which decides that the API's policy judges a path:
# no route of the API may match a path outside it.
API_ROOT = GROUPS_PATH + "{id:[^/]+(?:/[^/]+)*}/dependency_proxy"
# Route name -> (path below API_ROOT, the methods it answers).
ROUTES = {
    "depproxy.api.cache": ("/cache", ("GET", "HEAD", "DELETE")),
    "depproxy.api.settings": ("/settings", ("GET", "HEAD", "PUT")),
    "depproxy.api.ttl_policy": ("/image_ttl_policy", ("GET", "HEAD", "PUT")),
    "depproxy.api.manifests": ("/manifests", ("GET", "HEAD")),
    "depproxy.api.blobs": ("/blobs", ("GET", "HEAD")),
    "depproxy.api.credentials": ("/upstream_credentials", ("GET", "HEAD")),
    "depproxy.api.credential": ("/upstream_credentials/{registry}", ("PUT", "DELETE")),
}
MAX_BODY = 64 * 1024
_GROUP_ID_RE = re.compile(r"^[0-9]+$")
# Group ids are 32-bit integers (PostgreSQL refuses a larger number in the query): a larger
# number names no group.
MAX_GROUP_ID = 2**31 - 1


class MissingGroup:
    """A group that does not exist: nothing is allowed on it, and a caller who may use the
    API is told 404, as for a group it may not see."""

    __name__ = ""
    __parent__ = None
    __acl__ = [DENY_ALL]


def group_factory(request: Request) -> GroupResource | MissingGroup:
    """The group `:id` names: a number is its id (as on GitLab), anything else its path."""
    ref = request.matchdict["id"]
    path: str | None = ref
    if _GROUP_ID_RE.match(ref):
        if len(ref) > len(str(MAX_GROUP_ID)) or int(ref) > MAX_GROUP_ID:
            return MissingGroup()
        path = request.depproxy_dbsession.scalar(select(Group.path).where(Group.id == int(ref)))
    if path is None:
        return MissingGroup()
    try:
        # Fresh: a change is judged by the group's members and visibility as they are now.
        return Root(request).find(path, fresh=True)
    except KeyError:
        return MissingGroup()


def _group(request: Request, context: GroupResource) -> Group:
    group = request.depproxy_dbsession.get(Group, context.group.id)
    if group is None:
        raise group_not_found()
    return group


def _actor(request: Request) -> str:
    identity = caller(request)
    assert identity is not None and identity.account is not None
    return f"user:{identity.account.name}"


def _timestamp(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _json_object(request: Request, fields: dict[str, type]) -> dict[str, Any]:
    """The request's JSON object, holding only `fields`, each of its type, and at least one."""
    raw = request.body_file.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise bad_request(f"the body is larger than {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        raise bad_request("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the body is not a JSON object")
    for name, value in body.items():
        expected = fields.get(name)
        if expected is None:
            raise bad_request(f"unknown field {name[:50]!r}", {"field": name[:50]})
        # `type(...) is`: JSON's true is no number of days, nor 1 a boolean.
        if type(value) is not expected:
            kind = {bool: "a boolean", int: "a whole number", str: "a string"}[expected]
            raise bad_request(f"{name} must be {kind}", {"field": name})
    if not body:
        raise bad_request(f"give at least one of {', '.join(fields)}")
    return body


def _change(request: Request, context: GroupResource, **change: Any) -> ProxyConfig:
    try:
        return group_admin.change_proxy(
            request.depproxy_dbsession, _group(request, context), _actor(request), **change
        )
    except InvalidChange as error:
        raise bad_request(str(error)) from None


def _settings(config: ProxyConfig) -> dict[str, Any]:
    return {"enabled": config.enabled}


def _ttl_policy(config: ProxyConfig) -> dict[str, Any]:
    return {"enabled": config.ttl_enabled, "ttl": config.ttl_days}


@view_config(
    route_name="depproxy.api.settings",
    request_method="GET",
    permission=Permission.VIEW,
    renderer="json",
)
def get_settings(context: GroupResource, request: Request) -> dict:
    return _settings(group_admin.proxy_config(request.depproxy_dbsession, _group(request, context)))


@view_config(
    route_name="depproxy.api.settings",
    request_method="PUT",
    permission=Permission.ADMINISTER,
    renderer="json",
)
def put_settings(context: GroupResource, request: Request) -> dict:
    body = _json_object(request, {"enabled": bool})
    config = _change(request, context, enabled=body["enabled"])
    directory = request.registry.getUtility(IGroupDirectory)
    path = context.path

    def forget(committed: bool) -> None:
        # Pulls in this process see the change at once, not after lookup_cache_seconds.
        if committed:
            directory.forget(path)

    request.tm.get().addAfterCommitHook(forget)
    return _settings(config)


@view_config(
    route_name="depproxy.api.ttl_policy",
    request_method="GET",
    permission=Permission.VIEW,
    renderer="json",
)
def get_ttl_policy(context: GroupResource, request: Request) -> dict:
    config = group_admin.proxy_config(request.depproxy_dbsession, _group(request, context))
    return _ttl_policy(config)


@view_config(
    route_name="depproxy.api.ttl_policy",
    request_method="PUT",
    permission=Permission.ADMINISTER,
    renderer="json",
)
def put_ttl_policy(context: GroupResource, request: Request) -> dict:
    body = _json_object(request, {"enabled": bool, "ttl": int})
    config = _change(request, context, ttl_enabled=body.get("enabled"), ttl_days=body.get("ttl"))
    return _ttl_policy(config)


@view_config(
    route_name="depproxy.api.cache",
    request_method="GET",
    permission=Permission.VIEW,
    renderer="json",
)
def cache_summary(context: GroupResource, request: Request) -> dict:
    summary = group_admin.cache_summary(request.depproxy_dbsession, context.group.id)
    return {
        "image_count": summary.manifests,
        "images_size": summary.manifest_bytes,
        "blob_count": summary.blobs,
        "blobs_size": summary.blob_bytes,
        "total_size": summary.total_bytes,
        "last_read_at": _timestamp(summary.last_read),
    }


@view_config(
    route_name="depproxy.api.cache",
    request_method="DELETE",
    permission=Permission.ADMINISTER,
    renderer="json",
)
def purge_cache(context: GroupResource, request: Request) -> dict:
    """GitLab's `DELETE /groups/:id/dependency_proxy/cache`: the cache stops serving at once,
    its objects are destroyed later (`depproxy-admin cleanup`)."""
    group = _group(request, context)
    counts = group_admin.purge(request.depproxy_dbsession, group, _actor(request))
    proxy = request.registry["depproxy.proxy"]
    group_id = group.id

    def forget(committed: bool) -> None:
        # Only once the purge is committed: a rolled-back one must leave the cache serving.
        if committed:
            proxy.forget_group(group_id)

    request.tm.get().addAfterCommitHook(forget)
    request.response.status = 202
    return {"message": "202 Accepted", "manifests": counts.manifests, "blobs": counts.blobs}


@view_config(
    route_name="depproxy.api.manifests",
    request_method="GET",
    permission=Permission.VIEW,
    renderer="json",
)
def list_manifests(context: GroupResource, request: Request) -> list:
    page = requested_page(request)
    images, total = group_admin.cached_images(
        request.depproxy_dbsession, context.group.id, offset=page.offset, limit=page.per_page
    )
    add_page_headers(request, request.response, page, total)
    return [
        {
            "image_name": image.image,
            "tag": image.tag,
            "digest": image.digest,
            "media_type": image.media_type,
            "size": image.size,
            "image_size": image.image_size,
            "read_at": _timestamp(image.read_at),
        }
        for image in images
    ]


@view_config(
    route_name="depproxy.api.blobs",
    request_method="GET",
    permission=Permission.VIEW,
    renderer="json",
)
def list_blobs(context: GroupResource, request: Request) -> list:
    page = requested_page(request)
    blobs, total = group_admin.cached_blobs(
        request.depproxy_dbsession, context.group.id, offset=page.offset, limit=page.per_page
    )
    add_page_headers(request, request.response, page, total)
    return [
        {
            "digest": blob.digest,
            "media_type": blob.content_type,
            "size": blob.size,
            "created_at": _timestamp(blob.created_at),
            "read_at": _timestamp(blob.read_at),
        }
        for blob in blobs
    ]


@view_config(
    route_name="depproxy.api.credentials",
    request_method="GET",
    permission=Permission.ADMINISTER,
    renderer="json",
)
def list_credentials(context: GroupResource, request: Request) -> list:
    """The registries the group has credentials for; the credentials are write-only."""
    config = group_admin.proxy_config(request.depproxy_dbsession, _group(request, context))
    return [{"registry": registry} for registry in config.credential_registries]


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _registry_hosts(request: Request) -> dict[str, str]:
    settings = request.registry["depproxy.settings"]
    return registry_hosts(
        settings.upstream_url, settings.upstream_registries, settings.upstream_docker_hub_mirrors
    )


@view_config(
    route_name="depproxy.api.credential",
    request_method="PUT",
    permission=Permission.ADMINISTER,
    renderer="json",
)
def put_credentials(context: GroupResource, request: Request) -> dict:
    registry = _registry_hosts(request).get(request.matchdict["registry"].lower())
    if registry is None:
        raise bad_request(
            "not a configured upstream registry (depproxy.upstream.url or "
            "depproxy.upstream.registries)",
            {"registry": request.matchdict["registry"][:255]},
        )
    body = _json_object(request, {"username": str, "password": str})
    if body.keys() != {"username", "password"}:
        raise bad_request("give both username and password")
    # Checked here, not left to the database and the cipher: a NUL or a lone surrogate
    # would fail there, after the view, as a bare 500.
    if not body["username"].isprintable():
        raise bad_request("the username holds control characters", {"field": "username"})
    if not _encodes(body["password"]):
        raise bad_request("the password is not valid Unicode", {"field": "password"})
    settings = request.registry["depproxy.settings"]
    try:
        group_admin.set_upstream_credentials(
            request.depproxy_dbsession,
            _group(request, context),
            _actor(request),
            registry,
            body["username"],
            body["password"],
            Keyring(settings.encryption_keys),
        )
    except InvalidChange as error:
        raise bad_request(str(error)) from None
    return {"registry": registry, "username": body["username"]}


@view_config(
    route_name="depproxy.api.credential",
    request_method="DELETE",
    permission=Permission.ADMINISTER,
)
def delete_credentials(context: GroupResource, request: Request) -> Response:
    name = request.matchdict["registry"].lower()
    # A registry no longer configured may still have credentials to clear.
    registry = _registry_hosts(request).get(name, name)
    group = _group(request, context)
    # A name no row can hold (PostgreSQL refuses a NUL in a query) has nothing to clear.
    if not (registry.isprintable() and len(registry) <= 255) or not (
        group_admin.clear_upstream_credentials(
            request.depproxy_dbsession, group, _actor(request), registry
        )
    ):
        raise ApiError(
            404,
            "NAME_UNKNOWN",
            f"the group has no upstream credentials for {registry[:255]}",
            summary="404 Upstream Credentials Not Found",
        )
    return Response(status=204)


def _method_not_allowed_view(allowed: tuple[str, ...]) -> Callable[[Request], Response]:
    def method_not_allowed_view(request: Request) -> Response:
        raise method_not_allowed(allowed, request.method)

    return method_not_allowed_view


def add_routes(config: Configurator) -> None:
    for name, (path, methods) in ROUTES.items():
        config.add_route(name, API_ROOT + path, factory=group_factory)
        # Without a predicate it comes after the route's views: every other method.
        config.add_view(
            _method_not_allowed_view(methods), route_name=name, permission=NO_PERMISSION_REQUIRED
        )
