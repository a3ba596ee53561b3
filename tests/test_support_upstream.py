"""The upstream test infrastructure does what the proxy tests rely on it to do.

If these fail, proxy test failures mean nothing: they check that seeded images pull
through the relay, that auth behaves like Docker Hub, that media types are the
advertised ones, that the relay counts exactly and that each fault mode breaks
pulls the way it claims to.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
import pytest
import requests
from cryptography import x509

from tests.support import oci
from tests.support.registry import RegistryClient, skopeo, skopeo_pull
from tests.support.relay import Fault
from tests.support.token_server import TokenServer, libtrust_key_id

if TYPE_CHECKING:
    from tests.support.fixtures import Upstream


PUBLIC = ["library/alpine:latest", "library/alpine:3.20", "schema2/app:1.0"]
LISTS = ["multiarch/app:1.0", "dockerlist/app:1.0"]


def wait_for(condition: Callable[[], bool], timeout: float = 5) -> bool:
    """Poll ``condition``: some effects (access log lines) land just after the response."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def relay_client(upstream: Upstream, credentials: tuple[str, str] | None = None) -> RegistryClient:
    """A client going through the relays, as the proxy under test would."""
    return RegistryClient(upstream.url, *(credentials or (None, "")))


def first_layer(upstream: Upstream, ref: str) -> oci.Descriptor:
    source = upstream.images[ref].source
    assert isinstance(source, oci.Image)
    return source.layers[0]


@pytest.mark.parametrize("ref", PUBLIC)
def test_public_images_pull_anonymously_through_the_relay(
    upstream: Upstream, ref: str, tmp_path: Path
) -> None:
    skopeo_pull(f"{upstream.relay.host}/{ref}", tmp_path / "out")
    # A client pull verifies every digest, so the blobs it fetched are exactly the source's.
    assert upstream.relay.count("GET", "blob") == len(upstream.images[ref].source.blob_digests)


@pytest.mark.parametrize("ref", LISTS)
def test_multi_platform_images_pull_all_platforms(
    upstream: Upstream, ref: str, tmp_path: Path
) -> None:
    skopeo_pull(f"{upstream.relay.host}/{ref}", tmp_path / "out", all=True)
    # 1 list + 2 platform manifests; 2 configs + 2 layers.
    assert upstream.relay.count("GET", "manifest") == 3
    assert upstream.relay.count("GET", "blob") == 4


def test_private_image_needs_credentials(upstream: Upstream, tmp_path: Path) -> None:
    reference = f"{upstream.relay.host}/{upstream.private_prefix}secret:1.0"

    anonymous = skopeo_pull(reference, tmp_path / "anon", check=False)
    assert anonymous.returncode != 0
    assert "denied" in anonymous.stderr or "unauthorized" in anonymous.stderr

    wrong = skopeo_pull(reference, tmp_path / "wrong", creds=("puller", "nope"), check=False)
    assert wrong.returncode != 0
    assert any(r.status == 401 for r in upstream.token_server.requests)

    skopeo_pull(reference, tmp_path / "ok", creds=upstream.private_credentials)


@pytest.mark.parametrize(
    ("ref", "media_type"),
    [
        ("library/alpine:latest", oci.OCI_MANIFEST),
        ("multiarch/app:1.0", oci.OCI_INDEX),
        ("dockerlist/app:1.0", oci.DOCKER_MANIFEST_LIST),
        ("schema2/app:1.0", oci.DOCKER_MANIFEST),
        ("big/image:1.0", oci.OCI_MANIFEST),
    ],
)
def test_manifest_media_types(upstream: Upstream, ref: str, media_type: str) -> None:
    repo, tag = ref.split(":")
    response = relay_client(upstream).manifest(repo, tag)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == media_type
    assert response.json()["mediaType"] == media_type
    assert response.headers["Docker-Content-Digest"] == upstream.images[ref].digest


def test_docker_manifest_list_children_are_docker_manifests(upstream: Upstream) -> None:
    manifests = upstream.manifest("dockerlist/app", "1.0").json()["manifests"]
    assert [m["platform"]["architecture"] for m in manifests] == ["amd64", "arm64"]
    assert {m["mediaType"] for m in manifests} == {oci.DOCKER_MANIFEST}


def test_oci_digests_are_preserved_from_the_layout(upstream: Upstream) -> None:
    for ref in ["library/alpine:latest", "multiarch/app:1.0", "big/image:1.0"]:
        source = upstream.images[ref].source
        descriptor = source.index if isinstance(source, oci.ImageIndex) else source.manifest
        assert upstream.images[ref].digest == descriptor.digest


