"""The add-on's settings, parsed and validated once when the add-on is included."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .names import group_path_problem
from .upstream.routing import default_registry_host

DOCKER_HUB_URL = "https://registry-1.docker.io"
_HOST_RE = re.compile(r"^(localhost|[a-z0-9-]+(\.[a-z0-9-]+)+)(:[0-9]{1,5})?$")
# Plain path segments only: nginx takes the header's value as a URI, so `?`, `%` or `..` would
# change which location, or which file, it lands on.
_ACCEL_PREFIX_RE = re.compile(r"^/([A-Za-z0-9_~-][A-Za-z0-9._~-]*/)+$")


class ConfigurationError(ValueError):
    """A setting is missing or malformed; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"setting {key!r}: {problem}")
        self.key = key


@dataclass(frozen=True)
class Settings:
    sqlalchemy_url: str
    storage: str
    # The URI prefix of nginx's internal location for the storage root: cached filesystem
    # blobs are then answered with X-Accel-Redirect and sent by nginx.
    storage_accel_redirect: str | None
    upstream_url: str
    upstream_username: str | None
    upstream_password: str | None
    upstream_registries: Mapping[str, str]
    # Registry hosts of configured upstreams that mirror Docker Hub: one-segment names get
    # `library/` there, as on Docker Hub itself.
    upstream_docker_hub_mirrors: frozenset[str]
    jwt_secret: str
    # Signs the session cookie of the HTML pages' own sign-in.
    session_secret: str
    jwt_expire_seconds: int
    external_url: str | None
    development: bool
    freshness_seconds: int
    upstream_connect_timeout: float
    upstream_read_timeout: float
    upstream_revalidate_timeout: float
    # Requests waiting on upstream at once in this process; below the server's thread count, so
    # that cached pulls always find a worker.
    upstream_max_in_flight: int
    # Group paths (each with its subgroups) allowed to pull with the instance-wide upstream
    # credentials; "*" for every group. Empty: the instance credentials are never used.
    upstream_credential_groups: tuple[str, ...]
    # Registry host -> token realm hosts (besides its own) that may receive its credentials.
    upstream_realms: Mapping[str, tuple[str, ...]]
    # Secrets for upstream credentials at rest, newest first; the older ones only decrypt.
    encryption_keys: tuple[str, ...]
    blob_max_size: int
    # The share of the spool's free disk space fills may take, between 0 and 1.
    spool_max_disk_share: float
    auth_max_failures: int
    auth_failure_window_seconds: int
    auth_password_check_concurrency: int
    # Addresses whose X-Forwarded-For names the client (a TLS-terminating nginx, say).
    trusted_proxies: tuple[str, ...]
    metrics_token: str | None
    metrics_allow: tuple[str, ...]
    # How long requests share what they looked up of groups, accounts, memberships, tokens and
    # cached blobs: the longest a change made elsewhere (a removed member, a disabled group)
    # goes unnoticed. 0 looks everything up on every request.
    lookup_cache_seconds: float
    # The group that answers image names without a group at the root (`/v2/library/alpine/...`),
    # as Docker's `registry-mirrors` and containerd's mirrors ask for them; None: no such group.
    mirror_group: str | None
    # Whether callers without credentials may pull through the mirror group.
    mirror_anonymous: bool
    raw: Mapping[str, str] = field(repr=False)


def _bool(settings: Mapping[str, str], key: str, default: bool) -> bool:
    value = settings.get(key)
    if value is None or str(value).strip() == "":
        return default
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigurationError(key, f"expected a boolean, got {value!r}")


def _number(
    settings: Mapping[str, str], key: str, default: float, *, minimum: float, kind: type = int
) -> float:
    value = settings.get(key)
    if value is None or str(value).strip() == "":
        return default
    try:
        number = kind(str(value).strip())
    except ValueError:
        raise ConfigurationError(key, f"expected a number, got {value!r}") from None
    if number < minimum:
        raise ConfigurationError(key, f"must be at least {minimum}, got {number}")
    return number


def _http_url(settings: Mapping[str, str], key: str, default: str | None) -> str | None:
    value = (settings.get(key) or "").strip() or default
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigurationError(key, f"expected an http(s) URL without query, got {value!r}")
    return value.rstrip("/")


