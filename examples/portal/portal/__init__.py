"""An example host portal: its own users, pages and database, with the registry add-on inside."""

from __future__ import annotations

from pyramid.config import Configurator
from pyramid.router import Router

from .accounts import PortalAccounts
from .security import Root


def main(global_config: dict, **settings: str) -> Router:
    """The portal's WSGI application (`use = egg:depproxy-portal-example`)."""
    with Configurator(settings=settings, root_factory=Root) as config:
        config.include("pyramid_tm")
        config.include(".models")
        # The registry stays at the root (clients look for /v2/ there); the add-on's pages
        # live under the prefix: /registry/groups/<group>/-/dependency_proxy.
        config.include("depproxy_pyramid", route_prefix="/registry")
        # Registry sign-in goes through the portal's users instead of the add-on's own tables.
        config.set_dependency_proxy_accounts(PortalAccounts())
        config.include(".security")
        config.add_route("home", "/")
        config.add_route("login", "/login")
        config.add_route("logout", "/logout")
        config.add_route("notes", "/notes")
        config.add_route("admin", "/admin")
        config.scan(".views")
    return config.make_wsgi_app()
