"""depproxy-pyramid: a pull-through cache for container images, as a Pyramid add-on."""

from __future__ import annotations

import logging

from pyramid.config import Configurator
from pyramid.router import Router

from .settings import parse_settings
from .views.errors import add_error_views

log = logging.getLogger(__name__)


def includeme(config: Configurator) -> None:
    """What a host portal includes: settings, accounts, models, security, the registry API
    and the JSON API.

    The add-on takes none of the host's root factory, security policy, session, request
    attributes or transaction settings; see `security.HostAndAddonPolicy`.
    """
    settings = parse_settings(config.get_settings())
    config.registry["depproxy.settings"] = settings
    fixed_secret = not (config.get_settings().get("depproxy.jwt.secret") or "").strip()
    if settings.development and fixed_secret:
        log.warning(
            "depproxy.development is on and depproxy.jwt.secret is not set: registry tokens are "
            "signed (and upstream passwords encrypted) with a fixed secret published in the "
            "source code, so anyone can forge a token; never expose this instance"
        )
    config.include(".accounts")
    config.include(".models")
    config.include(".resources")
    config.include(".security")
    config.include(".services")
    config.include(".views")
    config.include(".api")
    # After `.views` and `.api`, whose routes are at the root: the pages honour the host's
    # route prefix.
    config.include(".pages")


def main(global_config: dict, **settings: str) -> Router:
    """The standalone application: the add-on with nothing around it, JSON errors everywhere."""
    with Configurator(settings=settings) as config:
        config.include(includeme)
        add_error_views(config)
    return config.make_wsgi_app()