def test_alpine_tags_share_their_base_layer(upstream: Upstream) -> None:
    assert first_layer(upstream, "library/alpine:latest") == first_layer(
        upstream, "library/alpine:3.20"
    )
    assert upstream.digest_of("library/alpine", "latest") != upstream.digest_of(
        "library/alpine", "3.20"
    )


def test_big_image_streams_through_the_relay(upstream: Upstream, tmp_path: Path) -> None:
    layer = first_layer(upstream, "big/image:1.0")
    assert layer.media_type == oci.OCI_LAYER_TAR
    assert layer.size > upstream.big_layer_mb * oci.MIB

    skopeo_pull(f"{upstream.relay.host}/big/image:1.0", tmp_path / "out")

    assert upstream.relay.blob_fetches()[layer.digest] == 1
    pulled = tmp_path / "out" / "blobs" / "sha256" / layer.digest.split(":")[1]
    assert pulled.stat().st_size == layer.size


def test_token_is_rs256_with_libtrust_kid_and_docker_claims(token_server: TokenServer) -> None:
    access = token_server.grant(None, ["repository:library/alpine:pull,push"])
    body = token_server.issue(None, "test-registry", access)
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300

    header = jwt.get_unverified_header(body["token"])
    assert header["alg"] == "RS256"
    groups = header["kid"].split(":")
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)

    public_key = x509.load_pem_x509_certificate(token_server.cert_path.read_bytes()).public_key()
    assert libtrust_key_id(public_key) == header["kid"]
    claims = jwt.decode(body["token"], public_key, algorithms=["RS256"], audience="test-registry")
    assert claims["iss"] == token_server.issuer
    assert claims["access"] == [
        {"type": "repository", "name": "library/alpine", "actions": ["pull"]}
    ]
    assert {"sub", "exp", "nbf", "iat", "jti"} <= claims.keys()


def test_registry_checks_the_libtrust_kid(upstream: Upstream) -> None:
    """The registry accepts our tokens because of the kid: the same token re-signed with
    the same key but another kid is refused."""
    server = upstream.token_server
    access = server.grant(None, ["repository:library/alpine:pull"])
    good = server.issue(None, upstream.service, access)["token"]
    claims = jwt.decode(good, options={"verify_signature": False})
    bad = jwt.encode(claims, server.signing_key, "RS256", headers={"kid": "A" * 4 + ":AAAA" * 11})
    url = f"{upstream.registry_url}/v2/library/alpine/manifests/latest"
    for token, status in [(good, 200), (bad, 401)]:
        headers = {"Authorization": f"Bearer {token}", "Accept": oci.OCI_MANIFEST}
        assert requests.get(url, headers=headers, timeout=10).status_code == status


def _token(
    upstream: Upstream, scope: str, credentials: tuple[str, str] | None = None
) -> requests.Response:
    return requests.get(
        f"{upstream.token_relay.url}/token",
        params={"service": upstream.service, "scope": scope},
        auth=credentials,
        timeout=10,
    )


