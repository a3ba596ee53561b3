"""The proxy service, built once from the settings and shared by every request."""

from __future__ import annotations

from pyramid.config import Configurator

from ..metrics import Metrics
from ..storage import storage_from_settings
from ..upstream import Credentials, UpstreamRegistry
from .proxy import ProxyService


def includeme(config: Configurator) -> None:
    settings = config.registry["depproxy.settings"]
    default_credentials = (
        Credentials(settings.upstream_username, settings.upstream_password)
        if settings.upstream_username and settings.upstream_password
        else None
    )
    upstreams = UpstreamRegistry(
        settings.upstream_url,
        default_credentials,
        settings.upstream_registries,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
    )
    config.registry["depproxy.proxy"] = ProxyService(
        settings,
        storage_from_settings(settings.raw),
        upstreams,
        config.registry["depproxy.dbsession_factory"],
        Metrics(),
    )
