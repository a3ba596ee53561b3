"""A hostile upstream gains nothing: no internal address reached, nothing cached that is not a
manifest or a verified blob, no disk filled, no internal name in an error.

The hostile registry is a real server on 127.0.0.1 (`tests.support.hostile`); the proxy runs in
front of it as a real `pserve` process. The address and manifest rules are also checked at unit
level, in process.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests
import responses

from depproxy_pyramid.services.proxy import upstream_error
from depproxy_pyramid.upstream import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    UpstreamAuthFailed,
    UpstreamBadDigest,
    UpstreamClient,
    UpstreamInvalid,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from depproxy_pyramid.upstream import transport as transport_module
from depproxy_pyramid.upstream.client import manifest_media_type
from depproxy_pyramid.upstream.transport import AddressGuard, is_public
from tests.proxy import Proxy, running_proxy
from tests.server import wait_for
from tests.support.hostile import CORRUPT, GOOD, GOOD_DIGEST, TERABYTE, HostileRegistry

MiB = 1024**2
CAP = 8 * MiB
ANY_DIGEST = "sha256:" + hashlib.sha256(b"what the client asked for").hexdigest()
INTERNAL_TARGETS = ["loopback", "localhost", "ipv6-loopback", "metadata", "private"]


# -- unit: which addresses are public ------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "fe80::1",
        "fe80::1%eth0",
        "fd00::1",
        "0.0.0.0",  # noqa: S104 - an address to classify, not to bind
        "::",
        "224.0.0.1",
        "ff02::1",
        "240.0.0.1",
        "255.255.255.255",
        "100.64.0.1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::",
        "64:ff9b::a9fe:a9fe",
    ],
)
def test_internal_addresses_are_not_public(address):
    assert is_public(address) is False


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_internet_addresses_are_public(address):
    assert is_public(address) is True


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A resolver answering from this table; a name not in it does not resolve."""
    table: dict[str, list[str]] = {}

    def resolve(host: str, port: int | None) -> list[str]:
        if host in table:
            return table[host]
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        except OSError:
            raise socket.gaierror(f"{host} does not resolve") from None
        return [host]

    monkeypatch.setattr(transport_module, "resolve_addresses", resolve)
    return table


def test_guard_allows_public_destinations_and_configured_upstreams(dns):
    dns.update({"cdn.example": ["151.101.1.69"], "registry.internal": ["10.1.2.3"]})
    guard = AddressGuard(["http://127.0.0.1:5000", "https://registry.internal"])
    guard.check("https://cdn.example/blob?sig=1")
    guard.check("http://127.0.0.1:5000/v2/x/blobs/y")
    guard.check("https://registry.internal/v2/")
    # By resolved address too, but only on the configured port.
    guard.check("https://10.1.2.3/v2/")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5001/",  # the configured upstream's address, another port
        "https://10.1.2.3:8443/",  # a configured name's address, another port
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:5000/",
        "http://internal.example/",  # a name resolving to a private address
        "http://mixed.example/",  # any internal address among public ones is enough
        "http://localhost:5000/",  # not how the upstream was configured, and loopback
    ],
)
def test_guard_refuses_internal_destinations(dns, url):
    dns.update(
        {
            "internal.example": ["192.168.0.10"],
            "mixed.example": ["151.101.1.69", "10.0.0.7"],
            "registry.internal": ["10.1.2.3"],
            "localhost": ["127.0.0.1", "::1"],
        }
    )
    guard = AddressGuard(["http://127.0.0.1:5000", "https://registry.internal"])
    with pytest.raises(UpstreamInvalid) as refused:
        guard.check(url)
    assert refused.value.message == "upstream redirect refused"
    assert "127.0.0.1" not in str(refused.value) and "169.254" not in str(refused.value)


def test_unresolvable_redirect_target_is_unavailable(dns):
    with pytest.raises(UpstreamUnavailable):
        AddressGuard(["https://registry.example"]).check("https://nowhere.example/")


# -- unit: what counts as a manifest -------------------------------------------------------


