"""Pulling through the proxy with the Docker engine and containerd, as most users do.

The engines are Debian's, started by the session (tests/support/engines.py); the proxy is a real
server process in front of the real registry with token auth (the `proxy` and `upstream`
fixtures). Only pulling is exercised: no container runs.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.proxy import PULLER, Proxy, running_proxy
from tests.support.engines import DockerEngine, running_dockerd
from tests.support.relay import Fault

IMAGE = "library/alpine:latest"
MULTI_ARCH = "multiarch/app:1.0"
CREDENTIALS = ("password", "personal access token", "deploy token")


def docker_login(docker, proxy, config: Path, credentials: tuple[str, str] = PULLER) -> None:
    result = docker(
        "login", "--username", credentials[0], "--password-stdin", proxy.host,
        config=config, input=credentials[1],
    )  # fmt: skip
    assert "Login Succeeded" in result.stdout


def credentials_of(kind: str, proxy, group: str) -> tuple[str, str]:
    if kind == "personal access token":
        return proxy.personal_access_token()
    if kind == "deploy token":
        return proxy.deploy_token(group)
    return PULLER


def platform_digest(upstream, image: str, architecture: str) -> str:
    repo, _, tag = image.partition(":")
    (digest,) = [
        entry["digest"]
        for entry in upstream.manifest(repo, tag).json()["manifests"]
        if entry["platform"] == {"os": "linux", "architecture": architecture}
    ]
    return digest


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


@pytest.mark.parametrize("kind", CREDENTIALS)
def test_docker_login_and_pull_with_each_kind_of_credential(
    proxy, upstream, group, docker, tmp_path, kind
):
    docker_login(docker, proxy, tmp_path, credentials_of(kind, proxy, group))
    reference = proxy.ref(group, IMAGE)
    docker("pull", reference, config=tmp_path)
    assert docker.image(reference, tmp_path)["Id"] == config_digest(upstream, IMAGE)


def test_the_docker_engine_pulls_by_digest(proxy, upstream, group, docker, tmp_path):
    repo, _, tag = IMAGE.partition(":")
    digest = upstream.digest_of(repo, tag)
    reference = f"{proxy.ref(group, repo)}@{digest}"
    docker_login(docker, proxy, tmp_path)
    docker("pull", reference, config=tmp_path)
    image = docker.image(reference, tmp_path)
    assert image["Id"] == config_digest(upstream, IMAGE)
    assert image["RepoDigests"] == [reference]


def test_the_docker_engine_builds_from_an_image_pulled_through_the_proxy(
    proxy, upstream, group, docker, tmp_path
):
    """`docker build` with the classic builder (Debian's docker.io has no buildx), which pulls
    the FROM image with the client's logins; no RUN, so no network and no container."""
    base = proxy.ref(group, IMAGE)
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {base}\nLABEL built.through=depproxy\n")
    docker_login(docker, proxy, tmp_path)
    docker("build", "--tag", "built:1", str(context), config=tmp_path, env={"DOCKER_BUILDKIT": "0"})
    built = docker.image("built:1", tmp_path)
    pulled = docker.image(base, tmp_path)
    assert built["Config"]["Labels"] == {
        **pulled["Config"]["Labels"],
        "built.through": "depproxy",
    }
    assert built["RootFS"]["Layers"] == pulled["RootFS"]["Layers"]
    assert pulled["Id"] == config_digest(upstream, IMAGE)


def test_the_docker_engine_picks_its_platform_from_a_multi_arch_index(
    proxy, upstream, group, docker, tmp_path
):
    image = MULTI_ARCH
    repo, _, tag = image.partition(":")
    amd64 = platform_digest(upstream, image, "amd64")
    reference = proxy.ref(group, image)
    docker_login(docker, proxy, tmp_path)
    docker("pull", "--platform", "linux/amd64", reference, config=tmp_path)
    pulled = docker.image(reference, tmp_path)
    assert pulled["Id"] == upstream.manifest(repo, amd64).json()["config"]["digest"]
    assert pulled["Architecture"] == "amd64"


@pytest.mark.parametrize("which", ["private", "missing"])
def test_the_docker_engine_without_login_is_told_it_may_need_docker_login(
    proxy, group, docker, tmp_path, which
):
    """Docker Hub's anonymous flow: an anonymous token, then `insufficient_scope`, which the
    engine explains; a group that does not exist reads the same."""
    reference = proxy.ref(group if which == "private" else "no-such-group", IMAGE)
    result = docker("pull", reference, config=tmp_path, check=False)
    assert result.returncode != 0
    name = reference.rpartition(":")[0]
    assert (
        f"pull access denied for {name}, repository does not exist or may require "
        "'docker login': denied: requested access to the resource is denied"
    ) in result.stderr
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


@pytest.mark.parametrize("kind", CREDENTIALS)
def test_containerd_pulls_with_each_kind_of_credential(proxy, upstream, group, containerd, kind):
    containerd.pull(proxy.ref(group, IMAGE), credentials=credentials_of(kind, proxy, group))
    repo, _, tag = IMAGE.partition(":")
    assert upstream.digest_of(repo, tag) in containerd.ctr("images", "list").stdout


def test_containerd_pulls_by_digest(proxy, upstream, group, containerd):
    repo, _, tag = IMAGE.partition(":")
    digest = upstream.digest_of(repo, tag)
    reference = f"{proxy.ref(group, repo)}@{digest}"
    containerd.pull(reference)
    assert containerd.ctr("images", "list", "--quiet").stdout.split() == [reference]


def test_containerd_pulls_one_platform_of_a_multi_arch_index(proxy, upstream, group, containerd):
    arm64 = platform_digest(upstream, MULTI_ARCH, "arm64")
    amd64 = platform_digest(upstream, MULTI_ARCH, "amd64")
    options = ("--plain-http", "--platform", "linux/arm64")
    containerd.pull(proxy.ref(group, MULTI_ARCH), options=options)
    held = containerd.ctr("content", "list", "--quiet").stdout.split()
    assert arm64 in held
    assert amd64 not in held


def test_containerd_without_credentials_is_told_it_may_need_authorization(
    proxy, group, containerd
):
    result = containerd.pull(proxy.ref(group, IMAGE), credentials=None, check=False)
    assert result.returncode != 0
    assert (
        "pull access denied, repository does not exist or may require authorization: "
        "server message: insufficient_scope: authorization failed"
    ) in result.stderr
    assert containerd.ctr("images", "list", "--quiet").stdout.split() == []


def test_containerd_is_refused_a_private_group_with_wrong_credentials(proxy, group, containerd):
    result = containerd.pull(
        proxy.ref(group, IMAGE), credentials=(PULLER[0], "not-the-password"), check=False
    )
    assert result.returncode != 0
    assert "401" in result.stderr or "unauthorized" in result.stderr.lower()
    assert containerd.ctr("images", "list", "--quiet").stdout.split() == []


# The mirror group, as Docker's `registry-mirrors` and containerd's `hosts.toml` use it.

MIRROR = "mirror"


@contextmanager
def mirror_proxy(tmp_path: Path, upstream, *, anonymous: bool) -> Iterator[Proxy]:
    with running_proxy(
        tmp_path / "proxy",
        f"sqlite:///{tmp_path / 'proxy.sqlite'}",
        upstream.url,
        **{"depproxy.mirror.group": MIRROR, "depproxy.mirror.anonymous": str(anonymous).lower()},
    ) as proxy:
        proxy.new_group(MIRROR)
        yield proxy


@contextmanager
def mirrored_docker(containerd, proxy: Proxy) -> Iterator[DockerEngine]:
    with running_dockerd(containerd, "--registry-mirror", proxy.url) as engine:
        yield engine


def docker_hub_login(config: Path, credentials: tuple[str, str]) -> None:
    """What the engine sends its mirrors: the client's docker.io login. `docker login` would
    check it with Docker Hub itself, so it is written as that command writes it."""
    auth = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    config.mkdir(parents=True, exist_ok=True)
    (config / "config.json").write_text(
        json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}})
    )


