"""Pulling through the proxy with the Docker engine and containerd, as most users do.

The engines are Debian's, started by the session (tests/support/engines.py); the proxy is a real
server process in front of the real registry with token auth (the `proxy` and `upstream`
fixtures). Only pulling is exercised: no container runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.proxy import PULLER
from tests.support.relay import Fault

IMAGE = "library/alpine:latest"


def docker_login(docker, proxy, config: Path) -> None:
    result = docker(
        "login", "--username", PULLER[0], "--password", PULLER[1], proxy.host,
        config=config,
    )  # fmt: skip
    assert "Login Succeeded" in result.stdout


def config_digest(upstream, image: str) -> str:
    repo, _, tag = image.partition(":")
    return upstream.manifest(repo, tag).json()["config"]["digest"]


def test_the_docker_engine_pulls_cold_then_warm(proxy, upstream, group, docker, tmp_path):
    reference = proxy.ref(group, IMAGE)
    docker_login(docker, proxy, tmp_path)
    docker("pull", reference, config=tmp_path)
    image = docker.image(reference, tmp_path)
    assert image["Id"] == config_digest(upstream, IMAGE)
    repo, _, tag = IMAGE.partition(":")
    assert image["RepoDigests"] == [
        f"{reference.rpartition(':')[0]}@{upstream.digest_of(repo, tag)}"
    ]

    docker("rmi", reference, config=tmp_path)
    upstream.relay.reset_counts()
    docker("pull", reference, config=tmp_path)
    assert docker.image(reference, tmp_path)["Id"] == image["Id"]
    assert upstream.relay.count(method="GET", kind="blob") == 0
    assert upstream.relay.count(method="GET", kind="manifest") == 0


def test_the_docker_engine_picks_its_platform_from_a_multi_arch_index(
    proxy, upstream, group, docker, tmp_path
):
    image = "multiarch/app:1.0"
    repo, _, tag = image.partition(":")
    index = upstream.manifest(repo, tag).json()
    (amd64,) = [
        entry["digest"]
        for entry in index["manifests"]
        if entry["platform"] == {"os": "linux", "architecture": "amd64"}
    ]
    reference = proxy.ref(group, image)
    docker_login(docker, proxy, tmp_path)
    docker("pull", "--platform", "linux/amd64", reference, config=tmp_path)
    pulled = docker.image(reference, tmp_path)
    assert pulled["Id"] == upstream.manifest(repo, amd64).json()["config"]["digest"]
    assert pulled["Architecture"] == "amd64"


def test_the_docker_engine_without_login_is_refused_a_private_group(proxy, group, docker, tmp_path):
    result = docker("pull", proxy.ref(group, IMAGE), config=tmp_path, check=False)
    assert result.returncode != 0
    # The engine's own wording for the registry's 401 on a private repository.
    assert "unauthorized" in result.stderr or "pull access denied" in result.stderr
    assert docker("images", "--quiet", config=tmp_path).stdout.split() == []


def test_the_docker_engine_pulls_a_cached_image_while_upstream_hangs(
    proxy, upstream, group, docker, tmp_path
):
    """The tag's revalidation waits at most depproxy.upstream.revalidate_timeout (1 s) for a
    hung upstream, then the cached copy is served."""
    reference = proxy.ref(group, IMAGE)
    docker_login(docker, proxy, tmp_path)
    docker("pull", reference, config=tmp_path)
    expected = docker.image(reference, tmp_path)["Id"]
    docker("rmi", reference, config=tmp_path)

    upstream.relay.set_mode(Fault.HANG)
    try:
        started = time.monotonic()
        docker("pull", reference, config=tmp_path)
        elapsed = time.monotonic() - started
    finally:
        upstream.relay.release_stalled()
        upstream.relay.set_mode(Fault.NORMAL)
    assert docker.image(reference, tmp_path)["Id"] == expected
    # The engine asks for the tag twice (HEAD, then GET), the blobs once each.
    assert elapsed < 2 * 1 + 2
    proxy.server.wait_for_log("result=stale")


def test_containerd_pulls_cold_then_warm(proxy, upstream, group, containerd):
    reference = proxy.ref(group, IMAGE)
    containerd.pull(reference)
    listed = containerd.ctr("images", "list").stdout
    repo, _, tag = IMAGE.partition(":")
    assert upstream.digest_of(repo, tag) in listed

    containerd.remove_all()
    upstream.relay.reset_counts()
    containerd.pull(reference)
    assert upstream.relay.count(method="GET", kind="blob") == 0
    assert upstream.relay.count(method="GET", kind="manifest") == 0


def test_containerd_is_refused_a_private_group_with_wrong_credentials(proxy, group, containerd):
    result = containerd.pull(
        proxy.ref(group, IMAGE), credentials=(PULLER[0], "not-the-password"), check=False
    )
    assert result.returncode != 0
    assert "401" in result.stderr or "unauthorized" in result.stderr.lower()
    assert containerd.ctr("images", "list", "--quiet").stdout.split() == []