def manifest(**fields) -> bytes:
    return json.dumps({"schemaVersion": 2, **fields}).encode()


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (OCI_MANIFEST, manifest(mediaType=OCI_MANIFEST), OCI_MANIFEST),
        (OCI_MANIFEST, manifest(), OCI_MANIFEST),
        (OCI_INDEX, manifest(mediaType=OCI_INDEX, manifests=[]), OCI_INDEX),
        (DOCKER_MANIFEST, manifest(mediaType=DOCKER_MANIFEST), DOCKER_MANIFEST),
        ("application/json", manifest(mediaType=DOCKER_MANIFEST_LIST), DOCKER_MANIFEST_LIST),
        ("", manifest(mediaType=OCI_INDEX), OCI_INDEX),
    ],
)
def test_manifests_are_accepted(content_type, body, expected):
    assert manifest_media_type(content_type, body) == expected


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html><body>login</body></html>"),
        ("text/html", manifest(mediaType=OCI_MANIFEST)),
        ("application/json", b'{"hello": "world"}'),
        ("application/json", manifest()),  # generic type, no mediaType: nothing says what it is
        ("application/json", manifest(mediaType="text/html")),
        (OCI_MANIFEST, manifest(mediaType=OCI_INDEX)),  # disagrees with its Content-Type
        (OCI_MANIFEST, manifest(mediaType=["not", "a", "string"])),
        (OCI_MANIFEST, json.dumps({"schemaVersion": 1, "mediaType": OCI_MANIFEST}).encode()),
        (OCI_MANIFEST, json.dumps({"schemaVersion": "2"}).encode()),
        (OCI_MANIFEST, json.dumps({"schemaVersion": 2.0}).encode()),
        (OCI_MANIFEST, json.dumps({"schemaVersion": True}).encode()),
        (OCI_MANIFEST, json.dumps([{"schemaVersion": 2}]).encode()),
        (OCI_MANIFEST, b"\xff\xfe not even text"),
        (OCI_MANIFEST, b"[" * 200_000 + b"]" * 200_000),
        ("application/vnd.docker.distribution.manifest.v1+prettyjws", manifest()),
    ],
)
def test_anything_else_is_not_a_manifest(content_type, body):
    with pytest.raises(UpstreamInvalid) as refused:
        manifest_media_type(content_type, body)
    assert refused.value.message == "upstream sent something that is not a manifest"


@responses.activate
def test_an_html_page_is_never_returned_as_a_manifest():
    responses.get(
        "https://registry.example/v2/library/app/manifests/latest",
        body=b"<html>captive portal</html>",
        content_type="text/html",
    )
    responses.head(
        "https://registry.example/v2/library/app/manifests/1.0",
        content_type="text/html",
        headers={"Docker-Content-Digest": ANY_DIGEST, "Content-Length": "27"},
    )
    client = UpstreamClient("https://registry.example")
    with pytest.raises(UpstreamInvalid, match="not a manifest"):
        client.get_manifest("library/app", "latest")
    with pytest.raises(UpstreamInvalid, match="not a manifest"):
        client.head_manifest("library/app", "1.0")


# -- unit: what a client is told -----------------------------------------------------------

LEAKY = (
    "HTTPConnectionPool(host='10.0.0.1', port=5000): Max retries exceeded with url: "
    "http://169.254.169.254/latest redirected from https://registry.internal:8443/v2/"
)


