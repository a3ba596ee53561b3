"""A second upstream registry for tests that records the Authorization of every request.

It listens on 127.0.0.1 and serves one small image (any repository, tag ``1.0``) behind
Docker's token flow. Its challenge names ``realm`` as the token endpoint: by default its own
``/token``, which answers anyone, with or without credentials. Pointing ``realm`` at
``other_host_realm`` (the same server reached as ``localhost``) makes it "a token realm on
another host" that records what it is sent too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TAG = "1.0"
SERVICE = "recorder"

_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A proxy that is stopped drops its kept-alive connections; that is no test failure.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Recorded:
    method: str
    host: str  # the Host header: which name the client used to reach us
    path: str
    authorization: str | None


class Recorder:
    """A registry (and token endpoint) on 127.0.0.1 that remembers who sent what."""

    def __init__(self) -> None:
        self.config = b'{"architecture":"amd64","os":"linux"}'
        self.layer = b"recorded layer bytes\n" * 64
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": _digest(self.config),
                    "size": len(self.config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": _digest(self.layer),
                        "size": len(self.layer),
                    }
                ],
            }
        ).encode()
        self.blobs = {_digest(self.config): self.config, _digest(self.layer): self.layer}
        self.requests: list[Recorded] = []
        self._issued: set[str] = set()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]
        self.realm = f"{self.url}/token"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def other_host_realm(self) -> str:
        """This server's token endpoint under another host name."""
        return f"http://localhost:{self.port}/token"

    @property
    def manifest_digest(self) -> str:
        return _digest(self.manifest)

    @property
    def layer_digest(self) -> str:
        return _digest(self.layer)

    def authorizations(self) -> list[str | None]:
        with self._lock:
            return [r.authorization for r in self.requests]

    def token_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith("/token")]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def start(self) -> Recorder:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="recorder", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ----------------------------------------------------------------------------------

    def _record(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(
                Recorded(
                    handler.command,
                    handler.headers.get("Host", ""),
                    handler.path,
                    handler.headers.get("Authorization"),
                )
            )

    def _issue(self) -> str:
        token = f"recorder-token-{next(self._counter)}"
        with self._lock:
            self._issued.add(token)
        return token

    def _authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        token = (handler.headers.get("Authorization") or "").removeprefix("Bearer ")
        with self._lock:
            return token in self._issued

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                recorder._record(self)
                self._answer(send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                recorder._record(self)
                self._answer(send_body=False)

            def _answer(self, send_body: bool) -> None:
                if self.path.startswith("/token"):
                    body = json.dumps({"token": recorder._issue(), "expires_in": 300}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, send_body)
                match = _PATH.match(self.path)
                if self.path not in ("/v2/", "/v2") and match is None:
                    return self._send(404, b"{}", {"Content-Type": "application/json"}, send_body)
                if not recorder._authorized(self):
                    scope = f',scope="repository:{match["name"]}:pull"' if match else ""
                    challenge = f'Bearer realm="{recorder.realm}",service="{SERVICE}"{scope}'
                    return self._send(401, b"{}", {"WWW-Authenticate": challenge}, send_body)
                if match is None:
                    return self._send(200, b"{}", {"Content-Type": "application/json"}, send_body)
                if match["kind"] == "manifests":
                    if match["reference"] not in (TAG, recorder.manifest_digest):
                        return self._send(404, b"{}", {}, send_body)
                    headers = {
                        "Content-Type": OCI_MANIFEST,
                        "Docker-Content-Digest": recorder.manifest_digest,
                    }
                    return self._send(200, recorder.manifest, headers, send_body)
                blob = recorder.blobs.get(match["reference"])
                if blob is None:
                    return self._send(404, b"{}", {}, send_body)
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Docker-Content-Digest": match["reference"],
                }
                return self._send(200, blob, headers, send_body)

            def _send(
                self, status: int, body: bytes, headers: dict[str, str], send_body: bool
            ) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

        return Handler
