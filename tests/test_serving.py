"""What other clients do cannot stall a cached pull: idle connections, clients that never read,
and requests the server could be left waiting on. A real `pserve` process on the bundled runner,
with fewer threads than there are misbehaving clients, so a held thread would show."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass

import pytest
import requests

from depproxy_pyramid.server import REQUEST_HEAD_TIMEOUT, UNACKNOWLEDGED_TIMEOUT_MS
from tests.proxy import PROXY_MARKER, Proxy, start_proxy
from tests.server import wait_for

THREADS = 8
NON_READING_CLIENTS = 16
IDLE_CONNECTIONS = 200
# The runner's defaults, which these tests rely on: channel_timeout 10, cleanup_interval 2.
IDLE_CLOSED_WITHIN = 10 + 2 + 3
# The kernel checks the timeout only when it probes the shut window, at intervals that double
# from the retransmission timeout: the first probe after 20 s came 25 s in here, and on a loaded
# machine (a longer timeout) 50 s in.
NON_READING_CLOSED_WITHIN = 3 * UNACKNOWLEDGED_TIMEOUT_MS / 1000
IMAGE = "big/image"
MiB = 1024 * 1024


@dataclass
class Cached:
    proxy: Proxy
    group: str
    manifest_digest: str
    manifest: bytes
    layer_digest: str
    layer_size: int
    layer_sha256: str


@pytest.fixture(scope="module")
def cached(upstream_registry, tmp_path_factory) -> Iterator[Cached]:
    workdir = tmp_path_factory.mktemp("serving")
    proxy = start_proxy(
        workdir,
        f"sqlite:///{workdir / 'proxy.sqlite'}",
        upstream_registry.url,
        server_options={"threads": str(THREADS)},
    )
    try:
        group = proxy.new_group("serving")
        manifest = proxy.get(group, IMAGE, "manifests", "1.0")
        assert manifest.status_code == 200
        layer = upstream_registry.images[f"{IMAGE}:1.0"].source.layers[0]
        sha256 = hashlib.sha256()
        with proxy.get(group, IMAGE, "blobs", layer.digest, stream=True) as answer:
            assert answer.status_code == 200
            size = 0
            for chunk in answer.iter_content(MiB):
                sha256.update(chunk)
                size += len(chunk)
        wait_for(lambda: proxy.cached_blobs(group) == 1)
        yield Cached(
            proxy,
            group,
            manifest.headers["Docker-Content-Digest"],
            manifest.content,
            layer.digest,
            size,
            sha256.hexdigest(),
        )
    finally:
        proxy.server.stop()


def assert_pulls_within_a_second(cached: Cached, token: str) -> None:
    """`/v2/`, the cached manifest and 1 MiB of the cached layer, each within 1 s."""
    headers = {"Authorization": f"Bearer {token}"}
    base = f"{cached.proxy.url}/v2/{cached.group}/{PROXY_MARKER}/{IMAGE}"
    started = time.monotonic()
    assert requests.get(f"{cached.proxy.url}/v2/", headers=headers, timeout=5).status_code == 200
    assert time.monotonic() - started < 1
    started = time.monotonic()
    manifest = requests.get(
        f"{base}/manifests/{cached.manifest_digest}",
        headers={**headers, "Accept": "application/vnd.oci.image.manifest.v1+json"},
        timeout=5,
    )
    assert manifest.status_code == 200
    assert manifest.content == cached.manifest
    assert time.monotonic() - started < 1
    started = time.monotonic()
    with requests.get(
        f"{base}/blobs/{cached.layer_digest}", headers=headers, stream=True, timeout=5
    ) as blob:
        assert blob.status_code == 200
        assert int(blob.headers["Content-Length"]) == cached.layer_size
        assert len(next(blob.iter_content(MiB))) > 0
    assert time.monotonic() - started < 1


def raw_request(cached: Cached, request: bytes, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:
        # Set before connecting, so the window it advertises stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", cached.proxy.server.port))
    sock.sendall(request)
    return sock


def read_answer(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes the connection or `timeout` passes."""
    sock.settimeout(timeout)
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        received += chunk
    return received


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while chunk := sock.recv(4 * MiB):
            del chunk
        return True  # end of stream
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_and_non_reading_clients_do_not_stall_cached_pulls(cached: Cached):
    token = cached.proxy.token(cached.group, IMAGE)
    blob_path = f"/v2/{cached.group}/{PROXY_MARKER}/{IMAGE}/blobs/{cached.layer_digest}"
    with ExitStack() as stack:
        idle = [
            stack.enter_context(
                closing(socket.create_connection(("127.0.0.1", cached.proxy.server.port)))
            )
            for _ in range(IDLE_CONNECTIONS)
        ]
        non_reading = []
        for number in range(NON_READING_CLIENTS):
            # Half ask for a range from the start, half for the whole blob; none reads a byte.
            ranged = b"Range: bytes=0-\r\n" if number % 2 == 0 else b""
            request = (
                f"GET {blob_path} HTTP/1.1\r\nHost: proxy\r\n"
                f"Authorization: Bearer {token}\r\n".encode()
                + ranged
                + b"\r\n"
            )
            non_reading.append(stack.enter_context(closing(raw_request(cached, request, 4096))))
        opened = time.monotonic()
        # Long enough for every non-reading client's request to reach the application.
        time.sleep(1)
        assert_pulls_within_a_second(cached, token)

        # The server, not the clients, ends both kinds of connection within seconds.
        wait_for(lambda: all(closed_by_server(sock) for sock in idle), timeout=IDLE_CLOSED_WITHIN)
        wait_for(
            lambda: all(closed_by_server(sock) for sock in non_reading),
            timeout=NON_READING_CLOSED_WITHIN - (time.monotonic() - opened),
        )
    assert_pulls_within_a_second(cached, token)


