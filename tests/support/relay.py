"""A counting, fault-injecting HTTP reverse proxy between the proxy under test and upstream.

The proxy under test is pointed at the relay instead of the registry so tests can
assert exactly what reached upstream ("the second pull made no blob GET") and can
make upstream misbehave (down, 503, 429, corrupt/truncated/stalled blobs, hung
requests) at any moment from the test thread. Bodies are streamed in 64 KiB chunks,
so a 200 MB blob costs no memory; headers (Host, Authorization, WWW-Authenticate,
Range, ...) pass through untouched.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHUNK = 64 * 1024
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_MANIFEST_PATH = re.compile(r"^/v2/.+/manifests/[^/]+$")
_TAGS_PATH = re.compile(r"^/v2/.+/tags/list$")
_REFERRERS_PATH = re.compile(r"^/v2/.+/referrers/[^/]+$")
_BLOB_PATH = re.compile(r"^/v2/.+/blobs/(?P<digest>[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-fA-F0-9]+)$")


class Fault(StrEnum):
    """How the relay misbehaves; blob faults only touch blob bodies (200/206 GETs)."""

    NORMAL = "normal"
    DOWN = "down"  # connection reset without a response
    STATUS_503 = "status_503"
    STATUS_429 = "status_429"  # with Retry-After: 7
    CORRUPT_BLOBS = "corrupt_blobs"  # first body byte flipped, Content-Length kept
    TRUNCATE_BLOBS = "truncate_blobs"  # full Content-Length, half the body, then close
    STALL_BLOBS = "stall_blobs"  # half the body, then hang until released or timeout
    THROTTLE_BLOBS = "throttle_blobs"  # the whole body, at throttle_bytes_per_second each
    SLOW = "slow"  # delay before forwarding
    HANG = "hang"  # read the request, never answer; close when released or after stall_seconds


BLOB_FAULTS = frozenset(
    {Fault.CORRUPT_BLOBS, Fault.TRUNCATE_BLOBS, Fault.STALL_BLOBS, Fault.THROTTLE_BLOBS}
)
_STATUS_FAULTS: dict[Fault, tuple[int, str, dict[str, str]]] = {
    Fault.STATUS_503: (503, "UNAVAILABLE", {}),
    Fault.STATUS_429: (429, "TOOMANYREQUESTS", {"Retry-After": "7"}),
}


def classify(path: str) -> str:
    """Kind of a request path: ``manifest``, ``blob``, ``tags``, ``referrers``, ``token`` or
    ``other``."""
    path = path.split("?", 1)[0]
    if _MANIFEST_PATH.match(path):
        return "manifest"
    if _BLOB_PATH.match(path):
        return "blob"
    if _TAGS_PATH.match(path):
        return "tags"
    if _REFERRERS_PATH.match(path):
        return "referrers"
    if path == "/token":
        return "token"
    return "other"


@dataclass(frozen=True)
class RelayedRequest:
    """A request the relay received, and the fault mode in force when it arrived."""

    method: str
    path: str
    kind: str
    fault: Fault
    accept: str | None = None
    # Whether it carried credentials: a request without is usually answered with a challenge
    # and sent again with a token.
    authorized: bool = False

    @property
    def digest(self) -> str | None:
        """The blob digest for blob requests, else None."""
        match = _BLOB_PATH.match(self.path.split("?", 1)[0])
        return match["digest"] if match else None


class Relay:
    """Threaded reverse proxy on a free 127.0.0.1 port, forwarding to ``upstream_port``."""

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        stall_seconds: float = 300.0,
        slow_seconds: float = 1.0,
        throttle_bytes_per_second: int = 1 << 20,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.stall_seconds = stall_seconds
        self.slow_seconds = slow_seconds
        self.throttle_bytes_per_second = throttle_bytes_per_second
        self._lock = threading.Lock()
        self._mode = Fault.NORMAL
        self._fault_kinds: frozenset[str] | None = None
        self._requests: list[RelayedRequest] = []
        self._body_bytes_sent = 0
        self._release = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL the proxy under test should use as its upstream."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as used in ``docker://`` references."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"relay-{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting connections and let stalled responses finish."""
        self._release.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    @property
    def mode(self) -> Fault:
        """The fault mode in force."""
        return self._mode

    def set_mode(self, mode: Fault | str, kinds: Collection[str] | None = None) -> None:
        """Switch fault mode, optionally only for some request kinds (e.g. ``{"blob"}``).

        Entering :attr:`Fault.STALL_BLOBS` or :attr:`Fault.HANG` re-arms the stall; any other
        mode releases responses that are still stalled or hung.
        """
        mode = Fault(mode)
        with self._lock:
            self._mode = mode
            self._fault_kinds = frozenset(kinds) if kinds is not None else None
            if mode in (Fault.STALL_BLOBS, Fault.HANG):
                self._release.clear()
            else:
                self._release.set()

    @contextlib.contextmanager
    def fault(self, mode: Fault | str, kinds: Collection[str] | None = None) -> Iterator[None]:
        """Apply a fault mode for the duration of a ``with`` block, then go back to normal."""
        self.set_mode(mode, kinds)
        try:
            yield
        finally:
            self.set_mode(Fault.NORMAL)

    def release_stalled(self) -> None:
        """Close every stalled response now, without the rest of the body, and every hung
        request without an answer.

        Until :attr:`Fault.STALL_BLOBS` or :attr:`Fault.HANG` is set again, further stalls
        close at once (like :attr:`Fault.TRUNCATE_BLOBS`), and so do further hung requests.
        """
        self._release.set()

    def reset_counts(self) -> None:
        """Forget recorded requests and the bytes sent."""
        with self._lock:
            self._requests.clear()
            self._body_bytes_sent = 0

    @property
    def body_bytes_sent(self) -> int:
        """Response body bytes relayed to clients since the last reset (headers not counted)."""
        with self._lock:
            return self._body_bytes_sent

    def _count_sent(self, size: int) -> None:
        with self._lock:
            self._body_bytes_sent += size

    @property
    def requests(self) -> list[RelayedRequest]:
        """A snapshot of every request received since the last reset, in order."""
        with self._lock:
            return list(self._requests)

    def count(self, method: str | None = None, kind: str | None = None) -> int:
        """Requests received with this method and/or kind (None matches any)."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and (kind is None or r.kind == kind)
        )

    def blob_fetches(self, method: str = "GET") -> Counter[str]:
        """How often each blob digest was requested with ``method``."""
        return Counter(r.digest for r in self.requests if r.method == method and r.digest)

    def blob_downloads(self) -> Counter[str]:
        """How often each blob's bytes were asked for: GETs with credentials. A proxy's first
        GET of a repository goes without a token and is answered with a challenge."""
        return Counter(
            r.digest for r in self.requests if r.method == "GET" and r.digest and r.authorized
        )

    def _fault_for(self, kind: str) -> Fault:
        """The fault that applies to a request of ``kind`` under the current mode."""
        with self._lock:
            mode, kinds = self._mode, self._fault_kinds
        if kinds is not None and kind not in kinds:
            return Fault.NORMAL
        if mode in BLOB_FAULTS and kind != "blob":
            return Fault.NORMAL
        return mode

    def _record(self, request: RelayedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._relay()

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

            def _relay(self) -> None:
                kind = classify(self.path)
                fault = relay._fault_for(kind)
                relay._record(
                    RelayedRequest(
                        self.command,
                        self.path,
                        kind,
                        fault,
                        self.headers["Accept"],
                        "Authorization" in self.headers,
                    )
                )
                if fault is Fault.DOWN:
                    self._reset()
                    return
                if fault is Fault.HANG:
                    # The connection is accepted and the request read: only the answer is missing,
                    # as from an upstream whose backend is wedged.
                    relay._release.wait(relay.stall_seconds)
                    self.close_connection = True
                    return
                if fault in _STATUS_FAULTS:
                    self._send_status_fault(*_STATUS_FAULTS[fault])
                    return
                if fault is Fault.SLOW:
                    time.sleep(relay.slow_seconds)
                upstream = http.client.HTTPConnection(
                    relay.upstream_host, relay.upstream_port, timeout=60
                )
                try:
                    response = self._forward_request(upstream)
                except OSError:
                    # Upstream unreachable (e.g. registry stopped): look like it to the client.
                    self._reset()
                    return
                try:
                    self._forward_response(response, fault)
                except (OSError, http.client.HTTPException):
                    # Upstream or client went away mid-body; the client sees a short read.
                    self.close_connection = True
                finally:
                    upstream.close()

            def _forward_request(
                self, upstream: http.client.HTTPConnection
            ) -> http.client.HTTPResponse:
                upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        upstream.putheader(name, value)
                chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
                if chunked:
                    upstream.putheader("Transfer-Encoding", "chunked")
                upstream.endheaders()
                if chunked:
                    for chunk in self._read_chunked_body():
                        upstream.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    upstream.send(b"0\r\n\r\n")
                else:
                    remaining = int(self.headers.get("Content-Length", 0))
                    while remaining:
                        chunk = self.rfile.read(min(CHUNK, remaining))
                        if not chunk:
                            raise ConnectionError("client closed during request body")
                        upstream.send(chunk)
                        remaining -= len(chunk)
                return upstream.getresponse()

            def _read_chunked_body(self) -> Iterator[bytes]:
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # skip trailers
                        return
                    while size:
                        chunk = self.rfile.read(min(CHUNK, size))
                        size -= len(chunk)
                        yield chunk
                    self.rfile.readline()

            def _forward_response(self, response: http.client.HTTPResponse, fault: Fault) -> None:
                self.send_response_only(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                has_body = self.command != "HEAD" and response.status not in (204, 304)
                length = response.getheader("Content-Length")
                chunked = has_body and length is None
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if not has_body:
                    return
                if fault in BLOB_FAULTS and response.status in (200, 206) and length:
                    self._send_faulty_body(response, int(length), fault)
                    return
                while chunk := response.read(CHUNK):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                    relay._count_sent(len(chunk))
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")

            def _send_faulty_body(
                self, response: http.client.HTTPResponse, length: int, fault: Fault
            ) -> None:
                if fault is Fault.THROTTLE_BLOBS:
                    self._send_throttled_body(response)
                    return
                limit = length if fault is Fault.CORRUPT_BLOBS else length // 2
                sent = 0
                while sent < limit and (chunk := response.read(min(CHUNK, limit - sent))):
                    if sent == 0 and fault is Fault.CORRUPT_BLOBS:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    self.wfile.write(chunk)
                    relay._count_sent(len(chunk))
                    sent += len(chunk)
                if fault is Fault.CORRUPT_BLOBS:
                    return
                self.wfile.flush()
                if fault is Fault.STALL_BLOBS:
                    relay._release.wait(relay.stall_seconds)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            def _send_throttled_body(self, response: http.client.HTTPResponse) -> None:
                # Paced against the start, not per chunk, so the rate holds however long each
                # write blocks.
                started = time.monotonic()
                sent = 0
                while chunk := response.read(CHUNK):
                    self.wfile.write(chunk)
                    relay._count_sent(len(chunk))
                    sent += len(chunk)
                    ahead = sent / relay.throttle_bytes_per_second - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)

            def _send_status_fault(self, status: int, code: str, headers: dict[str, str]) -> None:
                body = json.dumps(
                    {"errors": [{"code": code, "message": f"relay fault {status}"}]}
                ).encode()
                self.send_response_only(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.close_connection = True

            def _reset(self) -> None:
                """Drop the connection with a TCP RST, as a dead upstream would."""
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()

            def log_message(self, format: str, *args: Any) -> None:
                """Keep pytest output clean; requests are recorded in ``relay.requests``."""

        return Handler
