"""Pulling through the proxy with podman, the client people actually run against it.

podman runs as root with the ``vfs`` storage driver (no overlay mounts, no fuse), the
``cgroupfs`` cgroup manager and file events (no systemd), and with every config, state and
storage path inside the test's own directory, so the host's containers config, auth file and
image store neither leak in nor get touched. Only pulling is exercised: no container runs.
"""

from __future__ import annotations

import pytest


def platform_manifest(upstream, repo: str, tag: str, platform: str | None) -> tuple[str, dict]:
    """Digest and body of the image manifest a client on ``platform`` ends up with."""
    manifest = upstream.manifest(repo, tag).json()
    if "manifests" not in manifest:
        return upstream.digest_of(repo, tag), manifest
    os_name, arch = platform.split("/")
    (digest,) = [
        entry["digest"]
        for entry in manifest["manifests"]
        if entry["platform"] == {"os": os_name, "architecture": arch}
    ]
    return digest, upstream.manifest(repo, digest).json()


@pytest.mark.parametrize(
    ("image", "platform"),
    [("library/alpine:latest", None), ("multiarch/app:1.0", "linux/amd64")],
)
def test_podman_pull_and_pull_again_from_cache(proxy, upstream, group, podman, image, platform):
    repo, _, tag = image.partition(":")
    reference = proxy.ref(group, image)
    name = reference.rpartition(":")[0]
    extra = (f"--platform={platform}",) if platform else ()
    top_digest = upstream.digest_of(repo, tag)
    image_digest, manifest = platform_manifest(upstream, repo, tag, platform)
    config_digest = manifest["config"]["digest"]

    def check_pulled(image_id: str) -> None:
        assert f"sha256:{image_id}" == config_digest
        inspected = podman.inspect(reference)
        assert inspected["Id"] == image_id
        # podman records the digest of the manifest the tag resolved to: for a multi-arch
        # image that is the index, with the chosen platform's manifest as a second repo
        # digest; for a single image both are the one manifest.
        assert inspected["Digest"] == top_digest
        assert set(inspected["RepoDigests"]) == {f"{name}@{top_digest}", f"{name}@{image_digest}"}
        if platform:
            assert f"{inspected['Os']}/{inspected['Architecture']}" == platform
        assert len(inspected["RootFS"]["Layers"]) == len(manifest["layers"])

    check_pulled(podman.pull(reference, *extra))

    podman("rmi", reference)
    assert podman.image_ids() == []
    upstream.registry.stop()
    upstream.relay.reset_counts()
    check_pulled(podman.pull(reference, *extra))
    assert upstream.relay.count(method="GET", kind="blob") == 0
    assert upstream.relay.count(method="GET", kind="manifest") == 0
    proxy.server.wait_for_log("result=stale")