def _registries(settings: Mapping[str, str], key: str) -> dict[str, str]:
    """`host` or `host=url` items separated by whitespace; a bare host means https://host."""
    registries: dict[str, str] = {}
    for item in (settings.get(key) or "").split():
        host, _, url = item.partition("=")
        host = host.lower()
        if not _HOST_RE.match(host):
            raise ConfigurationError(key, f"{host!r} is not a registry host name")
        registries[host] = _http_url({key: url or f"https://{host}"}, key, None) or ""
    return registries


def _docker_hub_mirrors(
    settings: Mapping[str, str], key: str, upstream_url: str, registries: Mapping[str, str]
) -> frozenset[str]:
    """Registry hosts, each the default upstream's (its URL's host[:port]) or an extra one's."""
    default = default_registry_host(upstream_url)
    mirrors = frozenset(host.lower() for host in _words(settings, key))
    unknown = sorted(mirrors - {default, *registries})
    if unknown:
        raise ConfigurationError(
            key,
            f"{unknown[0]!r} is not a configured upstream: name the default upstream as "
            f"{default!r} (the host[:port] of depproxy.upstream.url) or a host of "
            "depproxy.upstream.registries",
        )
    return mirrors


def _words(settings: Mapping[str, str], key: str) -> tuple[str, ...]:
    return tuple((settings.get(key) or "").split())


def _realms(settings: Mapping[str, str], key: str) -> dict[str, tuple[str, ...]]:
    """`registry-host=realm-host[,realm-host...]` items separated by whitespace."""
    realms: dict[str, tuple[str, ...]] = {}
    for item in _words(settings, key):
        host, sep, allowed = item.partition("=")
        hosts = tuple(h.lower() for h in allowed.split(",") if h)
        if not sep or not hosts or not all(_HOST_RE.match(h) for h in (host.lower(), *hosts)):
            raise ConfigurationError(key, f"expected registry-host=realm-host[,...], got {item!r}")
        realms[host.lower()] = hosts
    return realms


def _addresses(settings: Mapping[str, str], key: str) -> tuple[str, ...]:
    """IP addresses or networks (CIDR)."""
    networks = _words(settings, key)
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigurationError(key, f"{network!r} is not an address or network") from None
    return networks


def _accel_redirect(settings: Mapping[str, str], key: str, storage: str) -> str | None:
    prefix = (settings.get(key) or "").strip() or None
    if prefix is None:
        return None
    if not _ACCEL_PREFIX_RE.match(prefix):
        raise ConfigurationError(
            key, f"expected an nginx location's URI, such as /_depproxy/storage/, got {prefix!r}"
        )
    if storage != "filesystem":
        raise ConfigurationError(
            key,
            f"needs depproxy.storage = filesystem (nginx sends the files of the storage "
            f"directory), not {storage!r}; S3 storage has depproxy.storage.s3.redirect",
        )
    return prefix


def _group_path(settings: Mapping[str, str], key: str) -> str | None:
    path = (settings.get(key) or "").strip().strip("/") or None
    if path is None:
        return None
    problem = group_path_problem(path)
    if problem:
        raise ConfigurationError(key, f"{path!r} is not a group path: {problem}")
    return path