@pytest.mark.parametrize(
    ("error", "status", "code", "says"),
    [
        (UpstreamUnavailable(f"cannot connect to upstream: {LEAKY}"), 502, "UNAVAILABLE",
         "upstream could not be reached"),
        (UpstreamUnavailable(f"upstream answered 503 for {LEAKY}", status=503), 503,
         "UNAVAILABLE", "upstream answered 503"),
        (UpstreamTimeout(f"upstream timed out: {LEAKY}"), 504, "UNAVAILABLE", "timed out"),
        (UpstreamInvalid("upstream redirect refused", detail=LEAKY), 502, "UNAVAILABLE",
         "upstream redirect refused"),
        (UpstreamRateLimited(f"token endpoint of {LEAKY}", retry_after=7), 429,
         "TOOMANYREQUESTS", "rate limiting"),
        (UpstreamAuthFailed(f"token realm {LEAKY}"), 502, "UNKNOWN", "authentication failed"),
        (UpstreamBadDigest(f"{LEAKY} sent a digest"), 502, "UNKNOWN", "does not match"),
    ],
)  # fmt: skip
def test_upstream_errors_tell_the_client_no_host(error, status, code, says, caplog):
    answer = upstream_error(error, "BLOB_UNKNOWN", "library/app:latest")
    assert (answer.status, answer.code) == (status, code)
    assert says in answer.message
    text = json.dumps(answer.body())
    for internal in ("10.0.0.1", "169.254", "registry.internal", "5000", "8443", "http"):
        assert internal not in text
    # The operator still learns everything.
    assert LEAKY in caplog.text
    assert caplog.records[-1].levelname == "WARNING"


