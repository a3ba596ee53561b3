"""Which upstream an image name goes to (only configured ones, ever), and with whose credentials
the instance-wide ones may be used."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from .client import UpstreamClient, _check_name
from .errors import UpstreamRefused
from .tokens import Credentials, RealmPolicy
from .transport import AddressGuard

DOCKER_HUB = "registry-1.docker.io"
_DOCKER_HUB_HOSTS = frozenset({DOCKER_HUB, "index.docker.io", "docker.io"})


def default_registry_host(default_url: str) -> str:
    """The registry host of the default upstream: its URL's host[:port]."""
    return urlsplit(default_url).netloc.lower()


def is_docker_hub(url: str) -> bool:
    """Whether `url` is Docker Hub's registry (under any of its names)."""
    return urlsplit(url).hostname in _DOCKER_HUB_HOSTS


def registry_hosts(
    default_url: str, extra_hosts: Iterable[str] = (), docker_hub_mirrors: Iterable[str] = ()
) -> dict[str, str]:
    """Every host name an image may start with -> the registry host it stands for.

    The registry host is what credentials and realms are configured under: the host[:port] of
    the default upstream's URL, or an extra upstream's host as `depproxy.upstream.registries`
    names it. The default upstream's own names route to it; so do Docker Hub's when it is
    Docker Hub or one of `docker_hub_mirrors`, so "docker.io/library/alpine" works as well as
    "alpine" (through a mirror, that name means the image the mirror holds for Docker Hub).
    """
    default = default_registry_host(default_url)
    mirrors = {host.lower() for host in docker_hub_mirrors}
    names = {default}
    if is_docker_hub(default_url) or default in mirrors:
        names |= _DOCKER_HUB_HOSTS
    hosts = dict.fromkeys(names, default)
    hosts.update({host.lower(): host.lower() for host in extra_hosts})
    return hosts


def group_may_use(path: str, allowed: Iterable[str]) -> bool:
    """Whether the group at `path` is one of `allowed` (`*`: all) or a subgroup of one."""
    for entry in allowed:
        entry = entry.strip("/")
        if entry == "*" or path == entry or path.startswith(entry + "/"):
            return True
    return False


class UpstreamRegistry:
    """The configured upstreams, and the only place an image name is mapped to one.

    `instance_credentials` are for the default upstream only, and only for the groups in
    `credential_groups` (paths, each with its subgroups, or `*`). `realms` maps a registry host
    to the token realm hosts, besides its own, that may receive its credentials.
    `docker_hub_mirrors` are registry hosts (configured upstreams) that serve Docker Hub's
    repositories under Docker Hub's names, so a one-segment name gets `library/` there as it
    does on Docker Hub.
    """

    def __init__(
        self,
        default_url: str,
        extra_hosts: Mapping[str, str] | None = None,
        *,
        instance_credentials: Credentials | None = None,
        credential_groups: Iterable[str] = (),
        realms: Mapping[str, Iterable[str]] | None = None,
        docker_hub_mirrors: Iterable[str] = (),
        connect_timeout: float = 5,
        read_timeout: float = 30,
        user_agent: str = "depproxy-pyramid",
    ) -> None:
        extra = {host.lower(): url for host, url in (extra_hosts or {}).items()}
        mirrors = {host.lower() for host in docker_hub_mirrors}
        self._hosts = registry_hosts(default_url, extra, mirrors)
        allowed_realms: dict[str, list[str]] = {}
        for host, realm_hosts in (realms or {}).items():
            registry = self._hosts.get(host.lower(), host.lower())
            allowed_realms.setdefault(registry, []).extend(realm_hosts)
        # Redirects may lead to any configured upstream, internal or not, and elsewhere only
        # to public addresses.
        guard = AddressGuard([default_url, *extra.values()])

        def client(url: str, registry: str) -> UpstreamClient:
            return UpstreamClient(
                url,
                realms=RealmPolicy(url, allowed_realms.get(registry, ()), registry),
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                user_agent=user_agent,
                guard=guard,
            )

        self.default_host = default_registry_host(default_url)
        self.default = client(default_url, self.default_host)
        extra_clients = {host: client(url, host) for host, url in extra.items()}
        self._clients: dict[str, UpstreamClient] = {
            host: self.default for host in self._hosts if host not in extra
        }
        self._clients.update(extra_clients)
        self._registry_of = {self.default: self.default_host}
        self._registry_of.update({c: host for host, c in extra_clients.items()})
        # Docker Hub keeps its official images under `library/`, and so does a mirror of it.
        self._library_prefixed = frozenset(
            client
            for client, host in self._registry_of.items()
            if is_docker_hub(client.base_url) or host in mirrors
        )
        self.instance_credentials = instance_credentials
        self.credential_groups = tuple(credential_groups)

    @property
    def registries(self) -> frozenset[str]:
        """The registry hosts credentials may be stored for."""
        return frozenset(self._hosts.values())

    def registry_host(self, name: str) -> str | None:
        """The registry host a host name in an image (or on the command line) stands for."""
        return self._hosts.get(name.lower())

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
        if client in self._library_prefixed and "/" not in name:
            name = f"library/{name}"
        return client, name

    def registry_of(self, client: UpstreamClient) -> str:
        """The registry host `client` pulls from, as credentials are stored under it."""
        return self._registry_of[client]

    def instance_credentials_for(self, registry: str, group_path: str) -> Credentials | None:
        """The instance-wide credentials, if this group may pull from `registry` with them."""
        if (
            self.instance_credentials is not None
            and registry == self.default_host
            and group_may_use(group_path, self.credential_groups)
        ):
            return self.instance_credentials
        return None

    def close(self) -> None:
        for client in self._registry_of:
            client.close()
