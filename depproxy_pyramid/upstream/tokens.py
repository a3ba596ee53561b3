"""The Docker token flow against an upstream: bearer tokens fetched from a realm and cached.

A token is cached per (realm, service, scope, credentials): one group's token never serves
another group's request.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode, urlsplit

from .challenge import Challenge
from .errors import UpstreamAuthFailed, UpstreamUnavailable
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


class TokenCache:
    """Tokens of one upstream, safe to share between threads."""

    def __init__(self, transport: Transport, host: str) -> None:
        self._transport = transport
        self.host = host
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
        resp = self._transport.send("GET", url, headers)
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
