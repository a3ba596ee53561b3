"""Tag lists and OCI 1.1 referrers through the proxy, as a real server process, from a real
registry with token auth (distribution 2.8: no referrers API, and it ignores `n` and `last`)."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import pytest
import requests
from sqlalchemy import select

from depproxy_pyramid.credentials import hash_password
from depproxy_pyramid.models import User
from tests.proxy import PROXY_MARKER, PULLER, running_proxy
from tests.support import oci
from tests.support.registry import skopeo, skopeo_pull
from tests.support.relay import Fault

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SBOM = "application/vnd.example.sbom.v1+json"
SIGNATURE = "application/vnd.example.signature.v1+json"
STRANGER = ("stranger", "stranger-password-1")


def skopeo_on_proxy(*args: str) -> dict:
    """A skopeo command against the proxy, signed in as the puller; its JSON output."""
    result = skopeo(*args[:-1], "--tls-verify=false", f"--creds={PULLER[0]}:{PULLER[1]}", args[-1])
    return json.loads(result.stdout)


def tags_of(proxy, group: str, image: str, query: str = "") -> requests.Response:
    return proxy.get(group, image, "tags", f"list{query}")


def referrers_of(proxy, group: str, image: str, digest: str, query: str = "") -> requests.Response:
    return proxy.get(group, image, "referrers", f"{digest}{query}")


def follow(proxy, group: str, image: str, link: str) -> requests.Response:
    """GET the `rel="next"` URL of a `Link` header, relative to the proxy."""
    target = re.fullmatch(r'<(/v2/[^>]+)>; rel="next"', link).group(1)
    token = proxy.token(group, image)
    return requests.get(
        f"{proxy.url}{target}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def upstream_tags(upstream, repo: str) -> list[str]:
    answer = upstream.registry.admin_client().request("GET", f"/v2/{repo}/tags/list")
    answer.raise_for_status()
    return answer.json()["tags"]


# Tag lists


def test_skopeo_inspect_without_flags_lists_the_tags(proxy, upstream, group):
    inspected = skopeo_on_proxy("inspect", f"docker://{proxy.ref(group, 'library/alpine:latest')}")
    assert inspected["Digest"] == upstream.digest_of("library/alpine", "latest")
    assert inspected["RepoTags"] == ["3.20", "latest"]


def test_skopeo_list_tags_lists_exactly_the_upstream_tags(proxy, upstream, group):
    repo = f"listed/{group}"
    for tag in ("v1", "v3", "v2", "latest"):
        upstream.move_tag(repo, tag)
    listed = skopeo_on_proxy("list-tags", f"docker://{proxy.ref(group, repo)}")
    # Sorted, as the spec has it; upstream (distribution 2.8) lists them in no order.
    assert listed["Tags"] == sorted(upstream_tags(upstream, repo)) == ["latest", "v1", "v2", "v3"]


def test_the_tag_list_names_the_clients_repository(proxy, upstream, group):
    answer = tags_of(proxy, group, "library/alpine")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    # Upstream calls it library/alpine; the client asked for its own name.
    assert answer.json() == {
        "name": f"{group}/{PROXY_MARKER}/library/alpine",
        "tags": ["3.20", "latest"],
    }
    head = proxy.get(group, "library/alpine", "tags", "list", method="HEAD")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == answer.headers["Content-Length"]


def test_pages_follow_the_link_to_this_proxy(proxy, upstream, group):
    repo = f"paged/{group}"
    for tag in ("d", "b", "a", "c", "e"):
        upstream.move_tag(repo, tag)
    name = f"{group}/{PROXY_MARKER}/{repo}"

    first = tags_of(proxy, group, repo, "?n=2")
    assert first.json() == {"name": name, "tags": ["a", "b"]}
    assert first.headers["Link"] == f'</v2/{name}/tags/list?n=2&last=b>; rel="next"'

    second = follow(proxy, group, repo, first.headers["Link"])
    assert second.json()["tags"] == ["c", "d"]
    assert second.headers["Link"] == f'</v2/{name}/tags/list?n=2&last=d>; rel="next"'

    last = tags_of(proxy, group, repo, "?n=2&last=d")
    assert last.json()["tags"] == ["e"]
    assert "Link" not in last.headers
    assert tags_of(proxy, group, repo, "?last=c").json()["tags"] == ["d", "e"]
    assert tags_of(proxy, group, repo, "?n=0").json()["tags"] == []


@pytest.mark.parametrize(
    ("query", "parameter"),
    [("?n=-1", "n"), ("?n=x", "n"), ("?n=10001", "n"), ("?n=1&n=2", "n"), ("?last=.bad", "last")],
)
def test_bad_paging_is_a_clear_400(proxy, upstream, group, query, parameter):
    answer = tags_of(proxy, group, "library/alpine", query)
    assert answer.status_code == 400
    (error,) = answer.json()["errors"]
    assert error["code"] == "UNSUPPORTED"
    assert parameter in error["message"]
    assert upstream.relay.count(kind="tags") == 0


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE"])
def test_a_push_to_a_list_gets_405_with_allow(proxy, upstream, group, method):
    token = proxy.token(group, "library/alpine")
    name = f"{group}/{PROXY_MARKER}/library/alpine"
    for path in ("tags/list", f"referrers/sha256:{'a' * 64}"):
        answer = requests.request(
            method,
            f"{proxy.url}/v2/{name}/{path}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert answer.status_code == 405
        assert answer.headers["Allow"] == "GET, HEAD"
        assert answer.json()["errors"][0]["code"] == "UNSUPPORTED"


def test_an_unknown_repository_is_name_unknown(proxy, upstream, group):
    answer = tags_of(proxy, group, "no/such/image")
    assert answer.status_code == 404
    assert answer.json()["errors"][0]["code"] == "NAME_UNKNOWN"


@pytest.mark.parametrize("failure", ["stopped", Fault.STATUS_503, Fault.STATUS_429])
def test_the_last_known_list_is_served_when_upstream_fails(proxy, upstream, group, failure):
    known = tags_of(proxy, group, "library/alpine", "?n=1")
    assert known.status_code == 200
    if failure == "stopped":
        upstream.registry.stop()
    else:
        upstream.relay.set_mode(failure)
        upstream.token_relay.set_mode(failure)
    stale = tags_of(proxy, group, "library/alpine", "?n=1")
    assert stale.status_code == 200
    assert stale.json() == known.json()
    assert stale.headers["Link"] == known.headers["Link"]
    proxy.server.wait_for_log("kind=tags reference=list user=puller status=200 result=stale")


def test_without_a_known_list_the_upstream_error_is_passed_on(proxy, upstream, group):
    tags_of(proxy, group, "library/alpine", "?n=1")
    upstream.registry.stop()
    # Another page was never fetched: nothing to serve.
    answer = tags_of(proxy, group, "library/alpine", "?n=2")
    assert answer.status_code == 502
    assert answer.json()["errors"][0]["code"] == "UNAVAILABLE"
    upstream.registry.start()
    upstream.relay.set_mode(Fault.STATUS_429)
    answer = tags_of(proxy, group, "library/alpine", "?n=3")
    assert answer.status_code == 429
    assert answer.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert answer.headers["Retry-After"] == "7"


def test_within_the_freshness_time_upstream_is_not_asked_again(upstream, tmp_path):
    settings = {"depproxy.manifest.freshness_seconds": "60"}
    with running_proxy(
        tmp_path, f"sqlite:///{tmp_path / 'proxy.sqlite'}", upstream.url, **settings
    ) as proxy:
        group = proxy.new_group("fresh")
        digest = upstream.digest_of("library/alpine", "latest")
        first = tags_of(proxy, group, "library/alpine")
        assert referrers_of(proxy, group, "library/alpine", digest).status_code == 200
        assert upstream.relay.count(kind="tags") >= 1
        assert upstream.relay.count(kind="referrers") >= 1
        upstream.relay.reset_counts()
        assert tags_of(proxy, group, "library/alpine").json() == first.json()
        assert referrers_of(proxy, group, "library/alpine", digest).status_code == 200
        assert upstream.relay.count() == 0
        proxy.server.wait_for_log("kind=tags reference=list user=puller status=200 result=hit")
        proxy.server.wait_for_log(f"reference={digest} user=puller status=200 result=hit")


def _stranger(proxy) -> tuple[str, str]:
    manager, session = proxy.db.session()
    with manager:
        if session.scalar(select(User).where(User.username == STRANGER[0])) is None:
            session.add(User(username=STRANGER[0], password_hash=hash_password(STRANGER[1])))
    return STRANGER


@pytest.mark.parametrize("who", ["anonymous", "stranger"])
def test_a_private_groups_list_is_refused_as_its_manifests_are(proxy, upstream, group, who):
    name = f"{group}/{PROXY_MARKER}/library/alpine"
    headers = {}
    if who == "stranger":
        token = requests.get(
            f"{proxy.url}/jwt/auth",
            params={"service": "dependency_proxy", "scope": f"repository:{name}:pull"},
            auth=_stranger(proxy),
            timeout=10,
        ).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}

    def answer(path: str) -> tuple[int, str, str | None]:
        got = requests.get(f"{proxy.url}/v2/{name}/{path}", headers=headers, timeout=10)
        return got.status_code, got.json()["errors"][0]["code"], got.headers.get("WWW-Authenticate")

    refusal = answer("manifests/latest")
    assert refusal[:2] == ((401, "UNAUTHORIZED") if who == "anonymous" else (404, "NAME_UNKNOWN"))
    assert answer("tags/list") == refusal
    assert answer(f"referrers/sha256:{'a' * 64}") == refusal
    assert upstream.relay.count(kind="tags") == upstream.relay.count(kind="referrers") == 0


# Referrers


@pytest.fixture
def referred(upstream, group):
    """An image of this test's own upstream, with an SBOM and a signature about it."""
    repo = f"referred/{group}"
    subject = upstream.move_tag(repo, "1.0")
    sbom = upstream.push_referrer(repo, "1.0", SBOM, b'{"sbom": true}')
    signature = upstream.push_referrer(repo, "1.0", SIGNATURE, b"signed")
    return repo, subject.digest, sbom, signature


