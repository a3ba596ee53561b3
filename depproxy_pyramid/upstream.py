"""Client for the upstream registries the proxy pulls from (OCI distribution API).

Implements the pull half of the OCI distribution spec plus the Docker token
authentication flow (``WWW-Authenticate: Bearer realm=...,service=...,scope=...``),
with typed errors the HTTP layer can map onto registry error responses.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.cookiejar
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

# Exactly the four current manifest formats, and deliberately no "*/*": registries negotiate
# on Accept, and anything broader lets them answer with legacy schema1 (whose signed bytes do
# not hash to the digest the registry reports) or convert/narrow the manifest. The cache must
# hold the canonical object a digest names, independent of what the downstream client accepts,
# so we always ask for the richest form (an index for multi-arch images).
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
_MAX_TOKEN_RESPONSE_SIZE = 1024 * 1024
_MAX_REDIRECTS = 5
_ATTEMPTS = 2
_RETRY_BACKOFF = 0.25  # seconds, multiplied by the attempt number
_RETRY_STATUSES = frozenset({502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_TOKEN_LIFETIME = 60  # the token spec's default when expires_in is absent
_TOKEN_EXPIRY_MARGIN = 10.0
_TOKEN_CACHE_PRUNE_AT = 1024
_DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})
# Some registries omit Content-Type or send a generic one; then the manifest's own mediaType
# field is the only source of truth.
_GENERIC_CONTENT_TYPES = frozenset(
    {"", "application/json", "text/plain", "application/octet-stream"}
)

# OCI distribution grammar, re-checked here because these strings end up in upstream URLs.
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_LENGTHS = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"(sha256|sha512):([a-f0-9]+)")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_QUOTED_PAIR = re.compile(r"\\(.)")
# Bare values should be tokens, but some registries send unquoted realm URLs.
_BARE = re.compile(r'[^\s,"]*')


class UpstreamError(Exception):
    """Base of all upstream failures; ``status`` is the upstream HTTP status behind it, if any."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class UpstreamUnavailable(UpstreamError):
    """Upstream unreachable, timed out, answered 5xx or something we cannot use."""


class UpstreamTimeout(UpstreamUnavailable):
    """Upstream accepted the connection but did not answer within the read timeout."""


class UpstreamRateLimited(UpstreamError):
    """Upstream answered 429; ``retry_after`` is in seconds when the upstream said."""

    def __init__(
        self, message: str, *, status: int | None = 429, retry_after: int | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class UpstreamNotFound(UpstreamError):
    """The repository, manifest or blob does not exist upstream, or we may not see it."""


class UpstreamAuthFailed(UpstreamError):
    """The upstream's token endpoint (or a Basic-auth registry) rejected our credentials."""


class UpstreamRefused(UpstreamError):
    """We refuse to contact upstream for this name: unconfigured host or unsafe name."""


class UpstreamBadDigest(UpstreamError):
    """Upstream content does not match the digest it was requested or advertised by."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic_authorization(self) -> str:
        # requests' own Basic auth encodes latin-1, which breaks non-ASCII passwords.
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class ManifestRef:
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Manifest:
    content: bytes = field(repr=False)
    media_type: str
    digest: str

    @property
    def size(self) -> int:
        return len(self.content)


@dataclass(frozen=True)
class BlobRef:
    size: int
    media_type: str | None


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-cased
    params: Mapping[str, str]  # keys lower-cased


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (possibly several challenges joined by commas)."""
    challenges: list[Challenge] = []
    params: dict[str, str] = {}  # parameters before any scheme belong to nothing: dropped
    pos, end = 0, len(header)
    while pos < end:
        if header[pos] in " \t,":
            pos += 1
            continue
        match = _TOKEN.match(header, pos)
        if match is None:
            # token68 leftovers and other junk carry nothing we use
            pos += 1
            continue
        name, pos = match.group(), _skip_space(header, match.end())
        if pos < end and header[pos] == "=":
            pos = _skip_space(header, pos + 1)
            quoted = _QUOTED.match(header, pos)
            if quoted is not None:
                value, pos = _QUOTED_PAIR.sub(r"\1", quoted.group(1)), quoted.end()
            else:
                bare = _BARE.match(header, pos)
                assert bare is not None  # the pattern matches the empty string
                value, pos = bare.group(), bare.end()
            params[name.lower()] = value
        else:
            params = {}
            challenges.append(Challenge(name.lower(), params))
    return challenges


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    return pos


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or ""), parts.port or {"http": 80, "https": 443}.get(scheme)


