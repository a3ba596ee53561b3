"""Pulling through the shipped nginx configuration, as production runs it.

client --TLS--> nginx (deploy/nginx/depproxy.conf) --> the app (pserve) --> relay --> registry

With `depproxy.storage.accel_redirect` set, the app answers a cached blob's GET with
`X-Accel-Redirect` and no body, and nginx sends the file: these tests check that clients get
the right bytes, and that the app sent none of them.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import ssl
from pathlib import Path

import pytest
import requests

from depproxy_pyramid.models import Group, Visibility
from depproxy_pyramid.services.proxy import storage_key
from tests.proxy import PROXY_MARKER, PULLER, start_proxy
from tests.server import free_port, wait_for
from tests.support import registry
from tests.support.nginx import ACCEL_PREFIX, CONFIG, Nginx, render

IMAGE = "library/alpine:latest"
MAX_FAILURES = 3
# nginx's log line (see `log_format depproxy` in the shipped file).
_NGINX_LINE = re.compile(
    r'^(?P<address>\S+) .*"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) '
    r"bytes=(?P<bytes>\d+) app_bytes=(?P<app_bytes>\S+) app_status=(?P<app_status>\S+)"
)


@pytest.fixture(scope="module")
def front(upstream_registry, tmp_path_factory):
    """The app behind nginx, set up as the README's production section says."""
    workdir = tmp_path_factory.mktemp("front")
    https_port = free_port()
    proxy = start_proxy(
        workdir / "app",
        f"sqlite:///{workdir / 'proxy.sqlite'}",
        upstream_registry.url,
        **{
            "depproxy.external_url": f"https://127.0.0.1:{https_port}",
            "depproxy.trusted_proxies": "127.0.0.1",
            "depproxy.storage.accel_redirect": ACCEL_PREFIX,
            "depproxy.auth.max_failures": str(MAX_FAILURES),
        },
    )
    nginx = Nginx(workdir / "nginx", [proxy.server.port], proxy.storage, https_port=https_port)
    try:
        nginx.start()
        yield proxy, nginx
    finally:
        nginx.stop()
        proxy.server.stop()


@pytest.fixture
def proxy(front):
    return front[0]


@pytest.fixture
def nginx(front):
    return front[1]


@pytest.fixture
def group(proxy, request):
    label = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    proxy.empty_cache()
    return proxy.new_group(f"nginx-{label}")


def ref(nginx: Nginx, group: str, image: str) -> str:
    return f"{nginx.host}/{group}/{PROXY_MARKER}/{image}"


