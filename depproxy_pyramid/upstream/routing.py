"""Which upstream an image name goes to: only configured ones, ever."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from urllib.parse import urlsplit

from .client import UpstreamClient, _check_name
from .errors import UpstreamRefused
from .tokens import Credentials

_DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})


class UpstreamRegistry:
    """The configured upstreams, and the only place an image name is mapped to one."""

    def __init__(
        self,
        default_url: str,
        default_credentials: Credentials | None = None,
        extra_hosts: Mapping[str, str] | None = None,
        *,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        user_agent: str = "depproxy-pyramid",
    ) -> None:
        client = functools.partial(
            UpstreamClient,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            user_agent=user_agent,
        )
        self.default = client(default_url, default_credentials)
        self._docker_hub = urlsplit(self.default.base_url).hostname in _DOCKER_HUB_HOSTS
        # The default upstream's own host names route to it, so "docker.io/library/alpine"
        # works as well as "alpine".
        default_hosts = _DOCKER_HUB_HOSTS if self._docker_hub else {self.default.host}
        self._clients: dict[str, UpstreamClient] = dict.fromkeys(default_hosts, self.default)
        for host, url in (extra_hosts or {}).items():
            self._clients[host.lower()] = client(url)

    def resolve(self, image: str) -> tuple[UpstreamClient, str]:
        """Map an image name to (client, repository name upstream).

        Raises UpstreamRefused for names naming an unconfigured host or that are unsafe.
        """
        first, sep, rest = image.partition("/")
        # As in Docker's reference grammar: a host is only recognised with a path after it.
        if sep and ("." in first or ":" in first or first == "localhost"):
            client = self._clients.get(first)
            if client is None:
                raise UpstreamRefused(f"upstream registry {first!r} is not configured")
            name = rest
        else:
            client, name = self.default, image
        _check_name(name)
        if client is self.default and self._docker_hub and "/" not in name:
            name = f"library/{name}"
        return client, name

    def close(self) -> None:
        for client in set(self._clients.values()):
            client.close()
