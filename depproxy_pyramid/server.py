"""`pserve` server runner: waitress, with two changes for a registry's traffic.

- TLS probes on a plain-HTTP port are answered at once. Docker, containerd and skopeo try HTTPS
  first when a registry is marked insecure and fall back to HTTP only after their 10-second TLS
  handshake timeout, because waitress waits for a request line that a ClientHello never
  completes. Like Go's net/http, this answers such a connection with a plain 400 and closes it.
- Cached blobs handed over as `wsgi.file_wrapper` are sent with `sendfile(2)`. Waitress itself
  reads a socket buffer's worth of the file for every send attempt and seeks back over what the
  socket did not take, which copies a layer several times through Python.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from contextlib import suppress

from waitress.buffers import ReadOnlyFileBasedBuffer
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
                with suppress(OSError):
                    self.socket.send(TLS_PROBE_ANSWER)
                self.handle_close()
                return False
        return super().received(data)

    def _flush_some(self, do_close: bool = True) -> bool:
        """Waitress's own loop over its output buffers, with sendfile for file buffers.

        Called with `outbuf_lock` held. Returns whether anything was sent.
        """
        sent = False
        while True:
            outbuf = self.outbufs[0]
            if isinstance(outbuf, ReadOnlyFileBasedBuffer) and hasattr(outbuf.file, "fileno"):
                sent = self._sendfile(outbuf, do_close) or sent
                blocked = outbuf.remain > 0
            else:
                blocked = False
                remaining = outbuf.__len__()  # len() overflows past 2**31 on 32-bit builds
                while remaining > 0:
                    count = self.send(outbuf.get(self.sendbuf_len), do_close=do_close)
                    if not count:
                        blocked = True
                        break
                    outbuf.skip(count, True)
                    remaining -= count
                    self.total_outbufs_len -= count
                    sent = True
            if blocked or len(self.outbufs) == 1:
                break
            # The last buffer always stays: it is the one the task thread appends to.
            finished = self.outbufs.pop(0)
            try:
                finished.close()
            except Exception:
                self.logger.exception("Unexpected error when closing an outbuf")
        if sent:
            self.last_activity = time.time()
        return sent

    def _sendfile(self, outbuf: ReadOnlyFileBasedBuffer, do_close: bool) -> bool:
        sent = False
        while outbuf.remain > 0:
            offset = outbuf.file.tell()
            try:
                count = os.sendfile(
                    self.socket.fileno(), outbuf.file.fileno(), offset, outbuf.remain
                )
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    raise
                self._abandon(outbuf, do_close)
                break
            if count == 0:
                # The file is shorter than the response announced: the client must not wait.
                self._abandon(outbuf, do_close=True)
                break
            outbuf.file.seek(offset + count)
            outbuf.remain -= count
            self.total_outbufs_len -= count
            sent = True
        return sent

    def _abandon(self, outbuf: ReadOnlyFileBasedBuffer, do_close: bool) -> None:
        """Nothing more of this buffer can be sent; waitress must not read the file for it."""
        self.total_outbufs_len -= outbuf.remain
        outbuf.remain = 0
        if do_close:
            self.handle_close()


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(app, global_conf: dict, **settings: str) -> None:
    """The `[server:main]` runner: `use = egg:depproxy-pyramid#main` takes waitress's options."""
    # SIGTERM (docker stop, systemd) shuts down as Ctrl-C does, so the application's exit work
    # runs: the batched read_at updates are written, not lost with the process.
    signal.signal(signal.SIGTERM, _stop)
    server = create_server(app, **settings)
    servers = server.map.values() if isinstance(server, MultiSocketServer) else [server]
    for each in servers:
        if isinstance(each, BaseWSGIServer):
            each.channel_class = PlainHTTPChannel
    server.print_listen("Serving on http://{}:{}")
    server.run()
