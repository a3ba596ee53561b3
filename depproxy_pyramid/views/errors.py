"""Every error, ours or Pyramid's, answered as registry JSON."""

from __future__ import annotations

import logging

from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPException
from pyramid.request import Request
from pyramid.response import Response

from ..errors import RegistryError
from ..permissions import Permission

log = logging.getLogger(__name__)

SERVICE = "dependency_proxy"


def registry_response(request: Request, error: RegistryError) -> Response:
    response = Response(status=error.status, json_body=error.body(), charset="utf-8")
    response.content_type = "application/json"
    response.headers.update(error.headers)
    return response


def external_url(request: Request) -> str:
    return request.registry["depproxy.settings"].external_url or request.application_url


def challenge(request: Request, scope: str | None = None, error: str | None = None) -> str:
    value = f'Bearer realm="{external_url(request)}/jwt/auth",service="{SERVICE}"'
    if scope:
        value += f',scope="{scope}"'
    if error:
        value += f',error="{error}"'
    return value


def unauthorized(request: Request, message: str, scope: str | None = None) -> RegistryError:
    return RegistryError(
        401,
        "UNAUTHORIZED",
        message,
        headers={"WWW-Authenticate": challenge(request, scope)},
    )


def registry_error_view(error: RegistryError, request: Request) -> Response:
    return registry_response(request, error)


def forbidden_view(request: Request) -> Response:
    context = request.context
    repository = getattr(context, "repository", None)
    scope = f"repository:{repository.name}:pull" if repository is not None else None
    if request.identity is None:
        if request.authorization is not None:
            error = unauthorized(request, "invalid or expired credentials", scope)
        else:
            error = unauthorized(request, "authentication required", scope)
        return registry_response(request, error)
    group = getattr(context, "group", None)
    if group is None or not request.has_permission(Permission.VIEW, group):
        name = repository.name if repository is not None else request.path
        error = RegistryError(
            404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name}
        )
    elif not group.proxy_enabled:
        error = RegistryError(
            403, "DENIED", f"the dependency proxy is disabled for group {group.path!r}"
        )
    elif repository is not None and not request.identity.may_pull_repository(repository.name):
        error = RegistryError(
            401,
            "UNAUTHORIZED",
            "the token does not grant pull on this repository",
            headers={"WWW-Authenticate": challenge(request, scope, "insufficient_scope")},
        )
    else:
        error = RegistryError(403, "DENIED", "requested access to the resource is denied")
    return registry_response(request, error)


def notfound_view(request: Request) -> Response:
    return registry_response(
        request, RegistryError(404, "NOT_FOUND", "no such endpoint", {"path": request.path[:300]})
    )


def http_exception_view(exc: HTTPException, request: Request) -> Response:
    return registry_response(
        request,
        RegistryError(exc.code or 500, exc.title.upper().replace(" ", "_"), exc.explanation),
    )


def unexpected_error_view(exc: Exception, request: Request) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path_qs[:500])
    return registry_response(
        request, RegistryError(500, "UNKNOWN", "internal error; the details are in the server log")
    )


def add_error_views(config: Configurator, path_info: str | None = None) -> None:
    """Registry JSON for Pyramid's and unexpected errors under `path_info` (None: everywhere)."""
    predicates = {"path_info": path_info} if path_info else {}
    config.add_forbidden_view(forbidden_view, **predicates)
    config.add_notfound_view(notfound_view, **predicates)
    config.add_exception_view(http_exception_view, HTTPException, **predicates)
    config.add_exception_view(unexpected_error_view, Exception, **predicates)
