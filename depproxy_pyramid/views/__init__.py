from pyramid.config import Configurator
from pyramid.events import NewResponse

from ..errors import RegistryError
from .errors import ADDON_PATHS, add_error_views, registry_error_view
from .registry import log_refused_request


def _api_version_header(event: NewResponse) -> None:
    path = event.request.path_info
    if path.startswith(("/v2/", "/jwt/")) or path == "/v2":
        event.response.headers["Docker-Distribution-Api-Version"] = "registry/2.0"


def includeme(config: Configurator) -> None:
    config.add_route("depproxy.jwt_auth", "/jwt/auth")
    config.add_route("depproxy.v2_base", "/v2/")
    config.add_route("depproxy.registry", "/v2/*subpath", factory=".registry.registry_factory")
    config.add_route("depproxy.metrics", "/-/metrics")
    config.add_subscriber(_api_version_header, NewResponse)
    config.add_subscriber(log_refused_request, NewResponse)
    config.add_exception_view(registry_error_view, RegistryError)
    add_error_views(config, path_info=ADDON_PATHS)
    config.scan(".")
