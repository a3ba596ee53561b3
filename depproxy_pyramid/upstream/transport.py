"""HTTP to one upstream: a shared session, timeouts, bounded retries, redirects by hand.

A redirect is upstream telling us where to connect next, so each hop is vetted: only public
addresses, or a configured upstream (`AddressGuard`), checked before the hop and again, pinned,
when its connection is opened (a name that resolves differently the second time gains nothing).
"""

from __future__ import annotations

import contextvars
import http.cookiejar
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import create_connection

from .errors import (
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
_ATTEMPTS = 2
_RETRY_BACKOFF = 0.25  # seconds, multiplied by the attempt number
_RETRY_STATUSES = frozenset({502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


REDIRECT_REFUSED = "upstream redirect refused"


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or ""), parts.port or {"http": 80, "https": 443}.get(scheme)


def _host_port(host: str, port: int | None) -> tuple[str, int | None]:
    return host.strip("[]").rstrip(".").lower(), port


def resolve_addresses(host: str, port: int | None) -> list[str]:
    """Every address `host` resolves to (itself, for an address literal, without any lookup)."""
    try:
        return [str(ipaddress.ip_address(host.split("%", 1)[0]))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public(address: str) -> bool:
    """Whether an address is on the public internet: not loopback, private (RFC 1918, ULA),
    link-local, unspecified, multicast, reserved or shared (CGNAT)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 form of an IPv4 address reaches that IPv4 address.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
    )


class AddressGuard:
    """Where upstream may send us: public addresses, and the configured upstreams.

    A configured upstream counts by host and port as configured, or by an address its host
    resolves to together with its port: the test suite's upstream, say, listens on 127.0.0.1,
    and another port of that address is not it.
    """

    def __init__(self, upstream_urls: Iterable[str]) -> None:
        self._origins = frozenset(_host_port(*origin(url)[1:]) for url in upstream_urls)

    def addresses(self, host: str, port: int | None) -> list[str] | None:
        """The addresses a connection to host:port may use; None for a configured upstream
        (connect as usual). Raises UpstreamInvalid for any other non-public destination."""
        host, port = _host_port(host, port)
        if (host, port) in self._origins:
            return None
        try:
            found = resolve_addresses(host, port)
        except (OSError, UnicodeError) as error:
            raise UpstreamUnavailable(f"cannot resolve redirect target {host!r}: {error}") from None
        internal = {(address, port) for address in found if not is_public(address)}
        if internal and not internal <= self._configured_addresses():
            raise UpstreamInvalid(
                REDIRECT_REFUSED,
                detail=f"redirect to {host}:{port} "
                f"({', '.join(sorted(address for address, _ in internal))}) refused: "
                "not a public address and not a configured upstream",
            )
        return found

    def _configured_addresses(self) -> set[tuple[str, int | None]]:
        # Resolved only when a non-public address shows up, which is rare, so never cached:
        # what a configured name resolves to may change.
        allowed: set[tuple[str, int | None]] = set()
        for host, port in self._origins:
            try:
                allowed.update((address, port) for address in resolve_addresses(host, port))
            except (OSError, UnicodeError):
                continue
        return allowed

    def check(self, url: str) -> None:
        """Refuse a redirect target before anything is sent to it."""
        scheme, host, port = origin(url)
        if scheme not in ("http", "https") or not host:
            raise UpstreamInvalid(
                "upstream redirect to a non-http URL refused",
                detail=f"redirect to a {scheme or 'relative'!r} URL refused",
            )
        self.addresses(host, port)


# The guard of the redirect hop being sent on this thread; connections opened meanwhile are
# vetted and pinned to the addresses vetted.
_hop_guard: contextvars.ContextVar[AddressGuard | None] = contextvars.ContextVar(
    "depproxy_hop_guard", default=None
)


def _guarded_socket(conn: HTTPConnection) -> socket.socket | None:
    """A socket to a vetted address of the connection's host, or None to connect as usual."""
    guard = _hop_guard.get()
    # Through an HTTP(S) proxy the proxy resolves the name; the check before the hop applies.
    if guard is None or conn.proxy is not None:
        return None
    addresses = guard.addresses(conn.host, conn.port)
    if addresses is None:
        return None
    failure: OSError | None = None
    for address in addresses:
        try:
            return create_connection(
                (address, conn.port),
                conn.timeout,
                source_address=conn.source_address,
                socket_options=conn.socket_options,
            )
        except TimeoutError as error:
            raise ConnectTimeoutError(conn, f"connection to {conn.host} timed out") from error
        except OSError as error:
            failure = error
    raise NewConnectionError(conn, f"failed to establish a new connection: {failure}")


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _guarded_socket(self) or super()._new_conn()


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _guarded_socket(self) or super()._new_conn()


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


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


# Idle connections kept per upstream host. The default, 10, is far below the requests a fleet's
# cold pull sends at once; each connection over it was discarded after one request, and the
# next request paid for a new TCP and TLS handshake.
CONNECTIONS_KEPT = 64


class Transport:
    """One `requests.Session` per upstream, safe to share between threads."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
        guard: AddressGuard | None = None,
    ) -> None:
        self.origin = origin(base_url)
        self.guard = guard if guard is not None else AddressGuard([base_url])
        self._timeout = (connect_timeout, read_timeout)
        self._session = requests.Session()
        for prefix in ("http://", "https://"):
            self._session.mount(prefix, _GuardedAdapter(pool_maxsize=CONNECTIONS_KEPT))
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
    ) -> requests.Response:
        """One request with bounded retries; only called before any body reaches the caller."""
        attempt = 1
        while True:
            try:
                resp = self._session.request(
                    method,
                    url,
                    headers=headers,
                    timeout=self._timeout,
                    stream=True,
                    allow_redirects=False,
                )
            except requests.ConnectionError as exc:  # includes connect timeouts
                if attempt == _ATTEMPTS:
                    raise UpstreamUnreachable(f"cannot connect to upstream: {exc}") from exc
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

    def send_vetted(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
    ) -> requests.Response:
        """`send` to a URL that upstream named (a redirect target, a token realm): only to a
        public address or a configured upstream, and connected to the very addresses vetted."""
        self.guard.check(url)
        vetting = _hop_guard.set(self.guard)
        try:
            return self.send(method, url, headers)
        finally:
            _hop_guard.reset(vetting)

    def follow_redirects(
        self,
        method: str,
        resp: requests.Response,
        headers: Mapping[str, str],
        authorization: Mapping[str, str],
    ) -> requests.Response:
        # Followed by hand because Docker Hub sends blob GETs to a CDN: we decide per hop
        # whether the registry's Authorization may go along (same origin only).
        hops = 0
        while resp.status_code in _REDIRECT_STATUSES:
            resp.close()
            if hops == _MAX_REDIRECTS:
                raise UpstreamInvalid(
                    "upstream sent too many redirects",
                    detail=f"more than {_MAX_REDIRECTS} redirects, the last from {resp.url}",
                )
            hops += 1
            location = resp.headers.get("Location")
            if not location:
                raise UpstreamInvalid(
                    "upstream sent a redirect without Location", detail=f"from {resp.url}"
                )
            url = urljoin(resp.url, location)
            same_origin = origin(url) == self.origin
            resp = self.send_vetted(
                method,
                url,
                {**headers, **authorization} if same_origin else headers,
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
