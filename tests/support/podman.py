"""podman confined to a test's own directory, and the fixture that gives a test one.

podman runs as root with the ``vfs`` storage driver (no overlay mounts, no fuse), the
``cgroupfs`` cgroup manager and file events (no systemd), and with every config, state and
storage path inside the test's own directory, so the host's containers config, auth file and
image store neither leak in nor get touched.
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