def _check_name(name: str) -> None:
    segments = name.split("/")
    if not all(_PATH_COMPONENT.fullmatch(segment) for segment in segments):
        raise UpstreamRefused(f"refusing unsafe repository name {name!r}")


def _check_digest(digest: str) -> tuple[str, str]:
    match = _DIGEST.fullmatch(digest)
    if match is None or len(match.group(2)) != _DIGEST_LENGTHS[match.group(1)]:
        raise UpstreamRefused(f"refusing unsupported or malformed digest {digest!r}")
    return match.group(1), match.group(2)


def _is_digest(reference: str) -> bool:
    if ":" in reference:
        _check_digest(reference)
        return True
    if _TAG.fullmatch(reference) is None:
        raise UpstreamRefused(f"refusing malformed tag {reference!r}")
    return False


def _manifest_label(name: str, reference: str) -> str:
    return f"manifest {name}{'@' if ':' in reference else ':'}{reference}"


def _media_type(resp: requests.Response) -> str:
    return resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def _retry_after(value: str | None) -> int | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0, math.ceil(when.timestamp() - time.time()))


def _read_capped(resp: requests.Response, limit: int, what: str) -> bytes:
    length = _content_length(resp)
    if length is not None and length > limit:
        raise UpstreamUnavailable(f"upstream {what} is {length} bytes, over the {limit} limit")
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in resp.iter_content(64 * 1024):
            total += len(chunk)
            if total > limit:
                raise UpstreamUnavailable(f"upstream {what} exceeds the {limit} byte limit")
            chunks.append(chunk)
    except requests.RequestException as exc:
        raise UpstreamUnavailable(f"reading upstream {what} failed: {exc}") from exc
    return b"".join(chunks)


def _rate_limited(resp: requests.Response, what: str) -> UpstreamRateLimited:
    return UpstreamRateLimited(
        f"upstream rate limit hit for {what}",
        retry_after=_retry_after(resp.headers.get("Retry-After")),
    )


def _raise_for_status(resp: requests.Response, what: str) -> None:
    """Map a final (non-auth-retried) response onto the typed errors."""
    status = resp.status_code
    if 200 <= status < 300:
        return
    resp.close()
    if status == 404:
        raise UpstreamNotFound(f"{what} not found upstream", status=status)
    if status in (401, 403):
        # Docker Hub answers this for non-existent repositories as well as private ones.
        raise UpstreamNotFound(f"{what} not found or access denied upstream", status=status)
    if status == 429:
        raise _rate_limited(resp, what)
    raise UpstreamUnavailable(f"upstream answered {status} for {what}", status=status)


