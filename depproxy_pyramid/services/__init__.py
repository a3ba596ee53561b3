"""The proxy service, built once from the settings and shared by every request."""

from __future__ import annotations

import logging

from pyramid.config import Configurator

from ..metrics import Metrics
from ..settings import Settings
from ..storage import storage_from_settings
from ..upstream import Credentials, UpstreamRegistry
from .proxy import ProxyService

log = logging.getLogger(__name__)


def upstreams_from_settings(settings: Settings) -> UpstreamRegistry:
    instance_credentials = (
        Credentials(settings.upstream_username, settings.upstream_password)
        if settings.upstream_username and settings.upstream_password
        else None
    )
    if instance_credentials is not None and not settings.upstream_credential_groups:
        log.warning(
            "depproxy.upstream.username is set but depproxy.upstream.credential_groups is "
            "empty: no group pulls with the instance-wide upstream credentials. List the "
            "groups that may (each includes its subgroups), or `*` for all of them, which "
            "lets every user who can pull through any group, public ones included, read what "
            "those credentials can read."
        )
    return UpstreamRegistry(
        settings.upstream_url,
        settings.upstream_registries,
        instance_credentials=instance_credentials,
        credential_groups=settings.upstream_credential_groups,
        realms=settings.upstream_realms,
        docker_hub_mirrors=settings.upstream_docker_hub_mirrors,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
    )


def includeme(config: Configurator) -> None:
    settings = config.registry["depproxy.settings"]
    config.registry["depproxy.proxy"] = ProxyService(
        settings,
        storage_from_settings(settings.raw),
        upstreams_from_settings(settings),
        config.registry["depproxy.dbsession_factory"],
        Metrics.for_app(),
    )
