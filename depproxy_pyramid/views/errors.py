"""Every error, ours or Pyramid's, answered as registry JSON."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from urllib.parse import quote, unquote_to_bytes

from pyramid.config import Configurator
from pyramid.exceptions import URLDecodeError
from pyramid.httpexceptions import HTTPException
from pyramid.registry import Registry
from pyramid.request import Request
from pyramid.response import Response

from ..errors import RegistryError, code_for_status
from ..permissions import Permission
from ..security import caller
from ..throttle import SignInRefused

log = logging.getLogger(__name__)

SERVICE = "dependency_proxy"
API_VERSION = ("Docker-Distribution-Api-Version", "registry/2.0")
# The add-on's reserved paths and whatever a client may have glued onto them.
_RESERVED_PREFIX_RE = re.compile(r"^/(v2|jwt/auth|-/metrics|-/health)")
_REGISTRY_PATH_RE = re.compile(r"^/v2(/|\Z)")


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


def insufficient_scope(request: Request, name: str, message: str) -> RegistryError:
    """Docker Hub's answer to a token that does not grant pulling `name`.

    Clients read `error="insufficient_scope"` as "denied": Docker prints "pull access denied
    for …, repository does not exist or may require 'docker login'", containerd "pull access
    denied, repository does not exist or may require authorization".
    """
    return RegistryError(
        401,
        "UNAUTHORIZED",
        message,
        [{"Type": "repository", "Name": name, "Action": "pull"}],
        headers={
            "WWW-Authenticate": challenge(
                request, f"repository:{name}:pull", "insufficient_scope"
            )
        },
    )


def too_many_requests(refusal: SignInRefused) -> RegistryError:
    return RegistryError(
        429,
        "TOOMANYREQUESTS",
        refusal.message,
        {"retry_after": refusal.retry_after},
        headers={"Retry-After": str(refusal.retry_after)},
    )


def registry_error_view(error: RegistryError, request: Request) -> Response:
    return registry_response(request, error)


def malformed_request_error(environ: Mapping[str, object]) -> RegistryError | None:
    """400 for a request to the add-on's reserved prefixes whose path or query is not UTF-8, or
    whose path holds control characters (routing would quietly drop a trailing line feed and
    serve the tag before it); else None."""
    path_info = str(environ.get("PATH_INFO", ""))
    if not _RESERVED_PREFIX_RE.match(path_info):
        return None
    try:
        path = path_info.encode("latin-1").decode("utf-8")
    except UnicodeError:
        problem = "the path is not valid UTF-8"
    else:
        if not _decodes(str(environ.get("QUERY_STRING", ""))):
            return RegistryError(400, "UNSUPPORTED", "the query string is not valid UTF-8")
        if path.isprintable():
            return None
        problem = "the path contains control characters"
    detail = {"path": quoted_path(path_info)}
    segments = path_info.split("/")[2:] if _REGISTRY_PATH_RE.match(path_info) else []
    # /v2/<name>/<manifests|blobs>/<reference>: the name is all but the last two segments.
    if any(not _is_clean(segment) for segment in segments[:-2]):
        return RegistryError(400, "NAME_INVALID", f"invalid repository name: {problem}", detail)
    return RegistryError(400, "UNSUPPORTED", problem, detail)


def quoted_path(path_info: str) -> str:
    """The path as the client sent it, percent-encoded where it is not plain ASCII."""
    return quote(path_info.encode("latin-1", "replace")[:300], safe="/:@!$&'()*+,;=")


def _decodes(query: str) -> bool:
    try:
        unquote_to_bytes(query.encode("latin-1")).decode("utf-8")
    except UnicodeError:
        return False
    return True


def _is_clean(segment: str) -> bool:
    try:
        return segment.encode("latin-1").decode("utf-8").isprintable()
    except UnicodeError:
        return False


def malformed_path_tween_factory(handler, registry: Registry):
    """Answers malformed requests to the add-on's paths before anything decodes them: the
    transaction tween, the security policy, routing and the views all would, and fail with a
    bare 500 or an internal-error 500."""

    def malformed_path_tween(request: Request) -> Response:
        error = malformed_request_error(request.environ)
        if error is None:
            return handler(request)
        response = registry_response(request, error)
        if not request.environ.get("PATH_INFO", "").startswith("/-/"):
            response.headers[API_VERSION[0]] = API_VERSION[1]
        return response

    return malformed_path_tween


class RawPathPredicate:
    """Pyramid's `path_info` predicate on the undecoded WSGI path.

    Pyramid's own decodes the path, which fails (a bare 500) while an error for a path that is
    not UTF-8 is being answered.
    """

    def __init__(self, value: str, config: Configurator) -> None:
        self.value = value
        self.regex = re.compile(value)

    def text(self) -> str:
        return f"depproxy_raw_path = {self.value}"

    phash = text

    def __call__(self, context: object, request: Request) -> bool:
        return self.regex.match(request.environ.get("PATH_INFO", "")) is not None


def forbidden_view(request: Request) -> Response:
    context = request.context
    repository = getattr(context, "repository", None)
    scope = f"repository:{repository.name}:pull" if repository is not None else None
    identity = caller(request)
    if identity is None:
        if request.authorization is not None:
            error = unauthorized(request, "invalid or expired credentials", scope)
        else:
            error = unauthorized(request, "authentication required", scope)
        return registry_response(request, error)
    if identity.is_anonymous:
        # The same answer whether the group is private, missing or disabled: nothing about it
        # reaches a caller without credentials.
        if repository is None:
            error = unauthorized(request, "authentication required")
        else:
            error = insufficient_scope(request, repository.name, "authentication required")
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
    elif repository is not None and not identity.may_pull_repository(repository):
        error = insufficient_scope(
            request, repository.name, "the token does not grant pull on this repository"
        )
    else:
        error = RegistryError(403, "DENIED", "requested access to the resource is denied")
    return registry_response(request, error)


def notfound_view(request: Request) -> Response:
    return registry_response(
        request, RegistryError(404, "UNSUPPORTED", "no such endpoint", {"path": request.path[:300]})
    )


def http_exception_view(exc: HTTPException, request: Request) -> Response:
    return registry_response(
        request,
        RegistryError(exc.code or 500, code_for_status(exc.code or 500), exc.explanation),
    )


def undecodable_path_view(exc: URLDecodeError, request: Request) -> Response:
    return registry_response(
        request,
        RegistryError(
            400,
            "UNSUPPORTED",
            "the path is not valid UTF-8",
            {"path": quoted_path(request.environ.get("PATH_INFO", ""))},
        ),
    )


def unexpected_error_view(exc: Exception, request: Request) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path_qs[:500])
    return registry_response(
        request, RegistryError(500, "UNKNOWN", "internal error; the details are in the server log")
    )


def add_error_views(config: Configurator, path_info: str | None = None) -> None:
    """Registry JSON for Pyramid's and unexpected errors under `path_info` (None: everywhere).

    `path_info` is matched against the undecoded path (`views.includeme` adds the predicate).
    """
    predicates = {"depproxy_raw_path": path_info} if path_info else {}
    config.add_forbidden_view(forbidden_view, **predicates)
    config.add_notfound_view(notfound_view, **predicates)
    config.add_exception_view(http_exception_view, HTTPException, **predicates)
    config.add_exception_view(undecodable_path_view, URLDecodeError, **predicates)
    config.add_exception_view(unexpected_error_view, Exception, **predicates)
