"""The upstream client's tag list and referrers calls, against `responses`, and the paging the
proxy puts on top of upstream's answer."""

from __future__ import annotations

import json

import pytest
import responses
from responses import matchers
from webob.multidict import MultiDict

from depproxy_pyramid.errors import RegistryError
from depproxy_pyramid.services.listing import (
    MAX_PAGE_SIZE,
    TagQuery,
    artifact_type_of,
    client_page,
    referrers_tag,
)
from depproxy_pyramid.upstream import (
    UpstreamClient,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamUnavailable,
)
from depproxy_pyramid.upstream import client as client_module
from depproxy_pyramid.upstream.listing import TagPage

REG = "https://registry.example"
TAGS = f"{REG}/v2/library/alpine/tags/list"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SUBJECT = "sha256:" + "a" * 64
REFERRERS = f"{REG}/v2/library/alpine/referrers/{SUBJECT}"
SBOM = {
    "mediaType": OCI_MANIFEST,
    "digest": "sha256:" + "b" * 64,
    "size": 512,
    "artifactType": "application/vnd.example.sbom.v1+json",
    "annotations": {"org.opencontainers.image.created": "2026-11-30T00:00:00Z"},
}


@pytest.fixture
def rsps():
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def client():
    c = UpstreamClient(REG)
    yield c
    c.close()


def tag_list(tags, **headers) -> dict:
    return {"body": json.dumps({"name": "library/alpine", "tags": tags}), "headers": headers}


# Tag lists


def test_n_and_last_go_upstream_and_the_next_link_is_read(rsps, client):
    rsps.get(
        TAGS,
        match=[matchers.query_param_matcher({"n": "2", "last": "3.19"})],
        **tag_list(
            ["3.20", "3.21"],
            Link='</v2/library/alpine/tags/list?last=3.21&n=2>; rel="next"',
        ),
    )
    assert client.list_tags("library/alpine", 2, "3.19") == TagPage(("3.20", "3.21"), "3.21")


def test_an_absolute_next_link_and_one_without_n_are_read(rsps, client):
    rsps.get(
        TAGS,
        **tag_list(["a"], Link='<https://cdn.example/v2/x/tags/list?last=a>; rel="next"'),
    )
    assert client.list_tags("library/alpine") == TagPage(("a",), "a")


def test_no_next_link_is_the_last_page(rsps, client):
    rsps.get(TAGS, **tag_list(["latest"], Link='</v2/other>; rel="prev"'))
    assert client.list_tags("library/alpine") == TagPage(("latest",))


def test_null_tags_are_none(rsps, client):
    rsps.get(TAGS, **tag_list(None))
    assert client.list_tags("library/alpine") == TagPage(())


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'["latest"]',
        b'{"tags": "latest"}',
        b'{"tags": [1]}',
        b'{"tags": ["-bad"]}',
        b'{"tags": ["v1\\n"]}',
        b'{"tags": ["' + b"x" * 129 + b'"]}',
    ],
)
def test_a_body_that_is_no_tag_list_is_refused(rsps, client, body):
    rsps.get(TAGS, body=body)
    with pytest.raises(UpstreamInvalid) as raised:
        client.list_tags("library/alpine")
    assert raised.value.message == "upstream sent something that is not a tag list"


@pytest.mark.parametrize(
    "link",
    ['</v2/x/tags/list?n=2>; rel="next"', '</v2/x/tags/list?n=2&last=.x>; rel="next"'],
)
def test_a_next_link_without_a_usable_last_is_refused(rsps, client, link):
    rsps.get(TAGS, **tag_list(["a"], Link=link))
    with pytest.raises(UpstreamInvalid):
        client.list_tags("library/alpine")


