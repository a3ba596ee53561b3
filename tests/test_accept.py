"""Manifests negotiated on Accept, through a real server process in front of a real registry.

Debian's distribution 2.8 is the upstream. The tests first check, against it directly, what it
answers a narrowed Accept with (a tag's Docker manifest list becomes its linux/amd64 manifest
for a schema-2-only client; an OCI index is 404 to a client not taking indexes; Docker types
become schema 1 for a client taking only OCI types), then what the proxy makes of it.
"""

from __future__ import annotations

import json

import pytest
import requests
from sqlalchemy import event, select

from depproxy_pyramid import main
from depproxy_pyramid.models import CachedTag, Group
from depproxy_pyramid.negotiation import accepted_manifests
from depproxy_pyramid.requestlog import Result
from depproxy_pyramid.services.proxy import GroupUpstream
from depproxy_pyramid.upstream import (
    ALL_MANIFESTS,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    ManifestAccept,
)
from tests.conftest import Database, app_settings, migrate
from tests.proxy import PULLER
from tests.support.registry import skopeo_pull

SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_LIST = ("dockerlist/app", "1.0")  # seeded: a Docker manifest list, Docker types inside
OCI_LIST = ("multiarch/app", "1.0")  # seeded: an OCI index
SCHEMA2_IMAGE = ("schema2/app", "1.0")  # seeded: a Docker schema 2 manifest


def upstream_answer(upstream, repo: str, reference: str, accept: str) -> requests.Response:
    """The registry's own answer to `accept`, asked directly as admin."""
    return upstream.registry.admin_client().request(
        "GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": accept}
    )


def amd64_manifest(upstream, repo: str, tag: str) -> str:
    listing = upstream.manifest(repo, tag).json()
    [digest] = [
        entry["digest"]
        for entry in listing["manifests"]
        if entry["platform"] == {"architecture": "amd64", "os": "linux"}
    ]
    return digest


def tag_rows(proxy, group: str, image: str, tag: str) -> dict[str, str]:
    """The group's cached answers for a tag: Accept asked with -> digest."""
    manager, session = proxy.db.session()
    with manager:
        rows = session.execute(
            select(CachedTag.accept, CachedTag.digest)
            .join(Group, Group.id == CachedTag.group_id)
            .where(Group.path == group, CachedTag.image == image, CachedTag.tag == tag)
        ).all()
    return dict(rows)


def manifest_requests(upstream) -> list[tuple[str, str, str | None]]:
    """The manifest requests upstream answered (not the ones it challenged for a token)."""
    return [
        (r.method, r.path.rpartition("/")[2], r.accept)
        for r in upstream.relay.requests
        if r.kind == "manifest" and r.authorized
    ]


def error_of(answer: requests.Response) -> tuple[int, str, str]:
    error = answer.json()["errors"][0]
    return answer.status_code, error["code"], error["message"]


def test_distribution_narrows_a_docker_list_to_its_amd64_manifest_for_schema2_clients(upstream):
    repo, tag = DOCKER_LIST
    assert upstream.manifest(repo, tag).headers["Content-Type"] == DOCKER_MANIFEST_LIST
    answer = upstream_answer(upstream, repo, tag, DOCKER_MANIFEST)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == DOCKER_MANIFEST
    assert answer.headers["Docker-Content-Digest"] == amd64_manifest(upstream, repo, tag)
    # An OCI index is not narrowed, and Docker types go to schema 1 for OCI-only clients.
    assert upstream_answer(upstream, *OCI_LIST, DOCKER_MANIFEST).status_code == 404
    assert upstream_answer(upstream, *SCHEMA2_IMAGE, OCI_MANIFEST).headers["Content-Type"] == (
        SCHEMA1
    )
    # By digest, it answers whatever the Accept.
    digest = upstream.digest_of(repo, tag)
    by_digest = upstream_answer(upstream, repo, digest, DOCKER_MANIFEST)
    assert by_digest.headers["Content-Type"] == DOCKER_MANIFEST_LIST


