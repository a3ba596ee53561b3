"""Pulling through the proxy with podman, the client people actually run against it.

podman runs as root with the ``vfs`` storage driver (no overlay mounts, no fuse), the
``cgroupfs`` cgroup manager and file events (no systemd), and with every config, state and
storage path inside the test's own directory, so the host's containers config, auth file and
image store neither leak in nor get touched. Only pulling is exercised: no container runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.proxy import PULLER


class Podman:
    """``podman`` confined to ``home``: its own containers.conf, storage, auth and policy."""

    def __init__(self, home: Path, runroot: Path) -> None:
        binary = shutil.which("podman")
        if binary is None:
            pytest.fail(
                "'podman' not found on PATH: bin/test installs it "
                "(Debian packages: podman uidmap fuse-overlayfs)",
                pytrace=False,
            )
        self.binary = binary
        self.home = home
        self.root, self.runroot, state = home / "root", runroot, home / "state"
        for directory in (self.root, state / "copy"):
            directory.mkdir(parents=True)
        (home / "containers.conf").write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{state / "events.log"}"\n'
            f'tmp_dir = "{state / "tmp"}"\n'
            f'image_copy_tmp_dir = "{state / "copy"}"\n'
            # Rootful netavark keeps its state in a fixed /run/containers/networks; the CNI
            # backend keeps it in network_config_dir. Nothing here uses a network anyway.
            "[network]\n"
            'network_backend = "cni"\n'
            f'network_config_dir = "{state / "networks"}"\n'
        )
        # podman refuses a storage.conf without runroot ("runroot must be set"), even
        # when --runroot is given on the command line.
        (home / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{self.runroot}"\ngraphroot = "{self.root}"\n'
        )
        (home / "registries.conf").write_text(
            'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
        )
        (home / "auth.json").write_text('{"auths": {}}')
        (home / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        self.env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("CONTAINERS_", "REGISTRY_", "XDG_"))
            },
            "CONTAINERS_CONF": str(home / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(home / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(home / "auth.json"),
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [
            self.binary,
            f"--root={self.root}",
            f"--runroot={self.runroot}",
            "--storage-driver=vfs",
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
            *args,
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, env=self.env, timeout=120, check=False
        )
        if check:
            assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
        return result

    def pull(self, reference: str, *extra: str) -> str:
        """Pull over plain HTTP as the puller; returns the image ID podman prints."""
        result = self(
            "pull",
            "--tls-verify=false",
            f"--creds={PULLER[0]}:{PULLER[1]}",
            f"--signature-policy={self.home / 'policy.json'}",
            *extra,
            reference,
        )
        return result.stdout.strip().splitlines()[-1]

    def inspect(self, reference: str) -> dict:
        return json.loads(self("image", "inspect", reference).stdout)[0]

    def image_ids(self) -> list[str]:
        return self("images", "--all", "--quiet", "--no-trunc").stdout.split()


@pytest.fixture
def podman(tmp_path):
    # podman refuses a runroot longer than 50 characters, which tmp_path is.
    runroot = Path(tempfile.mkdtemp(prefix="podman-run-"))
    try:
        yield Podman(tmp_path / "podman", runroot)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


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
    assert "result=stale" in proxy.server.log()
