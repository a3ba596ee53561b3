"""The JSON API's errors: GitLab's `message` and the registry's `errors` list in one body.

`{"message": "404 Group Not Found", "errors": [{"code": "NAME_UNKNOWN", "message": ...,
"detail": ...}]}`. GitLab's clients read `message`; the codes are the registry's own, so one
vocabulary covers both of the add-on's APIs. These views answer on the API's paths whatever
error views a host portal has, so the API never answers with a host's HTML page.
"""

from __future__ import annotations

import logging
from typing import Any

from pyramid.config import Configurator
from pyramid.exceptions import URLDecodeError
from pyramid.httpexceptions import HTTPException
from pyramid.request import Request
from pyramid.response import Response
from webob.util import status_reasons

from ..errors import RegistryError, code_for_status
from ..models import Scope
from ..permissions import Permission
from ..resources import GroupResource
from ..security import caller, sign_in_refusal
from .auth import API_PATHS

log = logging.getLogger(__name__)

REALM = 'Bearer realm="dependency_proxy_api"'


class ApiError(RegistryError):
    """An error of the JSON API: a registry error with GitLab's `message` ("404 Group Not
    Found") beside the `errors` list."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        *,
        summary: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, code, message, detail, headers)
        self.summary = summary or f"{status} {status_reasons.get(status, 'Error')}"

    def body(self) -> dict[str, Any]:
        return {"message": self.summary, **super().body()}


def bad_request(message: str, detail: Any = None) -> ApiError:
    return ApiError(400, "UNSUPPORTED", message, detail, summary=f"400 Bad request - {message}")


def group_not_found() -> ApiError:
    # The same for a group that does not exist and one the caller may not see.
    return ApiError(404, "NAME_UNKNOWN", "group not found", summary="404 Group Not Found")


def method_not_allowed(allowed: tuple[str, ...], method: str) -> ApiError:
    return ApiError(
        405,
        "UNSUPPORTED",
        f"{method[:20]} is not allowed here",
        headers={"Allow": ", ".join(allowed)},
    )


def api_response(error: ApiError) -> Response:
    response = Response(status=error.status, json_body=error.body(), charset="utf-8")
    response.content_type = "application/json"
    response.headers.update(error.headers)
    return response


def api_error_view(error: ApiError, request: Request) -> Response:
    return api_response(error)


def _refusal(request: Request) -> ApiError:
    """Why the policy refused: no or a bad token (401), a token without the api scope or a
    role that may not (403), or a group the caller may not see or that does not exist (404)."""
    refusal = sign_in_refusal(request)
    if refusal is not None:
        return ApiError(
            429,
            "TOOMANYREQUESTS",
            refusal.message,
            {"retry_after": refusal.retry_after},
            headers={"Retry-After": str(refusal.retry_after)},
        )
    identity = caller(request)
    if identity is None:
        presented = "PRIVATE-TOKEN" in request.headers or "Authorization" in request.headers
        return ApiError(
            401,
            "UNAUTHORIZED",
            "invalid, expired or revoked token"
            if presented
            else "a personal access token is needed: PRIVATE-TOKEN or Authorization: Bearer",
            headers={"WWW-Authenticate": REALM + (',error="invalid_token"' if presented else "")},
        )
    if Scope.API.value not in identity.scopes:
        return ApiError(
            403,
            "DENIED",
            "the token lacks the api scope",
            {"scope": Scope.API.value},
            headers={"WWW-Authenticate": f'{REALM},error="insufficient_scope",scope="api"'},
        )
    group = request.context if isinstance(request.context, GroupResource) else None
    if group is None or not request.has_permission(Permission.VIEW, group):
        return group_not_found()
    return ApiError(
        403,
        "DENIED",
        "changing a group's dependency proxy takes the owner role of the group or of a parent "
        "group, or an instance admin",
    )


def forbidden_view(request: Request) -> Response:
    return api_response(_refusal(request))


def notfound_view(request: Request) -> Response:
    return api_response(ApiError(404, "UNSUPPORTED", "no such endpoint", summary="404 Not Found"))


def http_exception_view(exc: HTTPException, request: Request) -> Response:
    status = exc.code or 500
    return api_response(ApiError(status, code_for_status(status), exc.explanation))


def undecodable_path_view(exc: URLDecodeError, request: Request) -> Response:
    return api_response(bad_request("the path is not valid UTF-8"))


def unexpected_error_view(exc: Exception, request: Request) -> Response:
    # The raw path: decoding it is what may have failed.
    log.exception(
        "unexpected error on %s %r", request.method, request.environ.get("PATH_INFO", "")[:500]
    )
    return api_response(
        ApiError(500, "UNKNOWN", "internal error; the details are in the server log")
    )


def add_api_error_views(config: Configurator) -> None:
    """JSON errors on the API's paths, ahead of any error view without a path predicate."""
    predicates = {"depproxy_raw_path": API_PATHS}
    config.add_exception_view(api_error_view, ApiError)
    config.add_forbidden_view(forbidden_view, **predicates)
    config.add_notfound_view(notfound_view, **predicates)
    config.add_exception_view(http_exception_view, HTTPException, **predicates)
    config.add_exception_view(undecodable_path_view, URLDecodeError, **predicates)
    config.add_exception_view(unexpected_error_view, Exception, **predicates)