# -- in process: the real client against the hostile server --------------------------------


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileRegistry]:
    with HostileRegistry() as server:
        yield server


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every address a socket connects to; a non-loopback one fails the test unsent."""
    seen: list[object] = []
    connect = socket.socket.connect

    def spy(sock: socket.socket, address) -> None:
        seen.append(address[0])
        assert address[0] in ("127.0.0.1", "::1"), f"connected to {address[0]}"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    return seen


@pytest.mark.parametrize("target", INTERNAL_TARGETS)
def test_client_refuses_redirects_to_internal_addresses_unconnected(
    hostile, connections, target
):
    before = len(hostile.internal_requests)
    client = UpstreamClient(hostile.url)
    with pytest.raises(UpstreamInvalid, match="redirect refused"):
        client.get_manifest(f"redirect/{target}", "latest")
    with pytest.raises(UpstreamInvalid, match="redirect refused"):
        client.open_blob(f"redirect/{target}", ANY_DIGEST)
    assert set(connections) == {"127.0.0.1"}  # the hostile upstream itself, nothing else
    assert len(hostile.internal_requests) == before


# The registry's own host name on another port counts as its token service (RealmPolicy).
REALM_TARGETS = [target for target in INTERNAL_TARGETS if target != "loopback"]


@pytest.mark.parametrize("target", REALM_TARGETS)
def test_client_refuses_a_token_realm_at_an_internal_address_unconnected(
    hostile, connections, target
):
    before = len(hostile.internal_requests)
    client = UpstreamClient(hostile.url)
    with pytest.raises(UpstreamInvalid, match="token realm refused"):
        client.get_manifest(f"realm/{target}", "latest")
    assert set(connections) == {"127.0.0.1"}
    assert len(hostile.internal_requests) == before


def test_a_name_that_resolves_differently_at_connect_time_is_refused(
    hostile, connections, monkeypatch
):
    """DNS rebinding: public when the redirect is checked, loopback when connecting."""
    answers = iter([["151.101.1.69"], ["127.0.0.1"]])
    real = transport_module.resolve_addresses

    def rebinding(host: str, port: int | None) -> list[str]:
        return next(answers) if host == "rebind.example" else real(host, port)

    monkeypatch.setattr(transport_module, "resolve_addresses", rebinding)
    before = len(hostile.internal_requests)
    with pytest.raises(UpstreamInvalid, match="redirect refused"):
        UpstreamClient(hostile.url).get_manifest("redirect/rebind", "latest")
    assert next(answers, None) is None  # checked before the hop, and again when connecting
    assert set(connections) == {"127.0.0.1"}
    assert len(hostile.internal_requests) == before


# -- the proxy as a server process in front of the hostile registry ------------------------

_groups = iter(range(10_000))


@pytest.fixture(scope="module")
def proxy(hostile, tmp_path_factory) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("hostile-proxy")
    with running_proxy(
        workdir,
        f"sqlite:///{workdir / 'proxy.sqlite'}",
        hostile.url,
        **{"depproxy.blob.max_size": str(CAP)},
    ) as proxy:
        yield proxy


@pytest.fixture
def group(proxy) -> str:
    proxy.empty_cache()
    return proxy.new_group(f"hostile-{next(_groups)}")


def assert_registry_error(answer: requests.Response, status: int, code: str) -> str:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    errors = answer.json()["errors"]
    assert [error["code"] for error in errors] == [code]
    return errors[0]["message"]


def assert_names_nothing_internal(answer: requests.Response, hostile: HostileRegistry) -> None:
    text = answer.text
    for internal in ("127.0.0.1", "169.254", "10.0.0.1", "localhost", "::1", "http:"):
        assert internal not in text
    for port in (hostile.port, hostile.internal_port):
        assert re.search(rf"(?<![0-9A-Za-z]){port}(?![0-9A-Za-z])", text) is None


def assert_nothing_kept(proxy: Proxy, group: str) -> None:
    wait_for(lambda: not proxy.spool_files())
    assert proxy.cached_blobs(group) == 0
    assert proxy.cached_manifests(group) == 0
    assert proxy.stored_blob_files(group) == []
    assert proxy.spool_files() == []


@pytest.mark.parametrize("target", INTERNAL_TARGETS)
def test_manifest_redirect_to_an_internal_address_is_refused(proxy, hostile, group, target):
    before = len(hostile.internal_requests)
    answer = proxy.get(group, f"redirect/{target}", "manifests", "latest")
    message = assert_registry_error(answer, 502, "UNAVAILABLE")
    assert message == "the upstream registry is unavailable: upstream redirect refused"
    assert_names_nothing_internal(answer, hostile)
    assert len(hostile.internal_requests) == before
    assert_nothing_kept(proxy, group)
    # The operator's log has what the client was not told.
    assert f"redirect to {urlsplit(hostile.targets[target]).hostname}:" in proxy.server.log()


@pytest.mark.parametrize("target", ["localhost", "metadata"])
def test_a_token_realm_at_an_internal_address_is_refused(proxy, hostile, group, target):
    before = len(hostile.internal_requests)
    answer = proxy.get(group, f"realm/{target}", "manifests", "latest")
    assert_registry_error(answer, 502, "UNAVAILABLE")
    assert_names_nothing_internal(answer, hostile)
    assert len(hostile.internal_requests) == before
    assert_nothing_kept(proxy, group)


def test_blob_redirect_to_an_internal_address_is_refused(proxy, hostile, group):
    before = len(hostile.internal_requests)
    for method in ("GET", "HEAD"):
        answer = proxy.get(group, "redirect/loopback", "blobs", ANY_DIGEST, method=method)
        assert answer.status_code == 502
    answer = proxy.get(group, "redirect/metadata", "blobs", ANY_DIGEST)
    message = assert_registry_error(answer, 502, "UNAVAILABLE")
    assert message == "the upstream registry is unavailable: upstream redirect refused"
    assert_names_nothing_internal(answer, hostile)
    assert len(hostile.internal_requests) == before
    assert_nothing_kept(proxy, group)


@pytest.mark.parametrize("image", ["html/page", "html/json"])
def test_a_page_that_is_not_a_manifest_is_refused(proxy, hostile, group, image):
    answer = proxy.get(group, image, "manifests", "latest")
    message = assert_registry_error(answer, 502, "UNAVAILABLE")
    assert message == (
        "the upstream registry is unavailable: upstream sent something that is not a manifest"
    )
    assert_names_nothing_internal(answer, hostile)
    assert_nothing_kept(proxy, group)


def receive(answer: requests.Response) -> tuple[int, bool]:
    """How many body bytes arrived, and whether the connection was cut short."""
    received = 0
    try:
        for chunk in answer.iter_content(256 * 1024):
            received += len(chunk)
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        return received, True
    return received, False


def test_an_endless_blob_is_cut_at_the_size_cap(proxy, hostile, group):
    digest = "sha256:" + hashlib.sha256(b"endless").hexdigest()
    started = time.monotonic()
    answer = proxy.get(group, "endless/blob", "blobs", digest, stream=True, timeout=30)
    if answer.status_code == 200:
        # Streaming had begun: the cut shows as a body ending short of the cap, unterminated.
        assert "Content-Length" not in answer.headers
        received, cut = receive(answer)
        assert cut
        assert received < CAP
    else:
        # The cap was reached before the first byte went out.
        message = assert_registry_error(answer, 403, "DENIED")
        assert message == f"the blob is larger than this proxy's limit of {CAP} bytes"
        assert_names_nothing_internal(answer, hostile)
    wait_for(lambda: hostile.ended_for(digest) == 1)
    assert time.monotonic() - started < 15
    # The proxy stopped reading at the cap: what upstream got out is the cap, one read chunk
    # and the sockets' buffers (here tcp_rmem lets a receive buffer grow to 32 MiB, tcp_wmem a
    # send buffer to 4 MiB), not the endless stream: the connection was closed (ended_for).
    assert hostile.sent_for(digest) < CAP + 40 * MiB
    assert_nothing_kept(proxy, group)


def test_a_declared_terabyte_is_refused_before_download(proxy, hostile, group):
    digest = "sha256:" + hashlib.sha256(b"terabyte").hexdigest()
    head = proxy.get(group, "huge/blob", "blobs", digest, method="HEAD")
    assert head.status_code == 403
    answer = proxy.get(group, "huge/blob", "blobs", digest)
    message = assert_registry_error(answer, 403, "DENIED")
    assert message == f"the blob is larger than this proxy's limit of {CAP} bytes"
    assert_names_nothing_internal(answer, hostile)
    wait_for(lambda: hostile.ended_for(digest) == 1)
    # Only what the sockets buffered before the proxy hung up: nothing was downloaded.
    assert hostile.sent_for(digest) < 1 * MiB
    assert_nothing_kept(proxy, group)


def test_a_range_of_a_corrupt_uncached_blob_is_never_served(proxy, hostile, group):
    digest = "sha256:" + hashlib.sha256(b"the real layer").hexdigest()
    answer = proxy.get(group, "corrupt/blob", "blobs", digest, headers={"Range": "bytes=0-99"})
    message = assert_registry_error(answer, 502, "UNAVAILABLE")
    assert message == (
        "fetching the blob from upstream failed: "
        f"upstream bytes do not match {digest}; nothing was cached"
    )
    assert CORRUPT[:100] not in answer.content
    assert_names_nothing_internal(answer, hostile)
    assert_nothing_kept(proxy, group)


def test_a_range_of_a_good_uncached_blob_is_served_once_verified(proxy, hostile, group):
    answer = proxy.get(group, "good/blob", "blobs", GOOD_DIGEST, headers={"Range": "bytes=10-99"})
    assert answer.status_code == 206
    assert answer.content == GOOD[10:100]
    assert answer.headers["Content-Range"] == f"bytes 10-99/{len(GOOD)}"
    wait_for(lambda: proxy.cached_blobs(group) == 1)


def test_the_spool_share_refuses_a_blob_that_would_fill_the_disk(hostile, tmp_path):
    digest = "sha256:" + hashlib.sha256(b"share").hexdigest()
    with running_proxy(
        tmp_path,
        f"sqlite:///{tmp_path / 'proxy.sqlite'}",
        hostile.url,
        **{"depproxy.blob.max_size": str(2 * TERABYTE), "depproxy.spool.max_disk_share": "0.01"},
    ) as proxy:
        group = proxy.new_group("roomy")
        answer = proxy.get(group, "huge/blob", "blobs", digest)
        message = assert_registry_error(answer, 503, "UNAVAILABLE")
        assert message == (
            "the proxy's spool has no room for this blob now; retry later"
        )
        assert answer.headers["Retry-After"] == "60"
        assert_names_nothing_internal(answer, hostile)
        wait_for(lambda: hostile.ended_for(digest) == 1)
        assert hostile.sent_for(digest) < 1 * MiB
        assert_nothing_kept(proxy, group)