class BlobResponse:
    """A streaming upstream blob body; use as a context manager so the connection is freed."""

    def __init__(self, response: requests.Response, size: int | None) -> None:
        self._response = response
        self.status: int = response.status_code
        self.headers: Mapping[str, str] = response.headers
        self.size = size  # full blob size, even for a 206

    def iter_chunks(self, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        """Yield the body exactly as stored upstream.

        Reads the raw stream without Content-Encoding decoding: a blob's digest covers the
        stored bytes, and some object stores label gzip layers with ``Content-Encoding: gzip``.
        """
        try:
            yield from self._response.raw.stream(chunk_size, decode_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise UpstreamUnavailable(f"upstream blob transfer failed: {exc}") from exc

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> BlobResponse:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_TokenKey = tuple[str, str, str, Credentials | None]  # realm, service, scope, credentials


class UpstreamClient:
    """Pull-only client for one upstream registry, safe to share between threads."""

    def __init__(
        self,
        base_url: str,
        credentials: Credentials | None = None,
        *,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        user_agent: str = "depproxy-pyramid",
    ) -> None:
        parts = urlsplit(base_url)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.username is not None
            or parts.query
        ):
            # No URL in the message: userinfo would leak a password into logs.
            raise ValueError("upstream base URL must be http(s), without userinfo or query")
        self.base_url = base_url.rstrip("/")
        self.host = parts.netloc.lower()
        self.credentials = credentials
        self._origin = _origin(self.base_url)
        self._timeout = (connect_timeout, read_timeout)
        self._session = requests.Session()
        # Identity encoding keeps Content-Length and the bytes we hash equal to what is stored.
        self._session.headers.update({"User-Agent": user_agent, "Accept-Encoding": "identity"})
        # Requests for different groups (credentials) share this session, so a cookie set on
        # behalf of one must never ride along on another's request.
        self._session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._lock = threading.Lock()
        self._tokens: dict[_TokenKey, tuple[str, float]] = {}  # key -> (token, usable until)
        self._token_keys: dict[tuple[str, Credentials | None], _TokenKey] = {}
        self._basic_upstream = False

    def close(self) -> None:
        self._session.close()

    # -- public API --------------------------------------------------------------------------

    def head_manifest(
        self,
        name: str,
        reference: str,
        credentials: Credentials | None = None,
        read_timeout: float | None = None,
    ) -> ManifestRef:
        """The manifest's digest, type and size; `read_timeout` overrides the client's own for
        this request (a caller holding a cached copy would rather not wait long)."""
        _check_name(name)
        by_digest = _is_digest(reference)
        resp = self._registry_request(
            "HEAD",
            name,
            f"manifests/{reference}",
            credentials,
            {"Accept": MANIFEST_ACCEPT},
            read_timeout=read_timeout,
        )
        resp.close()
        _raise_for_status(resp, _manifest_label(name, reference))
        digest = resp.headers.get("Docker-Content-Digest", "").strip()
        media_type = _media_type(resp)
        size = _content_length(resp)
        if (
            _DIGEST.fullmatch(digest) is None
            or media_type in _GENERIC_CONTENT_TYPES
            or size is None
        ):
            manifest = self.get_manifest(name, reference, credentials)
            return ManifestRef(manifest.digest, manifest.media_type, manifest.size)
        if by_digest and digest != reference:
            raise UpstreamBadDigest(
                f"upstream reports digest {digest} for manifest {name}@{reference}"
            )
        return ManifestRef(digest, media_type, size)

    def get_manifest(
        self, name: str, reference: str, credentials: Credentials | None = None
    ) -> Manifest:
        _check_name(name)
        by_digest = _is_digest(reference)
        what = _manifest_label(name, reference)
        resp = self._registry_request(
            "GET", name, f"manifests/{reference}", credentials, {"Accept": MANIFEST_ACCEPT}
        )
        _raise_for_status(resp, what)
        try:
            content = _read_capped(resp, MAX_MANIFEST_SIZE, what)
        finally:
            resp.close()
        if by_digest:
            algorithm, expected = _check_digest(reference)
            if hashlib.new(algorithm, content).hexdigest() != expected:
                raise UpstreamBadDigest(f"upstream content for {name}@{reference} does not match")
            digest = reference
        else:
            digest = "sha256:" + hashlib.sha256(content).hexdigest()
            advertised = resp.headers.get("Docker-Content-Digest")
            if advertised and advertised.startswith("sha256:") and advertised != digest:
                log.warning(
                    "upstream %s advertised %s for %s but the bytes hash to %s; using the latter",
                    self.host,
                    advertised,
                    what,
                    digest,
                )
        return Manifest(content, self._manifest_media_type(resp, content, what), digest)

    def head_blob(self, name: str, digest: str, credentials: Credentials | None = None) -> BlobRef:
        _check_name(name)
        _check_digest(digest)
        resp = self._registry_request("HEAD", name, f"blobs/{digest}", credentials, {})
        resp.close()
        _raise_for_status(resp, f"blob {name}@{digest}")
        advertised = resp.headers.get("Docker-Content-Digest")
        if advertised and advertised != digest:
            raise UpstreamBadDigest(f"upstream reports digest {advertised} for blob {digest}")
        size = _content_length(resp)
        if size is None:
            raise UpstreamUnavailable(f"upstream gave no Content-Length for blob {digest}")
        return BlobRef(size, _media_type(resp) or None)

    def open_blob(
        self,
        name: str,
        digest: str,
        credentials: Credentials | None = None,
        byte_range: tuple[int, int | None] | None = None,
    ) -> BlobResponse:
        """Start streaming a blob; ``byte_range`` is (first, last-or-None), both inclusive.

        The status is 200 or 206; a 200 to a range request means the upstream ignored the
        range and the body starts at byte 0.
        """
        _check_name(name)
        _check_digest(digest)
        headers: dict[str, str] = {}
        if byte_range is not None:
            first, last = byte_range
            if first < 0 or (last is not None and last < first):
                raise ValueError(f"invalid byte range {byte_range!r}")
            headers["Range"] = f"bytes={first}-{'' if last is None else last}"
        what = f"blob {name}@{digest}"
        resp = self._registry_request("GET", name, f"blobs/{digest}", credentials, headers)
        _raise_for_status(resp, what)
        if resp.status_code == 200:
            return BlobResponse(resp, _content_length(resp))
        content_range = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if resp.status_code != 206 or byte_range is None or content_range is None:
            resp.close()
            raise UpstreamUnavailable(f"unexpected {resp.status_code} answer for {what}")
        if int(content_range.group(1)) != byte_range[0]:
            resp.close()
            raise UpstreamUnavailable(f"upstream returned the wrong range for {what}")
        total = content_range.group(3)
        return BlobResponse(resp, None if total == "*" else int(total))

    # -- HTTP plumbing -----------------------------------------------------------------------

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        read_timeout: float | None = None,
    ) -> requests.Response:
        """One request with bounded retries; only called before any body reaches the caller."""
        timeout = self._timeout if read_timeout is None else (self._timeout[0], read_timeout)
        attempt = 1
        while True:
            try:
                resp = self._session.request(
                    method,
                    url,
                    headers=headers,
                    timeout=timeout,
                    stream=True,
                    allow_redirects=False,
                )
            except requests.ConnectionError as exc:  # includes connect timeouts
                if attempt == _ATTEMPTS:
                    raise UpstreamUnavailable(f"cannot connect to upstream: {exc}") from exc
            except requests.Timeout as exc:
                # A read timeout already cost the full read_timeout; retrying would double it.
                raise UpstreamTimeout(f"upstream timed out: {exc}") from exc
            except requests.RequestException as exc:
                raise UpstreamUnavailable(f"upstream request failed: {exc}") from exc
            else:
                if resp.status_code not in _RETRY_STATUSES or attempt == _ATTEMPTS:
                    return resp
                resp.close()
            log.info("retrying %s %s (attempt %d failed)", method, url, attempt)
            time.sleep(_RETRY_BACKOFF * attempt)
            attempt += 1

    def _registry_request(
        self,
        method: str,
        name: str,
        path: str,
        credentials: Credentials | None,
        headers: Mapping[str, str],
        read_timeout: float | None = None,
    ) -> requests.Response:
        """Send to ``/v2/<name>/<path>``, handling auth challenges and redirects.

        The caller must close the returned response and check its status.
        """
        creds = credentials if credentials is not None else self.credentials
        url = f"{self.base_url}/v2/{name}/{path}"
        authorization = self._cached_authorization(name, creds)
        resp = self._send(method, url, {**headers, **authorization}, read_timeout)
        if resp.status_code == 401:
            resp.close()
            authorization = self._authorize(name, creds, resp, authorization)
            resp = self._send(method, url, {**headers, **authorization}, read_timeout)
            if resp.status_code == 401 and authorization["Authorization"].startswith("Basic "):
                resp.close()
                raise UpstreamAuthFailed(
                    f"upstream {self.host} rejected the configured credentials", status=401
                )
        return self._follow_redirects(method, resp, headers, authorization, read_timeout)

    def _follow_redirects(
        self,
        method: str,
        resp: requests.Response,
        headers: Mapping[str, str],
        authorization: Mapping[str, str],
        read_timeout: float | None = None,
    ) -> requests.Response:
        # Followed by hand because Docker Hub sends blob GETs to a CDN: we decide per hop
        # whether the registry's Authorization may go along (same origin only).
        hops = 0
        while resp.status_code in _REDIRECT_STATUSES:
            resp.close()
            if hops == _MAX_REDIRECTS:
                raise UpstreamUnavailable(f"more than {_MAX_REDIRECTS} upstream redirects")
            hops += 1
            location = resp.headers.get("Location")
            if not location:
                raise UpstreamUnavailable("upstream redirect without Location", status=502)
            url = urljoin(resp.url, location)
            if urlsplit(url).scheme not in ("http", "https"):
                raise UpstreamUnavailable(f"refusing redirect to non-http URL {url!r}")
            same_origin = _origin(url) == self._origin
            resp = self._send(
                method,
                url,
                {**headers, **authorization} if same_origin else headers,
                read_timeout,
            )
        if _origin(resp.url) != self._origin and resp.status_code in (401, 403):
            resp.close()
            # A storage backend refusing the URL the registry handed us says nothing about
            # whether the blob exists; treat it as the upstream failing.
            raise UpstreamUnavailable(
                f"upstream storage refused the redirected request ({resp.status_code})",
                status=resp.status_code,
            )
        return resp

    # -- authentication ----------------------------------------------------------------------

    def _cached_authorization(self, name: str, creds: Credentials | None) -> dict[str, str]:
        """Authorization to send up front, saving the 401 round trip when we already know it."""
        if self._basic_upstream and creds is not None:
            return {"Authorization": creds.basic_authorization()}
        with self._lock:
            key = self._token_keys.get((name, creds))
            entry = self._tokens.get(key) if key else None
        if entry is not None and entry[1] > time.monotonic():
            return {"Authorization": f"Bearer {entry[0]}"}
        return {}

    def _authorize(
        self,
        name: str,
        creds: Credentials | None,
        resp: requests.Response,
        sent: Mapping[str, str],
    ) -> dict[str, str]:
        """Answer a 401 challenge with fresh Authorization for one retry."""
        challenges = {
            c.scheme: c for c in parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        }
        bearer, basic = challenges.get("bearer"), challenges.get("basic")
        if bearer is not None:
            rejected = sent.get("Authorization", "").removeprefix("Bearer ")
            return {"Authorization": f"Bearer {self._token(name, creds, bearer, rejected)}"}
        if basic is not None:
            if creds is None:
                raise UpstreamAuthFailed(
                    f"upstream {self.host} requires credentials and none are configured",
                    status=401,
                )
            if sent:
                raise UpstreamAuthFailed(
                    f"upstream {self.host} rejected the configured credentials", status=401
                )
            self._basic_upstream = True
            return {"Authorization": creds.basic_authorization()}
        raise UpstreamUnavailable(
            f"upstream {self.host} answered 401 without a usable challenge", status=401
        )

    def _token(
        self, name: str, creds: Credentials | None, challenge: Challenge, rejected: str
    ) -> str:
        realm = challenge.params.get("realm", "")
        realm_parts = urlsplit(realm)
        if realm_parts.scheme not in ("http", "https") or not realm_parts.hostname:
            raise UpstreamUnavailable(f"upstream {self.host} sent an unusable token realm")
        if creds is not None and realm_parts.scheme == "http" and self._origin[0] == "https":
            raise UpstreamUnavailable(
                f"refusing to send credentials to plain-http token realm {realm!r}"
            )
        scope = challenge.params.get("scope") or f"repository:{name}:pull"
        key: _TokenKey = (realm, challenge.params.get("service", ""), scope, creds)
        now = time.monotonic()
        with self._lock:
            self._token_keys[(name, creds)] = key
            cached = self._tokens.get(key)
        # A token the registry just rejected must not be offered again, however fresh.
        if cached is not None and cached[1] > now and cached[0] != rejected:
            return cached[0]

        token, lifetime = self._fetch_token(key)
        margin = min(_TOKEN_EXPIRY_MARGIN, lifetime / 2)
        with self._lock:
            self._tokens[key] = (token, now + lifetime - margin)
            if len(self._tokens) > _TOKEN_CACHE_PRUNE_AT:
                self._prune_tokens(now)
        return token

    def _prune_tokens(self, now: float) -> None:
        self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
        self._token_keys = {k: v for k, v in self._token_keys.items() if v in self._tokens}

    def _fetch_token(self, key: _TokenKey) -> tuple[str, float]:
        """GET the token realm; returns (token, remaining lifetime in seconds)."""
        realm, service, scope, creds = key
        params = [("service", service)] if service else []
        # A challenge may name several space-separated scopes; the token spec wants each as
        # its own scope parameter.
        params += [("scope", s) for s in scope.split()]
        headers = {"Authorization": creds.basic_authorization()} if creds else {}
        url = f"{realm}{'&' if urlsplit(realm).query else '?'}{urlencode(params)}"
        # Not following redirects here keeps our Basic credentials on the realm's host.
        resp = self._send("GET", url, headers)
        status = resp.status_code
        if status in (401, 403):
            resp.close()
            who = f"credentials of {creds.username!r}" if creds else "anonymous access"
            raise UpstreamAuthFailed(f"token endpoint of {self.host} rejected {who}", status=status)
        if status == 429:
            resp.close()
            raise _rate_limited(resp, f"token endpoint of {self.host}")
        if status != 200:
            resp.close()
            raise UpstreamUnavailable(
                f"token endpoint of {self.host} answered {status}", status=status
            )
        try:
            body = json.loads(_read_capped(resp, _MAX_TOKEN_RESPONSE_SIZE, "token response"))
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

    def _manifest_media_type(self, resp: requests.Response, content: bytes, what: str) -> str:
        media_type = _media_type(resp)
        if media_type not in _GENERIC_CONTENT_TYPES:
            return media_type
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        embedded = body.get("mediaType") if isinstance(body, dict) else None
        if not isinstance(embedded, str) or not embedded:
            raise UpstreamUnavailable(f"upstream gave no media type for {what}")
        return embedded


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