def test_each_request_is_recorded_once_its_body_is_done(cached: Cached):
    """A client that reads 1 MiB of the layer and hangs up is logged with what it was sent
    and how long it took, not with the layer's size at the moment the response began."""
    token = cached.proxy.token(cached.group, IMAGE)
    base = (
        f"{cached.proxy.url}/v2/{cached.group}/{PROXY_MARKER}/{IMAGE}/blobs/{cached.layer_digest}"
    )
    log_path = cached.proxy.server.log_path

    def access_lines() -> list[str]:
        return [
            line
            for line in log_path.read_text().splitlines()
            if f"reference={cached.layer_digest}" in line and "method=GET" in line
        ]

    before = len(access_lines())
    with requests.get(
        base, headers={"Authorization": f"Bearer {token}"}, stream=True, timeout=10
    ) as answer:
        assert answer.status_code == 200
        assert len(answer.raw.read(MiB)) == MiB
        # Nothing is recorded while the body is still being sent.
        time.sleep(0.5)
        assert len(access_lines()) == before
    wait_for(lambda: len(access_lines()) == before + 1, timeout=IDLE_CLOSED_WITHIN)
    line = access_lines()[-1]
    fields = dict(field.split("=", 1) for field in line.split("] ", 1)[1].split())
    assert fields["result"] == "hit"
    assert fields["status"] == "200"
    # What the kernel's socket buffers took beyond the 1 MiB read, never the whole layer.
    assert MiB <= int(fields["bytes"]) < 64 * MiB < cached.layer_size
    assert int(fields["duration_ms"]) >= 500

    # A complete read is recorded whole, and the cache's byte counter agrees.
    before = len(access_lines())
    served_before = cache_bytes_served(cached)
    sha256 = hashlib.sha256()
    with requests.get(
        base, headers={"Authorization": f"Bearer {token}"}, stream=True, timeout=30
    ) as answer:
        for chunk in answer.iter_content(MiB):
            sha256.update(chunk)
    assert sha256.hexdigest() == cached.layer_sha256
    wait_for(lambda: len(access_lines()) == before + 1)
    assert f"bytes={cached.layer_size} " in access_lines()[-1]
    assert cache_bytes_served(cached) - served_before == cached.layer_size