def test_a_schema2_client_and_a_normal_client_each_get_and_revalidate_their_own_answer(
    proxy, upstream, group
):
    repo, tag = DOCKER_LIST
    platform = amd64_manifest(upstream, repo, tag)
    listing = upstream.digest_of(repo, tag)

    narrow = proxy.get(group, repo, "manifests", tag, headers={"Accept": DOCKER_MANIFEST})
    assert narrow.status_code == 200, narrow.text
    assert narrow.headers["Content-Type"] == DOCKER_MANIFEST
    assert narrow.headers["Docker-Content-Digest"] == platform
    assert narrow.content == upstream.manifest(repo, platform).content
    assert narrow.headers["Vary"] == "Accept"
    full = proxy.get(group, repo, "manifests", tag)
    assert full.status_code == 200
    assert full.headers["Content-Type"] == DOCKER_MANIFEST_LIST
    assert full.headers["Docker-Content-Digest"] == listing
    assert full.content == upstream.manifest(repo, tag).content
    assert full.headers["Vary"] == "Accept"
    assert manifest_requests(upstream) == [
        ("GET", tag, DOCKER_MANIFEST),
        ("GET", tag, MANIFEST_ACCEPT),
    ]
    assert tag_rows(proxy, group, repo, tag) == {
        DOCKER_MANIFEST: platform,
        MANIFEST_ACCEPT: listing,
    }

    upstream.relay.reset_counts()
    for _ in range(2):
        again = proxy.get(group, repo, "manifests", tag, headers={"Accept": DOCKER_MANIFEST})
        assert (again.headers["Content-Type"], again.content) == (DOCKER_MANIFEST, narrow.content)
        again = proxy.get(group, repo, "manifests", tag)
        assert (again.headers["Content-Type"], again.content) == (
            DOCKER_MANIFEST_LIST,
            full.content,
        )
        head = proxy.get(
            group, repo, "manifests", tag, method="HEAD", headers={"Accept": DOCKER_MANIFEST}
        )
        assert head.headers["Docker-Content-Digest"] == platform
    # Each answer is revalidated with a HEAD asking what it was asked with; nothing is fetched.
    assert manifest_requests(upstream) == [
        ("HEAD", tag, DOCKER_MANIFEST),
        ("HEAD", tag, MANIFEST_ACCEPT),
        ("HEAD", tag, DOCKER_MANIFEST),
    ] * 2


def test_a_moved_tag_is_refetched_for_the_accept_whose_answer_changed(proxy, upstream, group):
    repo = f"moving/{group}"
    first = upstream.move_tag(repo, "stable", fmt="v2s2")
    for accept in (DOCKER_MANIFEST, MANIFEST_ACCEPT):
        answer = proxy.get(group, repo, "manifests", "stable", headers={"Accept": accept})
        assert answer.headers["Docker-Content-Digest"] == first.digest
    second = upstream.move_tag(repo, "stable", fmt="v2s2")
    upstream.relay.reset_counts()
    answer = proxy.get(group, repo, "manifests", "stable", headers={"Accept": DOCKER_MANIFEST})
    assert answer.headers["Docker-Content-Digest"] == second.digest
    assert manifest_requests(upstream) == [
        ("HEAD", "stable", DOCKER_MANIFEST),
        ("GET", "stable", DOCKER_MANIFEST),
    ]
    assert tag_rows(proxy, group, repo, "stable") == {
        DOCKER_MANIFEST: second.digest,
        MANIFEST_ACCEPT: first.digest,  # until a client accepting all four asks again
    }