def test_a_list_declared_over_the_cap_is_refused_unread(rsps, client, monkeypatch):
    monkeypatch.setattr(client_module, "MAX_TAG_LIST_SIZE", 64)
    listed = tag_list([f"tag-{i}" for i in range(20)])
    rsps.get(TAGS, body=listed["body"], headers={"Content-Length": str(len(listed["body"]))})
    with pytest.raises(UpstreamUnavailable, match="over the 64 limit"):
        client.list_tags("library/alpine")


def test_a_list_of_no_declared_length_is_cut_at_the_cap(rsps, client, monkeypatch):
    monkeypatch.setattr(client_module, "MAX_TAG_LIST_SIZE", 64)
    rsps.get(TAGS, **tag_list([f"tag-{i}" for i in range(20)]))
    with pytest.raises(UpstreamUnavailable, match="exceeds the 64 byte limit"):
        client.list_tags("library/alpine")


def test_an_unknown_repository_is_not_found_and_a_rate_limit_says_so(rsps, client):
    rsps.get(TAGS, status=404, json={"errors": [{"code": "NAME_UNKNOWN"}]})
    with pytest.raises(UpstreamNotFound):
        client.list_tags("library/alpine")
    rsps.replace(responses.GET, TAGS, status=429, headers={"Retry-After": "9"})
    with pytest.raises(UpstreamRateLimited) as raised:
        client.list_tags("library/alpine")
    assert raised.value.retry_after == 9


def test_a_malformed_last_is_never_sent(rsps, client):
    with pytest.raises(UpstreamRefused):
        client.list_tags("library/alpine", last="../x")


# Referrers


def referrers_index(*descriptors, **extra) -> dict:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(descriptors), **extra}


def test_referrers_keep_only_the_descriptor_fields_the_spec_names(rsps, client):
    rsps.get(
        REFERRERS,
        json=referrers_index({**SBOM, "urls": ["https://elsewhere"], "x": 1}, unknown=True),
        content_type=OCI_INDEX,
    )
    assert client.get_referrers("library/alpine", SUBJECT) == (SBOM,)


def test_every_page_of_referrers_is_read_from_the_same_upstream_path(rsps, client):
    signature = {**SBOM, "digest": "sha256:" + "c" * 64, "artifactType": "application/x-sig"}
    rsps.get(
        REFERRERS,
        match=[matchers.query_param_matcher({})],
        json=referrers_index(SBOM),
        content_type=OCI_INDEX,
        # Wherever the link points, the next page is asked of this upstream.
        headers={
            "Link": f'<https://elsewhere.example/v2/x/referrers/{SUBJECT}?page=2>; rel="next"'
        },
    )
    rsps.get(
        REFERRERS,
        match=[matchers.query_param_matcher({"page": "2"})],
        json=referrers_index(signature),
        content_type=OCI_INDEX,
    )
    assert client.get_referrers("library/alpine", SUBJECT) == (SBOM, signature)


def test_referrers_paging_without_end_is_refused(rsps, client):
    rsps.get(
        REFERRERS,
        json=referrers_index(SBOM),
        content_type=OCI_INDEX,
        headers={"Link": f'</v2/library/alpine/referrers/{SUBJECT}>; rel="next"'},
    )
    with pytest.raises(UpstreamInvalid) as raised:
        client.get_referrers("library/alpine", SUBJECT)
    assert "more than 20 pages" in raised.value.detail