def test_referrers_come_from_the_referrers_tag_when_upstream_has_no_api(proxy, referred, group):
    repo, subject, sbom, signature = referred
    answer = referrers_of(proxy, group, repo, subject)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in answer.headers
    assert answer.json() == {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [sbom, signature],
    }


def test_referrers_filter_by_artifact_type_and_say_so(proxy, referred, group):
    repo, subject, sbom, _ = referred
    answer = referrers_of(proxy, group, repo, subject, f"?artifactType={quote(SBOM)}")
    assert answer.status_code == 200
    assert answer.headers["OCI-Filters-Applied"] == "artifactType"
    assert answer.json()["manifests"] == [sbom]
    none = referrers_of(proxy, group, repo, subject, "?artifactType=application/x-none")
    assert none.json()["manifests"] == []
    assert none.headers["OCI-Filters-Applied"] == "artifactType"


def test_the_referrers_tag_pulls_through_like_any_tag(proxy, upstream, referred, group, tmp_path):
    repo, subject, sbom, signature = referred
    tag = oci.referrers_tag(subject)
    reference = proxy.ref(group, f"{repo}:{tag}")
    # --raw: skopeo refuses image operations on an artifact (its config is the empty one),
    # upstream's as much as ours.
    inspected = skopeo_on_proxy("inspect", "--raw", f"docker://{reference}")
    assert inspected["manifests"] == [sbom, signature]
    served = proxy.get(group, repo, "manifests", tag)
    assert served.status_code == 200
    assert served.content == upstream.manifest(repo, tag).content
    assert served.headers["Docker-Content-Digest"] == upstream.digest_of(repo, tag)
    # Every artifact the index lists, and their blobs, come through too.
    skopeo_pull(reference, tmp_path / "artifacts", creds=PULLER, all=True)
    blobs = tmp_path / "artifacts" / "blobs" / "sha256"
    for artifact in (sbom, signature):
        assert (blobs / artifact["digest"].removeprefix("sha256:")).read_bytes() == (
            upstream.manifest(repo, artifact["digest"]).content
        )


