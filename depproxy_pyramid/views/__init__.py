import re

from pyramid.config import Configurator
from pyramid.events import NewResponse
from pyramid.request import Request
from pyramid.response import Response
from pyramid.security import NO_PERMISSION_REQUIRED
from pyramid.tweens import INGRESS

from ..errors import RegistryError, method_not_allowed
from ..requestlog import record_when_body_done
from ..security import REGISTRY_PATHS
from .errors import API_VERSION, RawPathPredicate, add_error_views, registry_error_view

_REGISTRY_PATHS_RE = re.compile(REGISTRY_PATHS)


def _api_version_header(event: NewResponse) -> None:
    # The raw path: this runs for malformed paths too, which would fail to decode.
    path_info = event.request.environ.get("PATH_INFO", "")
    if _REGISTRY_PATHS_RE.match(path_info) and not path_info.startswith("/-/"):
        event.response.headers[API_VERSION[0]] = API_VERSION[1]


def _method_not_allowed_view(allowed: tuple[str, ...]):
    def method_not_allowed_view(request: Request) -> Response:
        raise method_not_allowed(allowed, f"{request.method[:20]} is not allowed here")

    return method_not_allowed_view


def includeme(config: Configurator) -> None:
    # Registry clients look for the API at the root, whatever prefix a host included us under.
    config.route_prefix = None
    # Our own root factory on every route: a host's may query its own tables, or refuse.
    root = "..resources.root_factory"
    config.add_route("depproxy.jwt_auth", "/jwt/auth", factory=root)
    config.add_route("depproxy.v2_base", "/v2/", factory=root)
    # Hosts with a trailing-slash normaliser send clients from `/v2/` to `/v2`.
    config.add_route("depproxy.v2_base_bare", "/v2", factory=root)
    config.add_route("depproxy.registry", "/v2/*subpath", factory=".registry.registry_factory")
    config.add_route("depproxy.metrics", "/-/metrics", factory=root)
    config.add_route("depproxy.health", "/-/health", factory=root)
    config.add_subscriber(_api_version_header, NewResponse)
    config.add_subscriber(record_when_body_done, NewResponse)
    # Outermost: malformed paths are answered before any tween decodes them.
    config.add_tween("depproxy_pyramid.views.errors.malformed_path_tween_factory", under=INGRESS)
    config.add_view_predicate("depproxy_raw_path", RawPathPredicate)
    for route in (
        "depproxy.jwt_auth",
        "depproxy.v2_base",
        "depproxy.v2_base_bare",
        "depproxy.metrics",
        "depproxy.health",
    ):
        # Without a predicate it comes after the route's views, which all take GET and so HEAD.
        config.add_view(
            _method_not_allowed_view(("GET", "HEAD")),
            route_name=route,
            permission=NO_PERMISSION_REQUIRED,
        )
    config.add_exception_view(registry_error_view, RegistryError)
    add_error_views(config, path_info=REGISTRY_PATHS)
    config.scan(".")