def test_referrers_without_an_api_are_not_found(rsps, client):
    # distribution 2.8's answer to a path it has no route for.
    rsps.get(REFERRERS, status=404, body="404 page not found", content_type="text/plain")
    with pytest.raises(UpstreamNotFound):
        client.get_referrers("library/alpine", SUBJECT)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (referrers_index(SBOM), "text/html"),
        (referrers_index(SBOM, mediaType=OCI_MANIFEST), OCI_INDEX),
        ({"schemaVersion": 2}, OCI_INDEX),
        (referrers_index("sha256:x"), OCI_INDEX),
        (referrers_index({**SBOM, "digest": "sha256:short"}), OCI_INDEX),
        (referrers_index({**SBOM, "digest": SUBJECT + "\n"}), OCI_INDEX),
        (referrers_index({**SBOM, "size": -1}), OCI_INDEX),
        (referrers_index({**SBOM, "size": "512"}), OCI_INDEX),
        (referrers_index({**SBOM, "artifactType": 7}), OCI_INDEX),
        (referrers_index({**SBOM, "annotations": {"a": 1}}), OCI_INDEX),
        ([SBOM], OCI_INDEX),
    ],
)
def test_referrers_that_are_no_index_of_descriptors_are_refused(rsps, client, body, content_type):
    rsps.get(REFERRERS, json=body, content_type=content_type)
    with pytest.raises(UpstreamInvalid) as raised:
        client.get_referrers("library/alpine", SUBJECT)
    assert raised.value.message == "upstream sent something that is not a referrers index"


def test_referrers_over_the_cap_are_refused(rsps, client, monkeypatch):
    monkeypatch.setattr(client_module, "MAX_REFERRERS_SIZE", 100)
    rsps.get(REFERRERS, json=referrers_index(SBOM, SBOM), content_type=OCI_INDEX)
    with pytest.raises(UpstreamUnavailable, match="exceeds the 100 byte limit"):
        client.get_referrers("library/alpine", SUBJECT)


def test_the_referrers_tag_is_the_digest_with_a_dash_cut_to_64():
    assert referrers_tag(SUBJECT) == "sha256-" + "a" * 64
    assert referrers_tag("sha512:" + "c" * 128) == "sha512-" + "c" * 64


# The page the client gets


def test_an_upstream_that_ignores_paging_is_paged_by_the_proxy():
    everything = TagPage(("d", "b", "a", "c", "e"))
    assert client_page(everything, TagQuery(2)) == (["a", "b"], TagQuery(2, "b"))
    assert client_page(everything, TagQuery(2, "b")) == (["c", "d"], TagQuery(2, "d"))
    assert client_page(everything, TagQuery(2, "d")) == (["e"], None)
    assert client_page(everything, TagQuery()) == (["a", "b", "c", "d", "e"], None)
    assert client_page(everything, TagQuery(0)) == ([], None)


def test_an_upstream_that_pages_keeps_its_next_page():
    page = TagPage(("a", "b"), next_last="b")
    assert client_page(page, TagQuery(2)) == (["a", "b"], TagQuery(2, "b"))
    # An upstream that pages unasked: the next request asks it with the client's n again.
    assert client_page(TagPage(("a",), "a"), TagQuery()) == (["a"], TagQuery(None, "a"))


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ([("n", "-1")], "n"),
        ([("n", "1.5")], "n"),
        ([("n", str(MAX_PAGE_SIZE + 1))], "n"),
        ([("n", "1"), ("n", "2")], "n"),
        ([("last", "")], "last"),
        ([("last", "a/b")], "last"),
        ([("last", "v1\n")], "last"),
    ],
)
def test_a_bad_tag_query_is_400_unsupported(params, parameter):
    with pytest.raises(RegistryError) as raised:
        TagQuery.of(MultiDict(params))
    assert (raised.value.status, raised.value.code) == (400, "UNSUPPORTED")
    assert raised.value.message.startswith(parameter)


def test_a_good_tag_query_and_its_encoding():
    query = TagQuery.of(MultiDict([("n", "50"), ("last", "v1.2")]))
    assert query == TagQuery(50, "v1.2")
    assert query.encoded == "n=50&last=v1.2"
    assert TagQuery.of(MultiDict()).encoded == ""


def test_artifact_type_must_be_a_media_type():
    assert artifact_type_of(MultiDict(artifactType="application/vnd.x+json")) == (
        "application/vnd.x+json"
    )
    assert artifact_type_of(MultiDict()) is None
    with pytest.raises(RegistryError) as raised:
        artifact_type_of(MultiDict(artifactType="application/vnd.x\n"))
    assert (raised.value.status, raised.value.code) == (400, "UNSUPPORTED")