def test_a_subject_without_referrers_has_an_empty_index(proxy, upstream, group):
    digest = upstream.digest_of("library/alpine", "latest")
    answer = referrers_of(proxy, group, "library/alpine", digest)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == OCI_INDEX
    assert answer.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


def test_an_invalid_subject_digest_is_digest_invalid(proxy, upstream, group):
    answer = referrers_of(proxy, group, "library/alpine", "sha256:nothex")
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["code"] == "DIGEST_INVALID"


def test_the_last_known_referrers_are_served_when_upstream_is_down(
    proxy, upstream, referred, group
):
    repo, subject, sbom, signature = referred
    known = referrers_of(proxy, group, repo, subject)
    assert known.json()["manifests"] == [sbom, signature]
    upstream.registry.stop()
    stale = referrers_of(proxy, group, repo, subject, f"?artifactType={quote(SIGNATURE)}")
    assert stale.status_code == 200
    assert stale.json()["manifests"] == [signature]
    proxy.server.wait_for_log(f"reference={subject} user=puller status=200 result=stale")
    unknown = referrers_of(proxy, group, repo, f"sha256:{'b' * 64}")
    assert unknown.status_code == 502
    assert unknown.json()["errors"][0]["code"] == "UNAVAILABLE"


# Through the mirror group


def test_tags_and_referrers_of_bare_names_through_an_open_mirror(upstream, tmp_path):
    """The mirror group answers the listing endpoints at the root too, anonymously when the
    operator opened it, and names the client's bare repository in bodies and links."""
    with running_proxy(
        tmp_path,
        f"sqlite:///{tmp_path / 'proxy.sqlite'}",
        upstream.url,
        **{"depproxy.mirror.group": "mirror", "depproxy.mirror.anonymous": "true"},
    ) as proxy:
        proxy.new_group("mirror")
        ref = f"docker://{proxy.host}/library/alpine"
        listed = json.loads(skopeo("list-tags", "--tls-verify=false", ref).stdout)
        assert listed["Tags"] == sorted(upstream_tags(upstream, "library/alpine"))
        inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"{ref}:latest").stdout)
        assert inspected["Digest"] == upstream.digest_of("library/alpine", "latest")

        token = requests.get(
            f"{proxy.url}/jwt/auth",
            params={"service": "dependency_proxy", "scope": "repository:library/alpine:pull"},
            timeout=10,
        ).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        page = requests.get(
            f"{proxy.url}/v2/library/alpine/tags/list?n=1", headers=headers, timeout=30
        )
        assert page.json() == {"name": "library/alpine", "tags": ["3.20"]}
        assert page.headers["Link"] == '</v2/library/alpine/tags/list?n=1&last=3.20>; rel="next"'
        subject = upstream.digest_of("library/alpine", "latest")
        referrers = requests.get(
            f"{proxy.url}/v2/library/alpine/referrers/{subject}", headers=headers, timeout=30
        )
        assert referrers.status_code == 200
        assert referrers.headers["Content-Type"] == OCI_INDEX
        assert referrers.json()["manifests"] == []