def assert_the_mirror_served(proxy: Proxy, upstream, image: str) -> None:
    repo, _, tag = image.partition(":")
    served = f"group={MIRROR} image={repo} kind=manifests reference={tag}"
    proxy.server.wait_for_log(served)
    lines = proxy.server.log_path.read_text().splitlines()
    assert any(served in line and " status=200 " in line for line in lines)
    assert proxy.cached_manifests(MIRROR) >= 1
    assert upstream.relay.count(method="GET", kind="manifest") >= 1


def test_docker_registry_mirrors_pull_anonymously_through_an_open_mirror_group(
    containerd_daemon, upstream, tmp_path
):
    with (
        mirror_proxy(tmp_path, upstream, anonymous=True) as proxy,
        mirrored_docker(containerd_daemon, proxy) as docker,
    ):
        config = tmp_path / "client"
        # The engine's docker.io name; the proxy gets `library/alpine`, as from Docker Hub.
        docker("pull", "alpine:latest", config=config)
        assert docker.image("alpine:latest", config)["Id"] == config_digest(upstream, IMAGE)
        assert_the_mirror_served(proxy, upstream, IMAGE)


def test_docker_registry_mirrors_pull_a_closed_mirror_group_with_the_docker_io_login(
    containerd_daemon, upstream, tmp_path
):
    with (
        mirror_proxy(tmp_path, upstream, anonymous=False) as proxy,
        mirrored_docker(containerd_daemon, proxy) as docker,
    ):
        deploy = proxy.deploy_token(MIRROR)
        anonymous = tmp_path / "anonymous"
        refused = docker("pull", "alpine:latest", config=anonymous, check=False)
        # The mirror refused, and the engine fell back to Docker Hub, which it cannot reach.
        assert refused.returncode != 0
        assert proxy.cached_manifests(MIRROR) == 0

        config = tmp_path / "client"
        docker_hub_login(config, deploy)
        docker("pull", "alpine:latest", config=config)
        assert docker.image("alpine:latest", config)["Id"] == config_digest(upstream, IMAGE)
        assert_the_mirror_served(proxy, upstream, IMAGE)