def parse_settings(settings: Mapping[str, str]) -> Settings:
    """Validate the `depproxy.*` keys; raise ConfigurationError naming the first bad key."""
    development = _bool(settings, "depproxy.development", False)
    url = (settings.get("depproxy.sqlalchemy.url") or settings.get("sqlalchemy.url") or "").strip()
    if not url:
        raise ConfigurationError(
            "sqlalchemy.url", "is required (or depproxy.sqlalchemy.url, for a database of its own)"
        )
    secret = (settings.get("depproxy.jwt.secret") or "").strip()
    if not secret:
        if not development:
            raise ConfigurationError(
                "depproxy.jwt.secret", "is required (a long random string) outside development"
            )
        secret = "development-only-secret-do-not-use-in-production"
    elif len(secret) < 32 and not development:
        raise ConfigurationError("depproxy.jwt.secret", "must be at least 32 characters")
    username = (settings.get("depproxy.upstream.username") or "").strip() or None
    password = settings.get("depproxy.upstream.password") or None
    if bool(username) != bool(password):
        raise ConfigurationError(
            "depproxy.upstream.password" if username else "depproxy.upstream.username",
            "upstream username and password must be set together",
        )
    storage = (settings.get("depproxy.storage") or "filesystem").strip()
    encryption_keys = _words(settings, "depproxy.encryption.keys")
    if any(len(key) < 32 for key in encryption_keys):
        raise ConfigurationError("depproxy.encryption.keys", "each key has at least 32 characters")
    session_secret = (settings.get("depproxy.session.secret") or "").strip()
    if session_secret and len(session_secret) < 32 and not development:
        raise ConfigurationError("depproxy.session.secret", "must be at least 32 characters")
    mirror_group = _group_path(settings, "depproxy.mirror.group")
    mirror_anonymous = _bool(settings, "depproxy.mirror.anonymous", False)
    if mirror_anonymous and mirror_group is None:
        raise ConfigurationError(
            "depproxy.mirror.anonymous", "needs depproxy.mirror.group: the group it opens"
        )
    upstream_url = _http_url(settings, "depproxy.upstream.url", DOCKER_HUB_URL) or ""
    registries = _registries(settings, "depproxy.upstream.registries")
    spool_share = _number(settings, "depproxy.spool.max_disk_share", 0.5, minimum=0.01, kind=float)
    if spool_share > 1:
        raise ConfigurationError("depproxy.spool.max_disk_share", "is a share between 0 and 1")
    return Settings(
        sqlalchemy_url=url,
        storage=storage,
        storage_accel_redirect=_accel_redirect(
            settings, "depproxy.storage.accel_redirect", storage
        ),
        upstream_url=upstream_url,
        upstream_username=username,
        upstream_password=password,
        upstream_registries=registries,
        upstream_docker_hub_mirrors=_docker_hub_mirrors(
            settings, "depproxy.upstream.docker_hub_mirrors", upstream_url, registries
        ),
        jwt_secret=secret,
        # Without a secret of its own, one derived from the signing secret: a session cookie
        # then never verifies as a registry token, nor the other way round.
        session_secret=session_secret
        or hmac.new(secret.encode(), b"depproxy.session", hashlib.sha256).hexdigest(),
        jwt_expire_seconds=int(_number(settings, "depproxy.jwt.expire_seconds", 900, minimum=60)),
        external_url=_http_url(settings, "depproxy.external_url", None),
        development=development,
        freshness_seconds=int(
            _number(settings, "depproxy.manifest.freshness_seconds", 0, minimum=0)
        ),
        upstream_connect_timeout=_number(
            settings, "depproxy.upstream.connect_timeout", 5.0, minimum=0.1, kind=float
        ),
        upstream_read_timeout=_number(
            settings, "depproxy.upstream.read_timeout", 30.0, minimum=0.1, kind=float
        ),
        upstream_revalidate_timeout=_number(
            settings, "depproxy.upstream.revalidate_timeout", 1.0, minimum=0.1, kind=float
        ),
        upstream_max_in_flight=int(
            _number(settings, "depproxy.upstream.max_in_flight", 192, minimum=1)
        ),
        upstream_credential_groups=_words(settings, "depproxy.upstream.credential_groups"),
        upstream_realms=_realms(settings, "depproxy.upstream.realms"),
        # Without keys of their own, upstream credentials are encrypted under the signing
        # secret, as version 0.1 did.
        encryption_keys=encryption_keys or (secret,),
        blob_max_size=int(
            _number(settings, "depproxy.blob.max_size", 16 * 1024**3, minimum=1024**2)
        ),
        spool_max_disk_share=spool_share,
        auth_max_failures=int(_number(settings, "depproxy.auth.max_failures", 10, minimum=1)),
        auth_failure_window_seconds=int(
            _number(settings, "depproxy.auth.failure_window_seconds", 300, minimum=1)
        ),
        auth_password_check_concurrency=int(
            _number(settings, "depproxy.auth.password_check_concurrency", 4, minimum=1)
        ),
        trusted_proxies=_addresses(settings, "depproxy.trusted_proxies"),
        metrics_token=(settings.get("depproxy.metrics.token") or "").strip() or None,
        metrics_allow=_addresses(settings, "depproxy.metrics.allow"),
        lookup_cache_seconds=_number(
            settings, "depproxy.lookup_cache_seconds", 5.0, minimum=0, kind=float
        ),
        mirror_group=mirror_group,
        mirror_anonymous=mirror_anonymous,
        raw=dict(settings),
    )
