"""The JSON API: a group's Dependency Proxy settings, cache contents and purge, for GitLab's
clients (`/api/v4/groups/:id/dependency_proxy/...`).

Its paths are the add-on's, like `/v2`: served at the root whatever prefix a host includes the
add-on under, judged by the add-on's policy with personal access tokens (`auth`), and answered
with JSON errors (`errors`).
"""

from __future__ import annotations

from pyramid.config import Configurator


def includeme(config: Configurator) -> None:
    # Imported here: `security` imports `api.auth`, and the views import `security`.
    from .errors import add_api_error_views
    from .views import add_routes

    # GitLab's clients call `/api/v4` at the root, whatever prefix a host included us under.
    config.route_prefix = None
    add_routes(config)
    add_api_error_views(config)
    config.scan(".views")
