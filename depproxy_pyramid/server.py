"""`pserve` server runner: waitress, with defaults and three fixes for a registry's traffic.

Waitress was chosen on measurements (docs/benchmarks.md): it serves every connection from one
event loop and runs only the application on its threads, so an idle, slow or non-reading client
holds a socket and a buffer, never a thread, once its response has been handed over (a cached
blob is handed over whole, as `wsgi.file_wrapper`). The defaults below bound what such clients
can hold; an `.ini`'s `[server:main]` overrides any of them.

What the channel fixes, each a request that waitress would otherwise leave hanging:
- TLS probes on a plain-HTTP port. Docker, containerd and skopeo try HTTPS first when a registry
  is marked insecure and fall back to HTTP only after their 10-second TLS handshake timeout,
  because waitress waits for a request line that a ClientHello never completes. Like Go's
  net/http, this answers such a connection with a plain 400 and closes it.
- Header lines ended by a bare LF. Waitress looks for CRLF CRLF only, so such a request is never
  complete; it gets a 400 at once.
- `Expect: 100-continue` on a request without a body. Waitress sends `100 Continue` and then
  waits for a body that never comes; such a request is served at once, with no interim answer.
"""

from __future__ import annotations

import json
import socket
from contextlib import suppress

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, MultiSocketServer, create_server

TLS_HANDSHAKE_RECORD = 0x16
TLS_PROBE_ANSWER = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"Client sent an HTTPS request to an HTTP server.\n"
)
BARE_LF_BODY = json.dumps(
    {
        "errors": [
            {
                "code": "UNSUPPORTED",
                "message": "malformed request: header lines must end with CRLF",
                "detail": None,
            }
        ]
    }
).encode()
BARE_LF_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BARE_LF_BODY), BARE_LF_BODY)
)

# How long Linux keeps a connection whose peer acknowledges nothing, a client that stopped
# reading included (its receive window stays shut). Waitress closes idle connections only when
# their socket can be written, which a non-reading client's never can; and a response still
# being produced (a blob streaming from upstream) keeps its thread while the socket is full.
UNACKNOWLEDGED_TIMEOUT_MS = 20_000

DEFAULTS = {
    # Threads that wait on upstream are bounded below this by depproxy.upstream.max_in_flight,
    # so cached requests always find one; an idle thread costs about 100 KiB.
    "threads": "64",
    # Connections cost a socket and a small buffer each; idle ones are closed within seconds.
    "connection_limit": "1000",
    "channel_timeout": "10",
    "cleanup_interval": "2",
    # select() cannot watch descriptors numbered past 1024.
    "asyncore_use_poll": "true",
    # The app decides itself whose X-Forwarded-For to believe (`depproxy.trusted_proxies`);
    # waitress would otherwise delete the header first, and behind nginx every client would
    # share nginx's address, and its sign-in limit.
    "clear_untrusted_proxy_headers": "false",
}


class RegistryChannel(HTTPChannel):
    header_bytes_seen = 0
    # The end of the previous read, so that a line ending split between reads is seen whole.
    head_tail = b""

    def received(self, data: bytes) -> bool:
        if not data:
            return False
        # No HTTP method starts with this byte; every TLS connection does.
        if self.request is None and self.header_bytes_seen == 0 and data[0] == TLS_HANDSHAKE_RECORD:
            return self._refuse(TLS_PROBE_ANSWER)
        if self.request is None or not self.request.headers_finished:
            if _has_bare_lf(self.head_tail + data):
                return self._refuse(BARE_LF_ANSWER)
            self.header_bytes_seen += len(data)
            self.head_tail = (self.head_tail + data)[-3:]
        handled = super().received(data)
        if self.request is None:
            self.header_bytes_seen, self.head_tail = 0, b""
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


def serve(app, global_conf: dict, **settings: str) -> None:
    """The `[server:main]` runner: `use = egg:depproxy-pyramid#main` takes waitress's options."""
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
    server.run()