@pytest.mark.parametrize(
    ("image", "accept", "answered"),
    [
        # distribution answers 404 for an OCI index the client does not take
        (OCI_LIST, DOCKER_MANIFEST, None),
        (OCI_LIST, f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}", None),
        # and schema 1, which we never serve, for Docker types an OCI-only client does not take
        (SCHEMA2_IMAGE, OCI_MANIFEST, SCHEMA1),
        (DOCKER_LIST, OCI_INDEX, SCHEMA1),
    ],
)
def test_a_client_accepting_only_what_upstream_does_not_have_gets_manifest_unknown(
    proxy, upstream, group, image, accept, answered
):
    repo, tag = image
    # A cached answer of another type is never served instead.
    assert proxy.get(group, repo, "manifests", tag).status_code == 200
    for method in ("GET", "HEAD"):
        answer = proxy.get(group, repo, "manifests", tag, method=method, headers={"Accept": accept})
        assert answer.status_code == 404
    answer = proxy.get(group, repo, "manifests", tag, headers={"Accept": accept})
    status, code, message = error_of(answer)
    assert (status, code) == (404, "MANIFEST_UNKNOWN")
    label = f"{repo}:{tag} (as {accepted_manifests(accept).header})"
    if answered is None:
        assert message.startswith(f"{label} was not found upstream")
    else:
        assert message == (
            f"{label} is not available upstream as a type the request's Accept header lists: "
            f"upstream answered with {answered}"
        )
        assert answer.headers["Vary"] == "Accept"
    assert tag_rows(proxy, group, repo, tag).keys() == {MANIFEST_ACCEPT}


def test_by_digest_a_manifest_is_served_only_to_a_client_accepting_its_type(
    proxy, upstream, group
):
    repo, tag = DOCKER_LIST
    listing = upstream.digest_of(repo, tag)
    platform = amd64_manifest(upstream, repo, tag)

    # Not cached yet: upstream answers the list whatever the Accept; it is kept, not served.
    for _ in range(2):
        answer = proxy.get(group, repo, "manifests", listing, headers={"Accept": DOCKER_MANIFEST})
        assert error_of(answer) == (
            404,
            "MANIFEST_UNKNOWN",
            f"{repo}@{listing} is a manifest of type {DOCKER_MANIFEST_LIST}, which the request's "
            "Accept header does not list",
        )
        assert answer.json()["errors"][0]["detail"] == {"media_type": DOCKER_MANIFEST_LIST}
        assert answer.headers["Vary"] == "Accept"
    assert [r[0] for r in manifest_requests(upstream)] == ["GET"]
    served = proxy.get(group, repo, "manifests", listing)
    assert served.status_code == 200
    assert served.headers["Content-Type"] == DOCKER_MANIFEST_LIST
    assert served.content == upstream.manifest(repo, listing).content
    accepting = proxy.get(
        group, repo, "manifests", listing, headers={"Accept": f"{DOCKER_MANIFEST_LIST};q=0.5"}
    )
    assert accepting.status_code == 200
    platform_answer = proxy.get(
        group, repo, "manifests", platform, headers={"Accept": DOCKER_MANIFEST}
    )
    assert platform_answer.status_code == 200
    assert platform_answer.headers["Content-Type"] == DOCKER_MANIFEST
    refused = proxy.get(group, repo, "manifests", platform, headers={"Accept": OCI_MANIFEST})
    assert error_of(refused)[:2] == (404, "MANIFEST_UNKNOWN")
    # Each digest was fetched once, with all four types; by digest nothing is revalidated.
    assert manifest_requests(upstream) == [
        ("GET", listing, MANIFEST_ACCEPT),
        ("GET", platform, MANIFEST_ACCEPT),
    ]


@pytest.mark.parametrize(
    "accept", [SCHEMA1, f"{SCHEMA1}, application/vnd.docker.distribution.manifest.v1+json"]
)
def test_an_accept_listing_only_unsupported_types_is_told_what_we_serve(
    proxy, upstream, group, accept
):
    repo, tag = OCI_LIST
    answer = proxy.get(group, repo, "manifests", tag, headers={"Accept": accept})
    assert error_of(answer) == (
        404,
        "MANIFEST_UNKNOWN",
        "the request's Accept header lists none of the manifest types the dependency proxy "
        f"serves: {OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_MANIFEST_LIST}, {DOCKER_MANIFEST}",
    )
    assert answer.headers["Vary"] == "Accept"
    assert upstream.relay.count(kind="manifest") == 0


