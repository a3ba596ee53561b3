"""depproxy-pyramid: a pull-through cache for container images, as a Pyramid add-on."""

from __future__ import annotations

from pyramid.config import Configurator
from pyramid.router import Router

from .security import SecurityPolicy
from .settings import parse_settings
from .views.errors import add_error_views


def includeme(config: Configurator) -> None:
    """What a host portal includes: settings, models, resources, registry and token views."""
    settings = parse_settings(config.get_settings())
    config.registry["depproxy.settings"] = settings
    config.include(".models")
    config.include(".services")
    config.include(".views")


def main(global_config: dict, **settings: str) -> Router:
    """The standalone application: the add-on owns every URL, and brings its security policy."""
    with Configurator(settings=settings) as config:
        config.include(includeme)
        config.set_security_policy(SecurityPolicy(config.registry["depproxy.settings"]))
        add_error_views(config)
    return config.make_wsgi_app()
