"""The registry token flow: `/jwt/auth` hands out JWTs, `/v2/` tells clients where to get one."""

from __future__ import annotations

from pyramid.request import Request
from pyramid.response import Response
from pyramid.security import NO_PERMISSION_REQUIRED
from pyramid.view import view_config

from ..errors import RegistryError
from ..names import Repository, parse_repository
from ..permissions import Permission
from ..resources import RepositoryResource, Root
from ..security import caller, issue_jwt, sign_in_refusal
from ..settings import Settings
from .errors import SERVICE, too_many_requests, unauthorized

MAX_SCOPES = 32


def _requested_scopes(
    request: Request, settings: Settings
) -> list[tuple[Repository, set[str]]]:
    """Each `repository:<name>:<actions>` scope, from repeated and space-separated parameters."""
    raw = [item for value in request.GET.getall("scope") for item in value.split()]
    if len(raw) > MAX_SCOPES:
        raise RegistryError(400, "DENIED", f"at most {MAX_SCOPES} scopes per token request")
    requested: list[tuple[Repository, set[str]]] = []
    for item in raw:
        kind, sep, rest = item.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not sep or not sep2 or not name:
            raise RegistryError(
                400,
                "UNSUPPORTED",
                "a scope has the form repository:<name>:<actions>",
                {"scope": item[:300]},
            )
        if kind != "repository":
            raise RegistryError(
                400,
                "UNSUPPORTED",
                f"scope type {kind[:50]!r} is not supported; only repository scopes can be granted",
                {"scope": item[:300]},
            )
        requested.append(
            (parse_repository(name, settings.mirror_group), set(actions.split(",")))
        )
    return requested


# Open views say so: a host's default permission must not close them.
@view_config(
    route_name="depproxy.jwt_auth",
    request_method="GET",
    renderer="json",
    permission=NO_PERMISSION_REQUIRED,
)
def jwt_auth(request: Request) -> dict:
    """A token for the pulls the caller may make; a caller without credentials gets one too,
    for what the operator opened to everyone (Docker Hub does the same): its pulls of anything
    else then get the registry's `insufficient_scope` answer, which clients explain."""
    identity = caller(request)
    refusal = sign_in_refusal(request)
    if refusal is not None:
        raise too_many_requests(refusal)
    if identity is None:
        error = unauthorized(
            request,
            "invalid credentials" if request.authorization else "authentication required",
        )
        error.headers["WWW-Authenticate"] = f'Basic realm="{SERVICE}"'
        raise error
    service = request.GET.get("service")
    if service is not None and service != SERVICE:
        raise RegistryError(400, "UNSUPPORTED", f"unknown service; this is {SERVICE!r}")

    settings: Settings = request.registry["depproxy.settings"]
    root: Root = request.root
    access = []
    mirrored = False
    for repository, actions in _requested_scopes(request, settings):
        if "pull" not in actions:
            continue
        try:
            # Every pull starts here: what it grants, and what the registry requests that
            # follow see, reflects a group disabled or made private a moment ago.
            group = root.find(repository.group_path, fresh=True)
        except KeyError:
            continue
        if request.has_permission(Permission.PULL, RepositoryResource(repository, group)):
            access.append({"type": "repository", "name": repository.name, "actions": ["pull"]})
            mirrored = mirrored or repository.mirror_name is not None

    token, expires_in, issued_at = issue_jwt(
        settings, identity, access, settings.mirror_group if mirrored else None
    )
    return {
        "token": token,
        "access_token": token,
        "expires_in": expires_in,
        "issued_at": issued_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@view_config(
    route_name="depproxy.v2_base",
    request_method=("GET", "HEAD"),
    permission=NO_PERMISSION_REQUIRED,
)
@view_config(
    route_name="depproxy.v2_base_bare",
    request_method=("GET", "HEAD"),
    permission=NO_PERMISSION_REQUIRED,
)
def v2_base(request: Request) -> Response:
    # An anonymous token is a valid token here, as on Docker Hub; what it may pull is decided
    # per repository.
    if caller(request) is None:
        raise unauthorized(
            request,
            "invalid or expired token" if request.authorization else "authentication required",
        )
    response = Response(json_body={}, charset="utf-8")
    response.content_type = "application/json"
    return response