def cache_bytes_served(cached: Cached) -> float:
    text = requests.get(f"{cached.proxy.url}/-/metrics", timeout=5).text
    found = re.search(r'^depproxy_bytes_served_total\{source="cache"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_range_is_served_from_the_file_with_the_right_bytes(cached: Cached):
    token = cached.proxy.token(cached.group, IMAGE)
    answer = cached.proxy.get(
        cached.group,
        IMAGE,
        "blobs",
        cached.layer_digest,
        headers={"Range": f"bytes={cached.layer_size - 10}-"},
    )
    assert answer.status_code == 206
    assert answer.headers["Content-Range"] == (
        f"bytes {cached.layer_size - 10}-{cached.layer_size - 1}/{cached.layer_size}"
    )
    assert len(answer.content) == 10
    middle = cached.proxy.get(
        cached.group, IMAGE, "blobs", cached.layer_digest, headers={"Range": "bytes=5-9"}
    )
    assert middle.status_code == 206
    assert middle.headers["Content-Length"] == "5"
    whole = requests.get(
        f"{cached.proxy.url}/v2/{cached.group}/{PROXY_MARKER}/{IMAGE}/blobs/{cached.layer_digest}",
        headers={"Authorization": f"Bearer {token}", "Range": "bytes=0-14"},
        timeout=10,
    )
    assert whole.content[5:10] == middle.content
    assert answer.content == cached_tail(cached, token, 10)


def cached_tail(cached: Cached, token: str, count: int) -> bytes:
    with requests.get(
        f"{cached.proxy.url}/v2/{cached.group}/{PROXY_MARKER}/{IMAGE}/blobs/{cached.layer_digest}",
        headers={"Authorization": f"Bearer {token}"},
        stream=True,
        timeout=30,
    ) as answer:
        tail = b""
        for chunk in answer.iter_content(MiB):
            tail = (tail + chunk)[-count:]
    return tail


def test_expect_continue_without_a_body_is_answered_at_once(cached: Cached):
    with closing(
        raw_request(
            cached,
            b"GET /v2/ HTTP/1.1\r\nHost: proxy\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\n",
        )
    ) as sock:
        started = time.monotonic()
        answer = read_answer(sock)
    assert time.monotonic() - started < 1
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"100 Continue" not in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["errors"][0]["code"] == "UNAUTHORIZED"


def test_expect_continue_with_a_body_still_gets_its_interim_answer(cached: Cached):
    with closing(
        raw_request(
            cached,
            b"POST /jwt/auth HTTP/1.1\r\nHost: proxy\r\nExpect: 100-continue\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 5\r\n"
            b"Connection: close\r\n\r\n",
        )
    ) as sock:
        sock.settimeout(5)
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"a=b&c")
        answer = read_answer(sock)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["errors"][0]["code"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v2/ HTTP/1.1\nHost: proxy\n\n",
        b"GET /v2/ HTTP/1.1\r\nHost: proxy\nAccept: */*\r\n\r\n",
    ],
    ids=["all-bare-lf", "one-bare-lf"],
)
def test_bare_line_feeds_get_a_400_at_once(cached: Cached, request_bytes: bytes):
    with closing(raw_request(cached, request_bytes)) as sock:
        started = time.monotonic()
        answer = read_answer(sock)
    assert time.monotonic() - started < 1
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ")
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert error["message"] == "malformed request: header lines must end with CRLF"


def test_a_bare_line_feed_split_across_reads_is_found(cached: Cached):
    with closing(raw_request(cached, b"GET /v2/ HTTP/1.1\r\nHost: proxy\r")) as sock:
        time.sleep(0.2)
        sock.sendall(b"\nAccept: */*\n\r\n")
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_a_tls_client_hello_on_the_plain_port_is_refused_at_once(cached: Cached):
    """Docker, containerd and skopeo try HTTPS first on an insecure registry; an immediate
    answer sends them to plain HTTP without waiting out their handshake timeout."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", cached.proxy.server.port), timeout=5) as sock,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(sock, server_hostname="proxy")
    assert time.monotonic() - started < 1
    # And the server goes on serving plain HTTP.
    assert requests.get(f"{cached.proxy.url}/v2/", timeout=5).status_code == 401


def test_a_request_head_trickling_in_is_cut_off(cached: Cached):
    """A client that sends its head a byte at a time cannot keep the connection forever."""
    with closing(raw_request(cached, b"GET /v2/ HTTP/1.1\r\nHost: proxy\r\nX-Slow: ")) as sock:
        started = time.monotonic()
        answer = b""
        sock.settimeout(0.5)
        while time.monotonic() - started < REQUEST_HEAD_TIMEOUT + 5 and not answer:
            try:
                sock.sendall(b"a")
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        elapsed = time.monotonic() - started
    assert REQUEST_HEAD_TIMEOUT <= elapsed < REQUEST_HEAD_TIMEOUT + 2
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["errors"][0]["message"] == (
        f"the request head took longer than {REQUEST_HEAD_TIMEOUT} seconds to arrive"
    )


def test_a_manifest_the_client_has_is_answered_304_and_recorded_so(cached: Cached):
    token = cached.proxy.token(cached.group, IMAGE)
    answer = requests.get(
        f"{cached.proxy.url}/v2/{cached.group}/{PROXY_MARKER}/{IMAGE}/manifests/"
        f"{cached.manifest_digest}",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.oci.image.manifest.v1+json",
            "If-None-Match": f'"{cached.manifest_digest}"',
        },
        timeout=10,
    )
    assert answer.status_code == 304
    assert answer.content == b""
    assert answer.headers["Docker-Content-Digest"] == cached.manifest_digest

    def recorded() -> list[str]:
        return [
            line
            for line in cached.proxy.server.log_path.read_text().splitlines()
            if f"reference={cached.manifest_digest}" in line and " status=304 " in line
        ]

    wait_for(lambda: len(recorded()) == 1)
    assert " result=hit bytes=0 " in recorded()[0]
