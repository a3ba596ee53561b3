"""`pserve` server runner: waitress, answering TLS probes on a plain-HTTP port at once.

Docker, containerd and skopeo try HTTPS first when a registry is marked insecure and fall back
to HTTP only after their 10-second TLS handshake timeout, because waitress waits for a request
line that a ClientHello never completes. Like Go's net/http, this answers such a connection with
a plain 400 and closes it, so clients fall back to HTTP immediately.
"""

from __future__ import annotations

import contextlib

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, MultiSocketServer, create_server

TLS_HANDSHAKE_RECORD = 0x16
TLS_PROBE_ANSWER = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"Client sent an HTTPS request to an HTTP server.\n"
)


class PlainHTTPChannel(HTTPChannel):
    seen_data = False

    def received(self, data: bytes) -> bool:
        if not self.seen_data and data:
            self.seen_data = True
            # No HTTP method starts with this byte; every TLS connection does.
            if data[0] == TLS_HANDSHAKE_RECORD:
                with contextlib.suppress(OSError):
                    self.socket.send(TLS_PROBE_ANSWER)
                self.handle_close()
                return False
        return super().received(data)


def serve(app, global_conf: dict, **settings: str) -> None:
    """The `[server:main]` runner: `use = egg:depproxy-pyramid#main` takes waitress's options."""
    server = create_server(app, **settings)
    servers = server.map.values() if isinstance(server, MultiSocketServer) else [server]
    for each in servers:
        if isinstance(each, BaseWSGIServer):
            each.channel_class = PlainHTTPChannel
    server.print_listen("Serving on http://{}:{}")
    server.run()