def token(nginx: Nginx, group: str, image: str, credentials=PULLER) -> str:
    answer = nginx.get(
        "/jwt/auth",
        params={
            "service": "dependency_proxy",
            "scope": f"repository:{group}/{PROXY_MARKER}/{image}:pull",
        },
        auth=credentials,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["token"]


def blob(nginx: Nginx, group: str, image: str, digest: str, method="GET", **headers):
    return nginx.get(
        f"/v2/{group}/{PROXY_MARKER}/{image}/blobs/{digest}",
        method,
        headers={"Authorization": f"Bearer {token(nginx, group, image)}", **headers},
    )


def blob_path(upstream, image: str, digest: str) -> Path:
    layout = upstream.images[image].source.layout
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def digest_of(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def nginx_lines(nginx: Nginx, path_part: str) -> list[dict[str, str]]:
    lines = [_NGINX_LINE.match(line) for line in nginx.access_log()]
    return [m.groupdict() for m in lines if m and path_part in m["path"]]


def app_lines(proxy, digest: str) -> list[str]:
    return [line for line in proxy.server.log().splitlines() if f"reference={digest}" in line]


def last_app_line(proxy, digest: str, containing: str) -> str:
    """The app's latest access line for `digest`, once it holds `containing`: a line is
    written when its response's body is done, just after the client has it."""
    wait_for(lambda: containing in (app_lines(proxy, digest) or [""])[-1])
    return app_lines(proxy, digest)[-1]


def skopeo_pull(nginx: Nginx, reference: str, dest: Path) -> None:
    """A complete pull over TLS, verifying nginx's certificate against the test CA."""
    registry.skopeo_pull(reference, dest, creds=PULLER, cert_dir=nginx.cert_dir)


def layout_blobs(layout: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()}


def assert_sent_by_nginx(nginx: Nginx, proxy, digest: str, size: int) -> None:
    """The latest GET of the blob: nginx sent all of it, the app none (and said so)."""
    (line, *_) = reversed([e for e in nginx_lines(nginx, digest) if e["method"] == "GET"])
    assert (line["status"], line["bytes"], line["app_bytes"]) == ("200", str(size), "0")
    last_app_line(proxy, digest, "offload=nginx")


def test_skopeo_pulls_cold_then_warm_and_nginx_sends_the_cached_blobs(
    proxy, nginx, upstream, group, tmp_path
):
    source = upstream.images[IMAGE].source
    skopeo_pull(nginx, ref(nginx, group, IMAGE), tmp_path / "cold")
    assert set(upstream.relay.blob_fetches()) == set(source.blob_digests)
    for digest in source.blob_digests:
        # Cold: the app streamed the fill itself.
        assert "offload" not in last_app_line(proxy, digest, "result=miss")
    upstream.relay.reset_counts()

    skopeo_pull(nginx, ref(nginx, group, IMAGE), tmp_path / "warm")
    assert upstream.relay.count(method="GET", kind="blob") == 0
    assert layout_blobs(tmp_path / "warm") == layout_blobs(tmp_path / "cold")
    for descriptor in (source.config, *source.layers):
        assert_sent_by_nginx(nginx, proxy, descriptor.digest, descriptor.size)


def test_podman_pulls_cold_then_warm_through_nginx(proxy, nginx, upstream, group, podman):
    reference = ref(nginx, group, IMAGE)

    def pull() -> str:
        result = podman(
            "pull", f"--cert-dir={nginx.cert_dir}", f"--creds={PULLER[0]}:{PULLER[1]}",
            f"--signature-policy={podman.home / 'policy.json'}", reference,
        )  # fmt: skip
        return result.stdout.strip().splitlines()[-1]

    source = upstream.images[IMAGE].source
    assert f"sha256:{pull()}" == source.config.digest
    podman("rmi", reference)
    upstream.relay.reset_counts()
    assert f"sha256:{pull()}" == source.config.digest
    assert upstream.relay.count(method="GET", kind="blob") == 0
    for descriptor in (source.config, *source.layers):
        assert_sent_by_nginx(nginx, proxy, descriptor.digest, descriptor.size)


def test_cached_blob_range_head_and_headers(proxy, nginx, upstream, group):
    image = "big/image:1.0"
    (layer,) = upstream.images[image].source.layers
    path = blob_path(upstream, image, layer.digest)
    cold = blob(nginx, group, "big/image", layer.digest)
    assert cold.status_code == 200 and digest_of(cold.content) == layer.digest

    warm = blob(nginx, group, "big/image", layer.digest)
    assert warm.status_code == 200 and digest_of(warm.content) == layer.digest
    assert warm.headers["Docker-Content-Digest"] == layer.digest
    assert warm.headers["ETag"] == f'"{layer.digest}"'
    assert warm.headers["Accept-Ranges"] == "bytes"
    assert warm.headers["Content-Type"] == cold.headers["Content-Type"]
    assert warm.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert int(warm.headers["Content-Length"]) == layer.size
    assert "X-Accel-Redirect" not in warm.headers
    assert_sent_by_nginx(nginx, proxy, layer.digest, layer.size)

    start, end = layer.size // 3, layer.size // 3 + 999_999
    part = blob(nginx, group, "big/image", layer.digest, Range=f"bytes={start}-{end}")
    assert part.status_code == 206
    with path.open("rb") as file:
        file.seek(start)
        assert part.content == file.read(1_000_000)
    assert part.headers["Content-Range"] == f"bytes {start}-{end}/{layer.size}"
    assert part.headers["Docker-Content-Digest"] == layer.digest
    assert "X-Accel-Redirect" not in part.headers
    line = [e for e in nginx_lines(nginx, layer.digest) if e["method"] == "GET"][-1]
    assert (line["status"], line["bytes"], line["app_bytes"]) == ("206", "1000000", "0")
    last_app_line(proxy, layer.digest, "status=206")

    # Several ranges get the whole blob from nginx too (`max_ranges 1`), never the first alone.
    several = blob(nginx, group, "big/image", layer.digest, Range="bytes=0-9,100-109")
    assert several.status_code == 200 and "Content-Range" not in several.headers
    assert digest_of(several.content) == layer.digest

    # A range past the end is refused by the app, in the registry's format, before nginx
    # would answer it with an HTML page.
    past = blob(nginx, group, "big/image", layer.digest, Range=f"bytes={layer.size}-")
    assert past.status_code == 416
    assert past.json()["errors"][0]["code"] == "SIZE_INVALID"
    assert past.headers["Content-Range"] == f"bytes */{layer.size}"

    head = blob(nginx, group, "big/image", layer.digest, method="HEAD")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == layer.size
    assert head.headers["Docker-Content-Digest"] == layer.digest
    assert "offload" not in last_app_line(proxy, layer.digest, "method=HEAD")


def test_a_range_of_a_cold_blob_is_answered_by_the_app(proxy, nginx, upstream, group):
    layer = upstream.images[IMAGE].source.layers[0]
    content = blob_path(upstream, IMAGE, layer.digest).read_bytes()
    part = blob(nginx, group, "library/alpine", layer.digest, Range="bytes=0-99")
    assert part.status_code == 206 and part.content == content[:100]
    last_app_line(proxy, layer.digest, "result=miss")


def test_cached_blobs_are_refused_to_whoever_may_not_pull_them(proxy, nginx, upstream, group):
    layer = upstream.images[IMAGE].source.layers[0]
    content = blob_path(upstream, IMAGE, layer.digest).read_bytes()
    path = f"/{PROXY_MARKER}/library/alpine/blobs/{layer.digest}"
    assert blob(nginx, group, "library/alpine", layer.digest).content == content
    hidden = f"{group}-hidden"
    manager, session = proxy.db.session()
    with manager:
        session.add(Group(path=hidden, name=hidden, visibility=Visibility.PRIVATE))
    other_image = {"Authorization": f"Bearer {token(nginx, group, 'library/other')}"}

    refusals = [
        (nginx.get(f"/v2/{group}{path}"), 401, "UNAUTHORIZED"),
        (nginx.get(f"/v2/{group}{path}", headers=other_image), 401, "UNAUTHORIZED"),
        # A private group the puller is not in does not exist, as far as the puller knows.
        (blob(nginx, hidden, "library/alpine", layer.digest), 404, "NAME_UNKNOWN"),
    ]
    for answer, status, code in refusals:
        assert (answer.status_code, answer.json()["errors"][0]["code"]) == (status, code)
        assert answer.headers["Content-Type"] == "application/json"
        assert "X-Accel-Redirect" not in answer.headers

    # The stored file itself, asked for at nginx's internal location.
    key = storage_key("blobs", layer.digest)
    assert (proxy.storage / key).read_bytes() == content
    direct = nginx.get(ACCEL_PREFIX + key)
    assert direct.status_code == 404
    assert direct.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert direct.content != content


def test_token_realm_is_the_https_address(nginx):
    answer = nginx.get("/v2/")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith(
        f'Bearer realm="https://{nginx.host}/jwt/auth"'
    )
    signed_in = nginx.get("/jwt/auth", auth=PULLER, params={"service": "dependency_proxy"})
    assert signed_in.status_code == 200 and signed_in.json()["token"]
    bearer = {"Authorization": f"Bearer {signed_in.json()['token']}"}
    assert nginx.get("/v2/", headers=bearer).status_code == 200


def test_plain_http_redirects_to_https(nginx):
    url = f"http://127.0.0.1:{nginx.http_port}/v2/"
    answer = requests.get(url, allow_redirects=False, timeout=10)
    assert answer.status_code == 301
    assert answer.headers["Location"] == "https://127.0.0.1/v2/"


def test_nginx_refuses_large_bodies_in_the_registry_format(nginx):
    answer = nginx.get("/v2/", method="POST", data=b"x" * (65 * 1024))
    assert answer.status_code == 413
    assert answer.json()["errors"][0]["code"] == "UNSUPPORTED"


def sign_in_from(nginx: Nginx, source: str, username: str, password: str, forwarded: str) -> int:
    """A sign-in over a connection from `source`, with an X-Forwarded-For the client wrote."""
    context = ssl.create_default_context(cafile=str(nginx.ca))
    connection = http.client.HTTPSConnection(
        "127.0.0.1", nginx.https_port, source_address=(source, 0), context=context, timeout=30
    )
    credentials = base64.b64encode(f"{username}:{password}".encode()).decode()
    try:
        connection.request(
            "GET",
            "/jwt/auth?service=dependency_proxy",
            headers={"Authorization": f"Basic {credentials}", "X-Forwarded-For": forwarded},
        )
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_client_address_reaches_the_app_and_its_sign_in_limit(nginx):
    # Every failure comes from 127.0.0.2, each claiming another address and user name: only
    # the address nginx saw can tie them together.
    for i in range(MAX_FAILURES):
        assert sign_in_from(nginx, "127.0.0.2", f"nobody{i}", "wrong", f"198.51.100.{i}") == 401
    assert sign_in_from(nginx, "127.0.0.2", *PULLER, "198.51.100.99") == 429
    # Another client, even one claiming to be the limited address, is not affected; and
    # nginx's own connection to the app (127.0.0.1) was never the one counted.
    assert sign_in_from(nginx, "127.0.0.3", *PULLER, "127.0.0.2") == 200
    signed_in = nginx.get("/jwt/auth", auth=PULLER, params={"service": "dependency_proxy"})
    assert signed_in.status_code == 200


def test_the_renderer_refuses_a_file_without_a_value_it_replaces():
    shipped = CONFIG.read_text()
    with pytest.raises(RuntimeError, match="'127.0.0.1:6543' not found"):
        render(shipped.replace("127.0.0.1:6543", "127.0.0.1:7000"), {"127.0.0.1:6543": "x"})
