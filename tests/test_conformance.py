"""The OCI distribution-spec conformance suite's pull workflow (v1.0.1), and the spec's rules on
error codes, 405s and ranges, against the proxy as a real server process.

The suite itself is Go with modules Debian does not package (reggie, ginkgo, gomega), so CI
cannot build it offline; these are its twelve pull checks, request for request, with the
proxy's repository standing for `OCI_NAMESPACE` and a cached tag for `OCI_TAG_NAME`.
"""

from __future__ import annotations

import hashlib

import pytest
import requests

from depproxy_pyramid.errors import SERVER_CODES, SPEC_CODES
from tests.proxy import PROXY_MARKER

IMAGE = "library/alpine"
TAG = "latest"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DUMMY_DIGEST = "sha256:" + hashlib.sha256(b"hello world").hexdigest()
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"


@pytest.fixture
def namespace(proxy, group) -> str:
    return f"{group}/{PROXY_MARKER}/{IMAGE}"


@pytest.fixture
def client(proxy, group):
    """What the suite's client does: a bearer token for the namespace on every request."""
    token = proxy.token(group, IMAGE)

    def send(method: str, path: str, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
        return requests.request(method, f"{proxy.url}{path}", headers=headers, timeout=30, **kw)

    return send


@pytest.fixture
def seeded(upstream) -> tuple[str, str]:
    """The tag's manifest digest and its config blob's digest, as upstream has them."""
    manifest = upstream.manifest(IMAGE, TAG)
    assert manifest.headers["Content-Type"] == OCI_MANIFEST
    return upstream.digest_of(IMAGE, TAG), manifest.json()["config"]["digest"]


def test_pull_workflow(client, namespace, seeded):
    manifest_digest, config_digest = seeded
    base = f"/v2/{namespace}"
    oci = {"Accept": OCI_MANIFEST}

    # Pull blobs
    answer = client("HEAD", f"{base}/blobs/{DUMMY_DIGEST}")
    assert answer.status_code == 404
    answer = client("HEAD", f"{base}/blobs/{config_digest}")
    assert answer.status_code == 200
    assert answer.headers["Docker-Content-Digest"] == config_digest
    answer = client("GET", f"{base}/blobs/{DUMMY_DIGEST}")
    assert answer.status_code == 404
    answer = client("GET", f"{base}/blobs/{config_digest}")
    assert answer.status_code == 200
    assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == config_digest

    # Pull manifests
    answer = client("HEAD", f"{base}/manifests/{NONEXISTENT_MANIFEST}")
    assert answer.status_code == 404
    answer = client("HEAD", f"{base}/manifests/{manifest_digest}", headers=oci)
    assert answer.status_code == 200
    assert answer.headers["Docker-Content-Digest"] == manifest_digest
    answer = client("GET", f"{base}/manifests/{TAG}", headers=oci)
    assert answer.status_code == 200
    assert answer.headers["Docker-Content-Digest"] == manifest_digest
    answer = client("GET", f"{base}/manifests/{NONEXISTENT_MANIFEST}")
    assert answer.status_code == 404
    answer = client("GET", f"{base}/manifests/{manifest_digest}", headers=oci)
    assert answer.status_code == 200
    answer = client("GET", f"{base}/manifests/{TAG}", headers=oci)
    assert answer.status_code == 200

    # Error codes
    answer = client(
        "PUT",
        f"{base}/manifests/sha256:totallywrong",
        headers={"Content-Type": OCI_MANIFEST},
        data=b"blablabla",
    )
    assert answer.status_code in (400, 404)
    assert answer.json()["errors"][0]["code"] in SPEC_CODES


def assert_spec_error(answer: requests.Response, status: int, code: str) -> dict:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    error = answer.json()["errors"][0]
    assert error["code"] == code
    assert code in (SERVER_CODES if status >= 500 else SPEC_CODES)
    assert error["message"]
    return error


def test_every_client_error_carries_a_code_from_the_spec(proxy, client, namespace, seeded):
    manifest_digest, config_digest = seeded
    base = f"/v2/{namespace}"
    assert_spec_error(client("GET", f"{base}/manifests/no-such-tag"), 404, "MANIFEST_UNKNOWN")
    assert_spec_error(client("GET", f"{base}/manifests/bad!tag"), 404, "MANIFEST_UNKNOWN")
    assert_spec_error(client("GET", f"{base}/manifests/sha256:short"), 404, "MANIFEST_UNKNOWN")
    assert_spec_error(client("GET", f"{base}/blobs/sha256:short"), 404, "BLOB_UNKNOWN")
    assert_spec_error(client("GET", f"{base}/blobs/latest"), 404, "BLOB_UNKNOWN")
    assert_spec_error(client("GET", f"{base}/blobs/{DUMMY_DIGEST}"), 404, "BLOB_UNKNOWN")
    assert_spec_error(client("GET", f"{base}/nothing/here"), 404, "UNSUPPORTED")
    assert_spec_error(client("GET", "/v2/_catalog"), 404, "UNSUPPORTED")
    past_the_end = client("GET", f"{base}/blobs/{config_digest}", headers={"Range": "bytes=1-"})
    assert past_the_end.status_code == 206
    size = int(past_the_end.headers["Content-Range"].rpartition("/")[2])
    unsatisfiable = client(
        "GET", f"{base}/blobs/{config_digest}", headers={"Range": f"bytes={size}-"}
    )
    assert_spec_error(unsatisfiable, 416, "SIZE_INVALID")
    assert unsatisfiable.headers["Content-Range"] == f"bytes */{size}"
    anonymous = requests.get(f"{proxy.url}{base}/manifests/{TAG}", timeout=10)
    assert_spec_error(anonymous, 401, "UNAUTHORIZED")
    assert_spec_error(
        client("GET", f"/v2/x/{PROXY_MARKER}/Upper/manifests/{TAG}"), 400, "NAME_INVALID"
    )
    assert_spec_error(requests.post(f"{proxy.url}/jwt/auth", timeout=10), 405, "UNSUPPORTED")


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE", "OPTIONS"])
def test_a_push_gets_405_with_allow(proxy, client, namespace, seeded, method):
    manifest_digest, config_digest = seeded
    base = f"/v2/{namespace}"
    for path in (f"{base}/manifests/{TAG}", f"{base}/manifests/{manifest_digest}"):
        error = assert_spec_error(client(method, path), 405, "UNSUPPORTED")
        assert "read-only" in error["message"]
    answer = client(method, f"{base}/blobs/{config_digest}")
    assert_spec_error(answer, 405, "UNSUPPORTED")
    assert answer.headers["Allow"] == "GET, HEAD"
    # Upload sessions exist on no read-only registry: the resource allows nothing.
    for path in (f"{base}/blobs/uploads/", f"{base}/blobs/uploads/0b2c7a4e"):
        answer = client(method, path)
        assert_spec_error(answer, 405, "UNSUPPORTED")
        assert answer.headers["Allow"] == ""
    for path in ("/v2/", "/jwt/auth", "/-/metrics"):
        answer = requests.request(method, f"{proxy.url}{path}", timeout=10)
        assert_spec_error(answer, 405, "UNSUPPORTED")
        assert answer.headers["Allow"] == "GET, HEAD"


def test_a_malformed_reference_is_unknown_whatever_the_method(client, namespace):
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        answer = client(method, f"/v2/{namespace}/manifests/{NONEXISTENT_MANIFEST}")
        assert answer.status_code == 404
        if method != "HEAD":
            assert answer.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize("cached", [False, True], ids=["filling", "cached"])
def test_several_ranges_get_the_whole_blob(client, namespace, seeded, cached):
    """RFC 9110: all the ranges or a 200 with everything; never just the first range."""
    _, config_digest = seeded
    path = f"/v2/{namespace}/blobs/{config_digest}"
    if cached:
        assert client("GET", path).status_code == 200
    answer = client("GET", path, headers={"Range": "bytes=0-1,5-6"})
    assert answer.status_code == 200
    assert "Content-Range" not in answer.headers
    assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == config_digest
    single = client("GET", path, headers={"Range": "bytes=0-1"})
    assert single.status_code == 206
    assert single.content == answer.content[:2]
