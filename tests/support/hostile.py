"""A hostile upstream registry: a real HTTP server on 127.0.0.1 that misbehaves on purpose.

It answers ``/v2/`` without authentication (anonymous pulls, no token flow) and, per repository:

- ``redirect/<target>``: manifests and blobs answer 307 to an internal address (``TARGETS``):
  another loopback port serving an HTML page (the ``internal`` server, which counts every
  request it gets), the cloud metadata address, an RFC 1918 address, ``localhost`` and ``[::1]``.
  Nothing here ever connects anywhere: the non-loopback targets must be refused unconnected.
- ``realm/<target>``: every request answers 401 with a Bearer challenge whose token realm is
  that internal address.
- ``html/page``: a "manifest" that is an HTML page (``Content-Type: text/html``);
  ``html/json``: a JSON object with a generic type that is no manifest.
- ``endless/blob``: any blob is an endless chunked stream of zeros.
- ``huge/blob``: any blob declares ``Content-Length: 1099511627776`` (HEAD and GET).
- ``corrupt/blob``: any blob is ``CORRUPT`` (whose digest is not the one asked for);
  ``good/blob``: the blob ``GOOD_DIGEST`` is ``GOOD``.

Body bytes sent are counted per path (``sent``). The send buffer is kept small, so the count
is what the client took, give or take the receiving socket's buffer, not what the kernel
buffered on this side.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TERABYTE = 1024**4
CHUNK = 64 * 1024
SEND_BUFFER = 32 * 1024
# A stream nobody cuts ends here, so a broken proxy fails its test instead of hanging it.
ENDLESS_SAFETY_LIMIT = 512 * 1024**2
GOOD = os.urandom(3 * 1024 * 1024 + 5)
GOOD_DIGEST = "sha256:" + hashlib.sha256(GOOD).hexdigest()
CORRUPT = os.urandom(2 * 1024 * 1024)
HTML = b"<!doctype html><html><head><title>Admin</title></head><body>internal</body></html>"
_MANIFEST_OR_BLOB = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler], owner: HostileRegistry) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.owner = owner
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, name=f"hostile-{self.port}")
        self.thread.daemon = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    @property
    def owner(self) -> HostileRegistry:
        return self.server.owner

    def answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.send_body(body)

    def send_body(self, data: bytes) -> bool:
        """Send and count; False once the client has gone away."""
        try:
            self.wfile.write(data)
        except OSError:
            self.close_connection = True
            return False
        self.owner.count_sent(self.path, len(data))
        return True


class _InternalHandler(_Handler):
    """Something that must never be reached from outside: an internal admin page."""

    def do_GET(self) -> None:
        self.owner.record_internal(self.command, self.path)
        self.answer(200, {"Content-Type": "text/html"}, HTML)

    do_HEAD = do_GET


class _HostileHandler(_Handler):
    def do_GET(self) -> None:
        self.owner.record(self.command, self.path)
        if self.path in ("/v2/", "/v2"):
            self.answer(200, {"Content-Type": "application/json"}, b"{}")
            return
        match = _MANIFEST_OR_BLOB.match(self.path)
        if match is None:
            self.not_found()
            return
        name, kind = match["name"], match["kind"]
        group, _, target = name.partition("/")
        if group == "redirect" and target in self.owner.targets:
            self.answer(307, {"Location": self.owner.targets[target]})
        elif group == "realm" and target in self.owner.targets:
            challenge = f'Bearer realm="{self.owner.targets[target]}",service="hostile"'
            self.answer(401, {"WWW-Authenticate": challenge})
        elif name == "html/page" and kind == "manifests":
            self.answer(200, {"Content-Type": "text/html; charset=utf-8"}, HTML)
        elif name == "html/json" and kind == "manifests":
            body = json.dumps({"hello": "world", "links": ["http://10.0.0.1/"]}).encode()
            self.answer(200, {"Content-Type": "application/json"}, body)
        elif name == "endless/blob" and kind == "blobs":
            self.endless()
        elif name == "huge/blob" and kind == "blobs":
            self.huge()
        elif name == "corrupt/blob" and kind == "blobs":
            self.answer(200, {"Content-Type": "application/octet-stream"}, CORRUPT)
        elif name == "good/blob" and kind == "blobs" and match["ref"] == GOOD_DIGEST:
            self.answer(200, {"Content-Type": "application/octet-stream"}, GOOD)
        else:
            self.not_found()

    do_HEAD = do_GET

    def not_found(self) -> None:
        body = json.dumps({"errors": [{"code": "NAME_UNKNOWN", "message": "unknown"}]}).encode()
        self.answer(404, {"Content-Type": "application/json"}, body)

    def endless(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        chunk = b"%x\r\n%s\r\n" % (CHUNK, bytes(CHUNK))
        sent = 0
        while sent < ENDLESS_SAFETY_LIMIT and self.send_body(chunk):
            sent += len(chunk)
        self.owner.stream_ended(self.path)

    def huge(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(TERABYTE))
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        sent = 0
        while sent < ENDLESS_SAFETY_LIMIT and self.send_body(bytes(CHUNK)):
            sent += CHUNK
        self.owner.stream_ended(self.path)


class HostileRegistry:
    """The hostile upstream and the internal service it points at, both on loopback."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.internal_requests: list[tuple[str, str]] = []
        self.sent: Counter[str] = Counter()
        self.streams_ended: Counter[str] = Counter()
        self._server = _Server(_HostileHandler, self)
        self._internal = _Server(_InternalHandler, self)
        self.targets = {
            "loopback": f"{self.internal_url}/admin",
            "localhost": f"http://localhost:{self.internal_port}/admin",
            "ipv6-loopback": f"http://[::1]:{self.internal_port}/admin",
            "metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "private": "http://10.0.0.1/",
            # Resolves to whatever a test's resolver says (see the rebinding test).
            "rebind": f"http://rebind.example:{self.internal_port}/admin",
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}"

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self._internal.port}"

    @property
    def internal_port(self) -> int:
        return self._internal.port

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def record_internal(self, method: str, path: str) -> None:
        with self._lock:
            self.internal_requests.append((method, path))

    def count_sent(self, path: str, count: int) -> None:
        with self._lock:
            self.sent[path] += count

    def stream_ended(self, path: str) -> None:
        with self._lock:
            self.streams_ended[path] += 1

    def ended_for(self, path_end: str) -> int:
        """Endless or huge bodies on paths ending with `path_end` that stopped being sent."""
        with self._lock:
            return sum(n for path, n in self.streams_ended.items() if path.endswith(path_end))

    def sent_for(self, path_end: str) -> int:
        """Body bytes sent on every path ending with `path_end`."""
        with self._lock:
            return sum(count for path, count in self.sent.items() if path.endswith(path_end))

    def start(self) -> HostileRegistry:
        self._server.thread.start()
        self._internal.thread.start()
        return self

    def stop(self) -> None:
        for server in (self._server, self._internal):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> HostileRegistry:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
