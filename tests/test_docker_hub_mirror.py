"""A Docker Hub mirror as the default upstream: one-segment names get `library/` only when the
upstream is marked as one (`depproxy.upstream.docker_hub_mirrors`).

The mirror is the test registry itself, which holds `library/alpine` as a mirror of Docker Hub
would; skopeo pulls through a real server process.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.proxy import PULLER, running_proxy
from tests.support.registry import skopeo_pull

IMAGE = "library/alpine"


@pytest.fixture
def mirror_proxy(upstream, tmp_path):
    host = urlsplit(upstream.url).netloc
    with running_proxy(
        tmp_path / "proxy",
        f"sqlite:///{tmp_path / 'proxy.sqlite'}",
        upstream.url,
        **{"depproxy.upstream.docker_hub_mirrors": host},
    ) as proxy:
        yield proxy


@pytest.fixture
def unmarked_proxy(upstream, tmp_path):
    with running_proxy(
        tmp_path / "proxy", f"sqlite:///{tmp_path / 'proxy.sqlite'}", upstream.url
    ) as proxy:
        yield proxy


def manifest_paths(upstream) -> set[str]:
    return {r.path for r in upstream.relay.requests if r.kind == "manifest"}


@pytest.mark.parametrize("name", ["alpine:latest", "docker.io/library/alpine:latest"])
def test_a_marked_mirror_gets_library_for_one_segment_names(mirror_proxy, upstream, tmp_path, name):
    group = mirror_proxy.new_group("mirrored")
    pulled = skopeo_pull(mirror_proxy.ref(group, name), tmp_path / "pulled", creds=PULLER)
    assert pulled.returncode == 0
    assert manifest_paths(upstream) == {f"/v2/{IMAGE}/manifests/latest"}
    digest = upstream.digest_of(IMAGE, "latest")
    image = name.rpartition(":")[0]
    answer = mirror_proxy.get(group, image, "manifests", "latest")
    assert answer.headers["Docker-Content-Digest"] == digest


def test_without_the_mark_a_one_segment_name_goes_unchanged(unmarked_proxy, upstream, tmp_path):
    group = unmarked_proxy.new_group("unmarked")
    pulled = skopeo_pull(
        unmarked_proxy.ref(group, "alpine:latest"), tmp_path / "pulled", creds=PULLER, check=False
    )
    assert pulled.returncode != 0
    assert manifest_paths(upstream) == {"/v2/alpine/manifests/latest"}
    answer = unmarked_proxy.get(group, "alpine", "manifests", "latest")
    assert (answer.status_code, answer.json()["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN")
    # Docker Hub's names mean nothing to an upstream that is not Docker Hub or its mirror.
    answer = unmarked_proxy.get(group, "docker.io/library/alpine", "manifests", "latest")
    assert (answer.status_code, answer.json()["errors"][0]["code"]) == (400, "NAME_INVALID")