@pytest.mark.parametrize("accept", [None, "*/*", "application/*", f"{SCHEMA1}, */*"])
def test_no_accept_or_a_wildcard_accepts_all_four_and_shares_their_answer(
    proxy, upstream, group, accept
):
    repo, tag = OCI_LIST
    first = proxy.get(group, repo, "manifests", tag)
    assert first.headers["Content-Type"] == OCI_INDEX
    upstream.relay.reset_counts()
    # requests leaves out a header whose value is None.
    answer = proxy.get(group, repo, "manifests", tag, headers={"Accept": accept})
    assert answer.status_code == 200
    assert answer.content == first.content
    assert manifest_requests(upstream) == [("HEAD", tag, MANIFEST_ACCEPT)]
    assert tag_rows(proxy, group, repo, tag).keys() == {MANIFEST_ACCEPT}


def test_a_normal_pull_of_a_cached_tag_asks_upstream_one_head(proxy, upstream, group):
    repo, tag = DOCKER_LIST
    manifest = proxy.get(group, repo, "manifests", tag)
    for entry in json.loads(manifest.content)["manifests"]:
        assert proxy.get(group, repo, "manifests", entry["digest"]).status_code == 200
    upstream.relay.reset_counts()
    proxy.get(group, repo, "manifests", tag)
    for entry in json.loads(manifest.content)["manifests"]:
        proxy.get(group, repo, "manifests", entry["digest"])
    assert manifest_requests(upstream) == [("HEAD", tag, MANIFEST_ACCEPT)]


@pytest.fixture
def service(upstream, tmp_path):
    """The proxy service of an app in this process, whose tags stay fresh for an hour: a
    cached tag is then answered from the database alone."""
    url = f"sqlite:///{tmp_path / 'depproxy.sqlite'}"
    migrate(url)
    app = main(
        {},
        **app_settings(
            url,
            tmp_path / "storage",
            **{
                "depproxy.upstream.url": upstream.url,
                "depproxy.manifest.freshness_seconds": "3600",
            },
        ),
    )
    service = app.registry["depproxy.proxy"]
    yield service
    service.read_times.flush()


def test_a_narrowed_accept_costs_a_cached_pull_no_more_sql_than_all_four(service, tmp_path):
    db = Database(service.settings.sqlalchemy_url)
    manager, session = db.session()
    with manager:
        group = Group(path="sql", name="sql")
        session.add(group)
        session.flush()
        upstream_group = GroupUpstream(group.id)
    repo, tag = DOCKER_LIST
    statements: list[str] = []
    engine = service.session_factory.kw["bind"]
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    for accept in (ALL_MANIFESTS, ManifestAccept.of([DOCKER_MANIFEST])):
        served = service.manifest(upstream_group, repo, tag, accept)
        assert served.media_type in accept.media_types
        # The first hit reads the manifest from storage, and keeps it in memory.
        service.manifest(upstream_group, repo, tag, accept)
        statements.clear()
        cached = service.manifest(upstream_group, repo, tag, accept)
        assert (cached.digest, cached.result) == (served.digest, Result.HIT)
        # Then only the tag's row is looked up, by its accept too, in the one query it took
        # before tags were keyed by it.
        [select_tag] = statements
        assert select_tag.startswith("SELECT") and "depproxy_tags.accept = ?" in select_tag
        statements.clear()
        assert service.manifest(upstream_group, repo, served.digest, accept).result == Result.HIT
        assert statements == []


def test_docker_containerd_and_skopeo_accept_all_four_and_share_one_answer(
    proxy, upstream, group, docker, containerd, tmp_path
):
    image = "library/alpine:latest"
    reference = proxy.ref(group, image)
    login = docker(
        "login", "--username", PULLER[0], "--password", PULLER[1], proxy.host, config=tmp_path
    )
    assert "Login Succeeded" in login.stdout
    docker("pull", reference, config=tmp_path)
    containerd.pull(reference)
    skopeo_pull(reference, tmp_path / "skopeo", creds=PULLER)
    # One fetch and then revalidations, all asking with the four types: one cached answer.
    accepts = {accept for _, _, accept in manifest_requests(upstream)}
    assert accepts == {MANIFEST_ACCEPT}
    assert [method for method, _, _ in manifest_requests(upstream)].count("GET") == 1
    assert tag_rows(proxy, group, "library/alpine", "latest").keys() == {MANIFEST_ACCEPT}
