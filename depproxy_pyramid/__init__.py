"""depproxy-pyramid: a pull-through cache for container images, as a Pyramid add-on."""

from __future__ import annotations

from pyramid.config import Configurator
from pyramid.router import Router

from .security import SecurityPolicy
from .settings import parse_settings


def includeme(config: Configurator) -> None:
    """What a host portal includes: settings, models, resources, registry and token views."""
    settings = parse_settings(config.get_settings())
    config.registry["depproxy.settings"] = settings
    config.include(".models")
    config.include(".services")
    config.include(".views")


def main(global_config: dict, **settings: str) -> Router:
    """The standalone application, with the add-on's own security policy."""
    with Configurator(settings=settings) as config:
        config.include(includeme)
        config.set_security_policy(SecurityPolicy(config.registry["depproxy.settings"]))
    return config.make_wsgi_app()
