"""The Docker token flow against an upstream: bearer tokens fetched from a realm and cached.

A token is cached per (realm, service, scope, credentials): one group's token never serves
another group's request. Credentials go only to the token realms a `RealmPolicy` allows.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode, urlsplit

from .challenge import Challenge
from .errors import UpstreamAuthFailed, UpstreamInvalid, UpstreamUnavailable
from .transport import Transport, rate_limited, read_capped

_MAX_TOKEN_RESPONSE_SIZE = 1024 * 1024
_DEFAULT_TOKEN_LIFETIME = 60  # the token spec's default when expires_in is absent
_TOKEN_EXPIRY_MARGIN = 10.0
_TOKEN_CACHE_PRUNE_AT = 1024


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic_authorization(self) -> str:
        # requests' own Basic auth encodes latin-1, which breaks non-ASCII passwords.
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


TokenKey = tuple[str, str, str, Credentials | None]  # realm, service, scope, credentials

# Token realms a registry's credentials may go to without being configured: Docker Hub's
# registry hands its tokens out from auth.docker.io.
DEFAULT_REALMS: dict[str, tuple[str, ...]] = {"registry-1.docker.io": ("auth.docker.io",)}
_DEFAULT_PORTS = {"http": 80, "https": 443}


class RealmPolicy:
    """Which token realms may receive a registry's credentials: the only place this is decided.

    Allowed are the registry's own host name, the realm hosts an operator listed for it
    (`depproxy.upstream.realms`) and, for Docker Hub, auth.docker.io. A host without a port
    matches that host on any port; `host:port` matches only that port. `registry` is the name
    the operator knows the registry by, for the error message.
    """

    def __init__(
        self, registry_url: str, extra_hosts: Iterable[str] = (), registry: str | None = None
    ) -> None:
        parts = urlsplit(registry_url)
        own = (parts.hostname or "").lower()
        self.registry = registry or parts.netloc.lower()
        self.hosts = frozenset(
            {own, *DEFAULT_REALMS.get(own, ()), *(host.lower() for host in extra_hosts)}
        )

    def allows(self, realm: str) -> bool:
        parts = urlsplit(realm)
        if "@" in parts.netloc or "\\" in realm:
            # Parsers disagree on where such a URL goes; ours is not the one sending it.
            return False
        host = (parts.hostname or "").lower()
        try:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        return bool(host) and (host in self.hosts or f"{host}:{port}" in self.hosts)

    def check(self, realm: str) -> None:
        """Raise UpstreamAuthFailed when credentials must not go to `realm`."""
        if self.allows(realm):
            return
        parts = urlsplit(realm)
        host = (parts.hostname or "").lower()
        with contextlib.suppress(ValueError):
            host += f":{parts.port}" if parts.port else ""
        raise UpstreamAuthFailed(
            f"refusing to send the credentials for {self.registry} to the token realm "
            f"{host!r} it named; if that host is the registry's own token service, allow it "
            f"with depproxy.upstream.realms = {self.registry}={host}"
        )


class TokenCache:
    """Tokens of one upstream, safe to share between threads."""

    def __init__(self, transport: Transport, host: str, realms: RealmPolicy) -> None:
        self._transport = transport
        self.host = host
        self.realms = realms
        self._lock = threading.Lock()
        self._tokens: dict[TokenKey, tuple[str, float]] = {}  # key -> (token, usable until)
        self._token_keys: dict[tuple[str, Credentials | None], TokenKey] = {}

    def cached(self, name: str, creds: Credentials | None) -> dict[str, str]:
        """A still-fresh token for `name` as an Authorization header, or nothing."""
        with self._lock:
            key = self._token_keys.get((name, creds))
            entry = self._tokens.get(key) if key else None
        if entry is not None and entry[1] > time.monotonic():
            return {"Authorization": f"Bearer {entry[0]}"}
        return {}

    def token(
        self, name: str, creds: Credentials | None, challenge: Challenge, rejected: str
    ) -> str:
        """A token answering `challenge` for `name`: cached, or fetched from its realm."""
        realm = challenge.params.get("realm", "")
        realm_parts = urlsplit(realm)
        if realm_parts.scheme not in ("http", "https") or not realm_parts.hostname:
            raise UpstreamUnavailable(f"upstream {self.host} sent an unusable token realm")
        if (
            creds is not None
            and realm_parts.scheme == "http"
            and self._transport.origin[0] == "https"
        ):
            raise UpstreamUnavailable(
                f"refusing to send credentials to plain-http token realm {realm!r}"
            )
        if creds is not None:
            # Fail closed: going anonymous instead would hide that the pull needs credentials.
            self.realms.check(realm)
        scope = challenge.params.get("scope") or f"repository:{name}:pull"
        key: TokenKey = (realm, challenge.params.get("service", ""), scope, creds)
        now = time.monotonic()
        with self._lock:
            self._token_keys[(name, creds)] = key
            cached = self._tokens.get(key)
        # A token the registry just rejected must not be offered again, however fresh.
        if cached is not None and cached[1] > now and cached[0] != rejected:
            return cached[0]

        token, lifetime = self._fetch(key)
        margin = min(_TOKEN_EXPIRY_MARGIN, lifetime / 2)
        with self._lock:
            self._tokens[key] = (token, now + lifetime - margin)
            if len(self._tokens) > _TOKEN_CACHE_PRUNE_AT:
                self._prune(now)
        return token

    def _prune(self, now: float) -> None:
        self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
        self._token_keys = {k: v for k, v in self._token_keys.items() if v in self._tokens}

    def _fetch(self, key: TokenKey) -> tuple[str, float]:
        """GET the token realm; returns (token, remaining lifetime in seconds)."""
        realm, service, scope, creds = key
        params = [("service", service)] if service else []
        # A challenge may name several space-separated scopes; the token spec wants each as
        # its own scope parameter.
        params += [("scope", s) for s in scope.split()]
        headers = {"Authorization": creds.basic_authorization()} if creds else {}
        url = f"{realm}{'&' if urlsplit(realm).query else '?'}{urlencode(params)}"
        # Not following redirects here keeps our Basic credentials on the realm's host.
        if self.realms.allows(realm):
            resp = self._transport.send("GET", url, headers)
        else:
            # A realm the operator did not name is where upstream says: vetted like a redirect.
            try:
                resp = self._transport.send_vetted("GET", url, headers)
            except UpstreamInvalid as error:
                raise UpstreamInvalid("upstream token realm refused", detail=error.detail) from None
        status = resp.status_code
        if status in (401, 403):
            resp.close()
            who = f"credentials of {creds.username!r}" if creds else "anonymous access"
            raise UpstreamAuthFailed(f"token endpoint of {self.host} rejected {who}", status=status)
        if status == 429:
            resp.close()
            raise rate_limited(resp, f"token endpoint of {self.host}")
        if status != 200:
            resp.close()
            raise UpstreamUnavailable(
                f"token endpoint of {self.host} answered {status}", status=status
            )
        try:
            body = json.loads(read_capped(resp, _MAX_TOKEN_RESPONSE_SIZE, "token response"))
        except ValueError as exc:
            raise UpstreamUnavailable(f"token endpoint of {self.host} sent invalid JSON") from exc
        finally:
            resp.close()
        token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamUnavailable(f"token endpoint of {self.host} sent no token")
        expires_in = body.get("expires_in")
        if (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or expires_in <= 0
        ):
            expires_in = _DEFAULT_TOKEN_LIFETIME
        return token, expires_in - self._token_age(body.get("issued_at"))

    @staticmethod
    def _token_age(issued_at: object) -> float:
        # Only ever shortens the lifetime: if the server's clock runs ahead of ours the age is
        # negative and ignored, so skew can cost an extra token fetch but never a stale token.
        if not isinstance(issued_at, str):
            return 0.0
        try:
            issued = datetime.fromisoformat(issued_at)
        except ValueError:
            return 0.0
        if issued.tzinfo is None:
            issued = issued.replace(tzinfo=UTC)
        return max(0.0, time.time() - issued.timestamp())
