"""Which manifest types a client's Accept header accepts."""

import pytest

from depproxy_pyramid.errors import RegistryError
from depproxy_pyramid.negotiation import accepted_manifests
from depproxy_pyramid.upstream import (
    ALL_MANIFESTS,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    ManifestAccept,
)

SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
# What the clients send (Docker's several Accept lines arrive joined with ", ").
DOCKER = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, SCHEMA1])
CONTAINERD = ", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"])


@pytest.mark.parametrize("header", [None, "", "  ", DOCKER, CONTAINERD, MANIFEST_ACCEPT])
def test_clients_that_take_everything_accept_all_four(header):
    assert accepted_manifests(header) == ALL_MANIFESTS


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        (DOCKER_MANIFEST, {DOCKER_MANIFEST}),
        (f"{DOCKER_MANIFEST}, {SCHEMA1}", {DOCKER_MANIFEST}),
        (DOCKER_MANIFEST.upper(), {DOCKER_MANIFEST}),
        (f"  {OCI_INDEX} ;q=0.5 ,{OCI_MANIFEST};Q=1", {OCI_INDEX, OCI_MANIFEST}),
        # Wildcards, with or without anything else.
        ("*/*", set(ALL_MANIFESTS.media_types)),
        ("application/*", set(ALL_MANIFESTS.media_types)),
        ("application/json, */*;q=0.1", set(ALL_MANIFESTS.media_types)),
        (f"{SCHEMA1}, */*", set(ALL_MANIFESTS.media_types)),
        # q=0 refuses, and the most specific range decides.
        (f"*/*, {OCI_INDEX};q=0", {OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST}),
        (f"application/*;q=0, {DOCKER_MANIFEST}", {DOCKER_MANIFEST}),
        (f"{DOCKER_MANIFEST}, */*;q=0", {DOCKER_MANIFEST}),
        (
            f"{DOCKER_MANIFEST};q=0.000, application/*",
            {OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST},
        ),
        (f"{DOCKER_MANIFEST};q=0, {DOCKER_MANIFEST};q=0.3", {DOCKER_MANIFEST}),
        # Parameters other than q are ignored, as registries ignore them.
        (f"{DOCKER_MANIFEST}; charset=utf-8", {DOCKER_MANIFEST}),
        (f"{DOCKER_MANIFEST}; q=1; ext=1", {DOCKER_MANIFEST}),
        # A malformed element is skipped on its own, never widening what is accepted.
        (f"garbage;;, {DOCKER_MANIFEST}", {DOCKER_MANIFEST}),
        (f"{OCI_INDEX};q=2, {DOCKER_MANIFEST}", {DOCKER_MANIFEST}),
        (f"{OCI_INDEX};q=high, {DOCKER_MANIFEST}", {DOCKER_MANIFEST}),
        (f"*/vnd.oci.image.index.v1+json, {DOCKER_MANIFEST}", {DOCKER_MANIFEST}),
        (f"{OCI_INDEX}/x, {DOCKER_MANIFEST}", {DOCKER_MANIFEST}),
        (f"application/, {DOCKER_MANIFEST}", {DOCKER_MANIFEST}),
    ],
)
def test_accepted_types(header, accepted):
    assert accepted_manifests(header).media_types == accepted


def test_the_accept_asked_upstream_lists_the_types_in_one_order():
    accept = accepted_manifests(f"{DOCKER_MANIFEST}, {OCI_INDEX}")
    assert accept == ManifestAccept.of([OCI_INDEX, DOCKER_MANIFEST])
    assert accept.header == f"{OCI_INDEX}, {DOCKER_MANIFEST}"
    assert ALL_MANIFESTS.header == MANIFEST_ACCEPT == (
        f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_MANIFEST_LIST}, {DOCKER_MANIFEST}"
    )


@pytest.mark.parametrize(
    "header",
    [
        SCHEMA1,
        "application/vnd.docker.distribution.manifest.v1+json, application/json",
        "text/*",
        f"{DOCKER_MANIFEST};q=0",
        f"*/*;q=0, {SCHEMA1}",
        "garbage",
    ],
)
def test_a_header_accepting_none_of_the_four_is_manifest_unknown(header):
    with pytest.raises(RegistryError) as refused:
        accepted_manifests(header)
    assert refused.value.status == 404
    assert refused.value.code == "MANIFEST_UNKNOWN"
    assert refused.value.message == (
        "the request's Accept header lists none of the manifest types the dependency proxy "
        f"serves: {OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_MANIFEST_LIST}, {DOCKER_MANIFEST}"
    )
    assert refused.value.detail == {"accept": header}
    assert refused.value.headers == {"Vary": "Accept"}


@pytest.mark.parametrize("media_types", [[], [SCHEMA1], [DOCKER_MANIFEST, "text/html"]])
def test_a_manifest_accept_holds_only_manifest_types(media_types):
    with pytest.raises(ValueError):
        ManifestAccept.of(media_types)
