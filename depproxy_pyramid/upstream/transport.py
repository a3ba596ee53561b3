"""HTTP to one upstream: a shared session, timeouts, bounded retries, redirects by hand."""

from __future__ import annotations

import http.cookiejar
import logging
import math
import time
from collections.abc import Iterator, Mapping
from email.utils import parsedate_to_datetime
from types import TracebackType
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from .errors import UpstreamNotFound, UpstreamRateLimited, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
_ATTEMPTS = 2
_RETRY_BACKOFF = 0.25  # seconds, multiplied by the attempt number
_RETRY_STATUSES = frozenset({502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or ""), parts.port or {"http": 80, "https": 443}.get(scheme)


def content_type_of(resp: requests.Response) -> str:
    return resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def content_length(resp: requests.Response) -> int | None:
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


def read_capped(resp: requests.Response, limit: int, what: str) -> bytes:
    length = content_length(resp)
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


def rate_limited(resp: requests.Response, what: str) -> UpstreamRateLimited:
    return UpstreamRateLimited(
        f"upstream rate limit hit for {what}",
        retry_after=_retry_after(resp.headers.get("Retry-After")),
    )


def raise_for_status(resp: requests.Response, what: str) -> None:
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
        raise rate_limited(resp, what)
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


class Transport:
    """One `requests.Session` per upstream, safe to share between threads."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
    ) -> None:
        self.origin = origin(base_url)
        self._timeout = (connect_timeout, read_timeout)
        self._session = requests.Session()
        # Identity encoding keeps Content-Length and the bytes we hash equal to what is stored.
        self._session.headers.update({"User-Agent": user_agent, "Accept-Encoding": "identity"})
        # Requests for different groups (credentials) share this session, so a cookie set on
        # behalf of one must never ride along on another's request.
        self._session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))

    def close(self) -> None:
        self._session.close()

    def send(
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

    def follow_redirects(
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
            same_origin = origin(url) == self.origin
            resp = self.send(
                method,
                url,
                {**headers, **authorization} if same_origin else headers,
                read_timeout,
            )
        if origin(resp.url) != self.origin and resp.status_code in (401, 403):
            resp.close()
            # A storage backend refusing the URL the registry handed us says nothing about
            # whether the blob exists; treat it as the upstream failing.
            raise UpstreamUnavailable(
                f"upstream storage refused the redirected request ({resp.status_code})",
                status=resp.status_code,
            )
        return resp
