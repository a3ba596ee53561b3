"""`pserve` server runner: waitress, with defaults and three fixes for a registry's traffic.

Waitress was chosen on measurements (docs/benchmarks.md): it serves every connection from one
event loop and runs only the application on its threads, so an idle, slow or non-reading client
holds a socket and a buffer, never a thread, once its response has been handed over (a cached
blob is handed over whole, as `wsgi.file_wrapper`). The defaults below bound what such clients
can hold; an `.ini`'s `[server:main]` overrides any of them.

What the channel adds, each for a request that waitress would otherwise leave hanging:
- TLS probes on a plain-HTTP port. Docker, containerd and skopeo try HTTPS first when a registry
  is marked insecure and fall back to HTTP only after their 10-second TLS handshake timeout,
  because waitress waits for a request line that a ClientHello never completes. Like Go's
  net/http, this answers such a connection with a plain 400 and closes it.
- Header lines ended by a bare LF. Waitress looks for CRLF CRLF only, so such a request is never
  complete; it gets a 400 at once.
- `Expect: 100-continue` on a request without a body. Waitress sends `100 Continue` and then
  waits for a body that never comes; such a request is served at once, with no interim answer.
- A request head trickling in. Waitress waits as long as bytes keep coming; a head that takes
  longer than `REQUEST_HEAD_TIMEOUT` gets a 408 when its next bytes arrive (a client that sends
  nothing more is idle, and closed as such).
"""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import time
from contextlib import suppress

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, MultiSocketServer, create_server

from .metrics import forget_this_process

TLS_HANDSHAKE_RECORD = 0x16
TLS_PROBE_ANSWER = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"Client sent an HTTPS request to an HTTP server.\n"
)


def _error_answer(status: bytes, code: str, message: str) -> bytes:
    """A complete HTTP answer carrying a registry error, for a connection about to close."""
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()
    return (
        b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body)
    )


BARE_LF_ANSWER = _error_answer(
    b"400 Bad Request", "UNSUPPORTED", "malformed request: header lines must end with CRLF"
)
# Seconds a client may take to send a request's head, as nginx's client_header_timeout: a client
# trickling bytes would otherwise keep its connection for as long as it likes.
REQUEST_HEAD_TIMEOUT = 10
HEAD_TIMEOUT_ANSWER = _error_answer(
    b"408 Request Timeout",
    "UNSUPPORTED",
    f"the request head took longer than {REQUEST_HEAD_TIMEOUT} seconds to arrive",
)

# How long Linux keeps a connection whose peer acknowledges nothing, a client that stopped
# reading included (its receive window stays shut). Waitress closes idle connections only when
# their socket can be written, which a non-reading client's never can; and a response still
# being produced (a blob streaming from upstream) keeps its thread while the socket is full.
UNACKNOWLEDGED_TIMEOUT_MS = 20_000

M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2

DEFAULTS = {
    # Requests waiting on upstream take at most depproxy.upstream.max_in_flight (192) of them,
    # so cached requests always find one free; the rest is for a cold pull by a whole CI fleet
    # at once, every client of one blob waiting on its single upstream transfer. 256 idle
    # threads cost 6 MiB more than 64.
    "threads": "256",
    # Connections cost a socket and a small buffer each; idle ones are closed within seconds.
    "connection_limit": "1000",
    "channel_timeout": "10",
    "cleanup_interval": "2",
    # select() cannot watch descriptors numbered past 1024.
    "asyncore_use_poll": "true",
    # A body streaming from upstream waits when 4 MiB of it are buffered for the client, and
    # that buffer stays in memory: by default waitress spilled everything past 1 MB of it to a
    # temporary file, writing and reading each byte of a cold blob once more.
    "outbuf_high_watermark": str(4 * 1024 * 1024),
    "outbuf_overflow": str(8 * 1024 * 1024),
    # The app decides itself whose X-Forwarded-For to believe (`depproxy.trusted_proxies`);
    # waitress would otherwise delete the header first, and behind nginx every client would
    # share nginx's address, and its sign-in limit.
    "clear_untrusted_proxy_headers": "false",
}


class RegistryChannel(HTTPChannel):
    # When the first byte of the request head being read arrived; None between requests.
    head_started: float | None = None
    # The end of the previous read, so that a line ending split between reads is seen whole.
    head_tail = b""

    def received(self, data: bytes) -> bool:
        if not data:
            return False
        if self.request is None or not self.request.headers_finished:
            if self.head_started is None:
                # No HTTP method starts with this byte; every TLS connection does.
                if data[0] == TLS_HANDSHAKE_RECORD:
                    return self._refuse(TLS_PROBE_ANSWER)
                self.head_started = time.monotonic()
            elif time.monotonic() - self.head_started > REQUEST_HEAD_TIMEOUT:
                return self._refuse(HEAD_TIMEOUT_ANSWER)
            if _has_bare_lf(self.head_tail + data):
                return self._refuse(BARE_LF_ANSWER)
            self.head_tail = (self.head_tail + data)[-3:]
        handled = super().received(data)
        if self.request is None:
            self.head_started, self.head_tail = None, b""
        return handled

    def send_continue(self) -> None:
        if self.request.completed:
            # Nothing to continue to: the request has no body and is ready to be served.
            self.request.expect_continue = False
            return
        super().send_continue()

    def _refuse(self, answer: bytes) -> bool:
        with suppress(OSError):
            self.socket.send(answer)
        self.handle_close()
        return False


def _has_bare_lf(data: bytes) -> bool:
    """Whether the head of a request in `data` has an LF that no CR precedes.

    Only the bytes up to the blank line that ends the head are looked at: a body may hold
    anything.
    """
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    return head.count(b"\n") != head.count(b"\r\n")


def _limit_malloc_arenas(count: int) -> None:
    """Have glibc share `count` malloc arenas among all threads.

    By default each of the server's threads that allocates gets an arena of its own (up to 8
    per core), and each arena keeps the blob-sized buffers it freed: after a few seconds of
    cached blob traffic the process held 246 MiB instead of 140 MiB with two arenas, serving as
    fast (`bench/servers.py`). Other C libraries have no such call, and need none.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, count)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(app, global_conf: dict, **settings: str) -> None:
    """The `[server:main]` runner: `use = egg:depproxy-pyramid#main` takes waitress's options."""
    # SIGTERM (docker stop, systemd) shuts down as Ctrl-C does, so the application's exit work
    # runs: the batched read_at updates are written, not lost with the process.
    signal.signal(signal.SIGTERM, _stop)
    _limit_malloc_arenas(MALLOC_ARENAS)
    server = create_server(app, **{**DEFAULTS, **settings})
    servers = server.map.values() if isinstance(server, MultiSocketServer) else [server]
    for each in servers:
        if isinstance(each, BaseWSGIServer):
            each.channel_class = RegistryChannel
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                # Applied to each accepted connection; not settable from an ini file.
                each.adj.socket_options = [
                    *each.adj.socket_options,
                    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, UNACKNOWLEDGED_TIMEOUT_MS),
                ]
    server.print_listen("Serving on http://{}:{}")
    try:
        server.run()
    finally:
        # With metrics shared between a node's processes, those of a stopped one must not
        # show requests in flight (or a breaker state) forever.
        forget_this_process()