def _granted(response: requests.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return jwt.decode(response.json()["token"], options={"verify_signature": False})["access"]


def test_token_policy_is_docker_hub_like(upstream: Upstream) -> None:
    private = f"repository:{upstream.private_prefix}secret:pull"
    assert _granted(_token(upstream, "repository:library/alpine:pull"))[0]["actions"] == ["pull"]
    assert _granted(_token(upstream, private)) == []
    assert _granted(_token(upstream, private, upstream.private_credentials))[0]["name"] == (
        f"{upstream.private_prefix}secret"
    )
    assert _granted(_token(upstream, "repository:x/y:push", upstream.private_credentials)) == []
    assert _granted(_token(upstream, "repository:x/y:pull,push", upstream.admin_credentials))[0][
        "actions"
    ] == ["pull", "push"]
    assert _token(upstream, private, ("puller", "wrong")).status_code == 401
    bad_header = {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}
    response = requests.get(f"{upstream.token_relay.url}/token", headers=bad_header, timeout=10)
    assert response.status_code == 401
    assert upstream.token_server.count() == 7
    assert upstream.token_relay.count("GET", "token") == 7


def test_relay_counts_and_forwards_head_and_range(upstream: Upstream) -> None:
    client = relay_client(upstream)
    head = client.manifest("library/alpine", "latest", method="HEAD")
    assert head.status_code == 200
    assert head.headers["Docker-Content-Digest"] == upstream.images["library/alpine:latest"].digest
    assert int(head.headers["Content-Length"]) > 0

    layer = first_layer(upstream, "library/alpine:latest")
    ranged = client.request(
        "GET", f"/v2/library/alpine/blobs/{layer.digest}", headers={"Range": "bytes=0-9"}
    )
    assert ranged.status_code == 206
    assert len(ranged.content) == 10

    # Each call is a 401 challenge then the retry with a token.
    assert upstream.relay.count("HEAD", "manifest") == 2
    assert upstream.relay.count("GET", "blob") == 2
    assert upstream.relay.blob_fetches() == {layer.digest: 2}
    assert upstream.token_relay.count("GET", "token") == 2
    assert wait_for(lambda: upstream.registry.count_requests("GET", r"/blobs/sha256:") == 2)


def test_push_through_the_relay(upstream: Upstream) -> None:
    """A client push (POST, PATCH, PUT to relative upload locations) survives the relay."""
    image = oci.write_image(upstream.layout_dir("pushed"), "v1", "pushed-through-relay")
    admin = ":".join(upstream.admin_credentials)
    skopeo(
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        f"--dest-creds={admin}",
        "--preserve-digests",
        image.oci_ref,
        f"docker://{upstream.relay.host}/relay/pushed:v1",
    )
    assert upstream.digest_of("relay/pushed", "v1") == image.manifest.digest
    assert upstream.relay.count("POST") >= 1
    assert upstream.relay.count("PUT", "manifest") == 1


def test_chunked_upload_through_the_relay(upstream: Upstream) -> None:
    """Chunked request bodies are re-chunked upstream, and Host passes through untouched
    (the registry builds its upload Location from it)."""
    repo = "relay/chunked"
    token = _token(upstream, f"repository:{repo}:pull,push", upstream.admin_credentials)
    auth = {"Authorization": f"Bearer {token.json()['token']}"}
    start = requests.post(f"{upstream.url}/v2/{repo}/blobs/uploads/", headers=auth, timeout=10)
    assert start.status_code == 202
    assert start.headers["Location"].startswith(upstream.url)

    data = bytes(range(256)) * 1000
    chunks = iter([data[:100_000], data[100_000:]])  # an iterator makes requests send chunked
    patch = requests.patch(start.headers["Location"], data=chunks, headers=auth, timeout=10)
    assert patch.status_code == 202
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    put = requests.put(
        patch.headers["Location"], params={"digest": digest}, headers=auth, timeout=10
    )
    assert put.status_code == 201
    blob_url = f"{upstream.registry_url}/v2/{repo}/blobs/{digest}"
    head = requests.head(blob_url, headers=auth, timeout=10)
    assert head.headers["Content-Length"] == str(len(data))


def test_move_tag_changes_digest_but_keeps_old_manifest(upstream: Upstream) -> None:
    first = upstream.move_tag("moving/app", "latest")
    second = upstream.move_tag("moving/app", "latest")
    assert first.digest != second.digest
    assert upstream.digest_of("moving/app", "latest") == second.digest
    assert upstream.digest_of("moving/app", first.digest) == first.digest


def test_registry_stop_and_restart_keeps_port_and_content(upstream: Upstream) -> None:
    client = relay_client(upstream)
    port = upstream.registry.port
    upstream.registry.stop()
    with pytest.raises(requests.ConnectionError):
        client.manifest("library/alpine", "latest")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{upstream.registry_url}/v2/", timeout=5)

    upstream.registry.start()
    assert upstream.registry.port == port
    response = client.manifest("library/alpine", "latest")
    assert response.headers["Docker-Content-Digest"] == (
        upstream.images["library/alpine:latest"].digest
    )


def test_fault_down_resets_connections(upstream: Upstream) -> None:
    with upstream.relay.fault(Fault.DOWN), pytest.raises(requests.ConnectionError):
        requests.get(f"{upstream.url}/v2/", timeout=5)
    assert requests.get(f"{upstream.url}/v2/", timeout=5).status_code == 401


@pytest.mark.parametrize(("fault", "status"), [(Fault.STATUS_503, 503), (Fault.STATUS_429, 429)])
def test_status_faults(upstream: Upstream, fault: Fault, status: int, tmp_path: Path) -> None:
    upstream.relay.set_mode(fault)
    response = requests.get(f"{upstream.url}/v2/library/alpine/manifests/latest", timeout=5)
    assert response.status_code == status
    assert response.json()["errors"][0]["code"] in {"UNAVAILABLE", "TOOMANYREQUESTS"}
    if fault is Fault.STATUS_429:
        # (Not pulled with skopeo: it honours Retry-After and would retry for a minute.)
        assert response.headers["Retry-After"] == "7"
    else:
        pull = skopeo_pull(f"{upstream.relay.host}/library/alpine:latest", tmp_path, check=False)
        assert "503" in pull.stderr


def test_fault_can_be_limited_to_blobs(upstream: Upstream) -> None:
    client = relay_client(upstream)
    layer = first_layer(upstream, "library/alpine:latest")
    upstream.relay.set_mode(Fault.STATUS_503, kinds={"blob"})
    assert client.manifest("library/alpine", "latest").status_code == 200
    assert client.request("GET", f"/v2/library/alpine/blobs/{layer.digest}").status_code == 503


def test_corrupt_blobs_fail_digest_verification(upstream: Upstream, tmp_path: Path) -> None:
    upstream.relay.set_mode(Fault.CORRUPT_BLOBS)
    result = skopeo_pull(f"{upstream.relay.host}/library/alpine:latest", tmp_path, check=False)
    assert result.returncode != 0
    assert "Digest did not match" in result.stderr

    layer = first_layer(upstream, "library/alpine:latest")
    body = relay_client(upstream).request("GET", f"/v2/library/alpine/blobs/{layer.digest}")
    assert body.status_code == 200
    assert len(body.content) == layer.size
    assert f"sha256:{hashlib.sha256(body.content).hexdigest()}" != layer.digest


def test_truncated_blobs_end_early(upstream: Upstream, tmp_path: Path) -> None:
    upstream.relay.set_mode(Fault.TRUNCATE_BLOBS)
    layer = first_layer(upstream, "library/alpine:latest")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        relay_client(upstream).request("GET", f"/v2/library/alpine/blobs/{layer.digest}")
    result = skopeo_pull(f"{upstream.relay.host}/library/alpine:latest", tmp_path, check=False)
    assert "unexpected EOF" in result.stderr


def test_stalled_blobs_hang_until_released(upstream: Upstream) -> None:
    upstream.relay.set_mode(Fault.STALL_BLOBS)
    layer = first_layer(upstream, "library/alpine:latest")
    client = relay_client(upstream)
    response = client.request(
        "GET", f"/v2/library/alpine/blobs/{layer.digest}", stream=True, timeout=(5, 0.5)
    )
    assert response.status_code == 200
    received = bytearray()
    with pytest.raises(requests.exceptions.ConnectionError):  # read timeout, mid-body
        for chunk in response.iter_content(1):
            received += chunk
    assert len(received) == layer.size // 2
    response.close()

    # Released stalls close the connection without sending the rest.
    response = client.request(
        "GET", f"/v2/library/alpine/blobs/{layer.digest}", stream=True, timeout=10
    )
    threading.Timer(0.3, upstream.relay.release_stalled).start()
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        response.content  # noqa: B018 - reading the body is the point
    assert 0.2 < time.monotonic() - started < 5


def test_hung_requests_get_no_answer_until_released(upstream: Upstream) -> None:
    upstream.relay.set_mode(Fault.HANG)
    url = f"{upstream.url}/v2/library/alpine/manifests/latest"
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(url, timeout=(5, 0.5))
    assert 0.5 <= time.monotonic() - started < 5
    assert upstream.relay.count(method="GET", kind="manifest") == 1

    # Released, a hung request is closed without an answer, and the next one is relayed.
    threading.Timer(0.3, upstream.relay.set_mode, args=(Fault.NORMAL,)).start()
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url, timeout=10)
    assert 0.2 < time.monotonic() - started < 5
    assert requests.get(url, timeout=5).status_code == 401


def test_slow_mode_delays_requests(upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream.relay, "slow_seconds", 0.3)
    upstream.relay.set_mode(Fault.SLOW)
    started = time.monotonic()
    assert requests.get(f"{upstream.url}/v2/", timeout=5).status_code == 401
    assert time.monotonic() - started >= 0.3


def test_token_relay_faults_break_auth_only(upstream: Upstream, tmp_path: Path) -> None:
    upstream.token_relay.set_mode(Fault.STATUS_503)
    assert requests.get(f"{upstream.url}/v2/", timeout=5).status_code == 401
    result = skopeo_pull(f"{upstream.relay.host}/library/alpine:latest", tmp_path, check=False)
    assert result.returncode != 0
    # The fixture's own helpers bypass the token relay, so they keep working.
    assert upstream.digest_of("library/alpine", "latest")