def write_hosts_toml(directory: Path, proxy: Proxy, registry: str = "docker.io") -> Path:
    """containerd's mirror configuration for `registry`, as README shows it."""
    (directory / registry).mkdir(parents=True)
    (directory / registry / "hosts.toml").write_text(
        f"""[host."{proxy.url}"]
  capabilities = ["pull", "resolve"]
"""
    )
    return directory


@pytest.mark.parametrize("anonymous", [True, False])
def test_containerd_hosts_toml_mirrors_docker_io_through_the_mirror_group(
    containerd, upstream, tmp_path, anonymous
):
    with mirror_proxy(tmp_path, upstream, anonymous=anonymous) as proxy:
        hosts = write_hosts_toml(tmp_path / "certs.d", proxy)
        reference = f"docker.io/{IMAGE}"
        # The puller is a member of the mirror group (`new_group` makes it one).
        credentials = None if anonymous else PULLER
        containerd.pull(reference, credentials=credentials, options=("--hosts-dir", str(hosts)))
        repo, _, tag = IMAGE.partition(":")
        assert upstream.digest_of(repo, tag) in containerd.ctr("images", "list").stdout
        assert_the_mirror_served(proxy, upstream, IMAGE)


def test_containerd_hosts_toml_for_a_registry_the_proxy_does_not_mirror_gets_404(
    containerd, upstream, tmp_path
):
    """containerd names the registry it mirrors in `?ns=`: one that is not configured here is
    refused without any upstream request."""
    with mirror_proxy(tmp_path, upstream, anonymous=True) as proxy:
        hosts = write_hosts_toml(tmp_path / "certs.d", proxy, registry="quay.io")
        upstream.relay.reset_counts()
        result = containerd.pull(
            f"quay.io/{IMAGE}", credentials=None, check=False, options=("--hosts-dir", str(hosts))
        )
        assert result.returncode != 0
        refused = "method=HEAD path=/v2/library/alpine/manifests/latest status=404"
        proxy.server.wait_for_log(refused)
        assert upstream.relay.requests == []
        assert proxy.cached_manifests(MIRROR) == 0
