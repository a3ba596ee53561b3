"""The add-on's settings, parsed and validated once when the add-on is included."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DOCKER_HUB_URL = "https://registry-1.docker.io"
_HOST_RE = re.compile(r"^(localhost|[a-z0-9-]+(\.[a-z0-9-]+)+)(:[0-9]{1,5})?$")


class ConfigurationError(ValueError):
    """A setting is missing or malformed; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"setting {key!r}: {problem}")
        self.key = key


@dataclass(frozen=True)
class Settings:
    sqlalchemy_url: str
    storage: str
    upstream_url: str
    upstream_username: str | None
    upstream_password: str | None
    upstream_registries: Mapping[str, str]
    jwt_secret: str
    jwt_expire_seconds: int
    external_url: str | None
    development: bool
    freshness_seconds: int
    upstream_connect_timeout: float
    upstream_read_timeout: float
    upstream_revalidate_timeout: float
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
    return Settings(
        sqlalchemy_url=url,
        storage=storage,
        upstream_url=_http_url(settings, "depproxy.upstream.url", DOCKER_HUB_URL) or "",
        upstream_username=username,
        upstream_password=password,
        upstream_registries=_registries(settings, "depproxy.upstream.registries"),
        jwt_secret=secret,
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
            settings, "depproxy.upstream.revalidate_timeout", 5.0, minimum=0.1, kind=float
        ),
        raw=dict(settings),
    )
