"""The Docker engine and containerd, Debian's `docker.io` and `containerd`, as session fixtures.

Each daemon runs as root with every root, state and socket inside a directory of the session's
own, so the host's daemons (if any), images and credentials are neither used nor touched.
containerd runs without its CRI plugin and pulls with the `native` snapshotter; dockerd runs
on that containerd with the `vfs` storage driver, no bridge and no iptables. Both only pull:
no container runs, so no mounts, cgroups or networks are set up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.proxy import PULLER
from tests.server import stop_process

# Debian's client matches Debian's daemon; a newer client elsewhere on PATH may not.
DOCKER_CLIENT = "/usr/bin/docker"


def _start(command: list[str], log: Path, ready, what: str) -> subprocess.Popen:
    with open(log, "ab") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 30
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, timeout=20)
            pytest.fail(f"{what} did not start:\n{log.read_text()[-3000:]}", pytrace=False)
        time.sleep(0.2)
    return process


class Containerd:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.socket = home / "containerd.sock"

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed:\n{result.stderr}")
        return result

    def pull(
        self,
        reference: str,
        *,
        credentials=PULLER,
        check: bool = True,
        options: tuple[str, ...] = ("--plain-http",),
    ):
        """`ctr images pull` as `credentials` (None: anonymously), unpacked; `options` say how
        to reach the registry (plain HTTP by default, or `--hosts-dir`)."""
        user = ("--user", f"{credentials[0]}:{credentials[1]}") if credentials else ()
        return self.ctr(
            "images", "pull", *options, "--snapshotter", "native", *user, reference,
            check=check,
        )  # fmt: skip

    def remove_all(self) -> None:
        names = self.ctr("images", "list", "--quiet").stdout.split()
        if names:
            self.ctr("images", "remove", "--sync", *names)
        self.ctr("content", "prune", "references", check=False)

    def ready(self) -> bool:
        if not self.socket.exists():
            return False
        return self.ctr("version", check=False).returncode == 0


class DockerEngine:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.socket = home / "docker.sock"

    def __call__(
        self,
        *args: str,
        config: Path,
        check: bool = True,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """The docker client with its own config directory (logins) against this engine;
        `env` adds to the client's environment, `input` is its stdin."""
        result = subprocess.run(
            [DOCKER_CLIENT, "--config", str(config), "-H", f"unix://{self.socket}", *args],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, **(env or {})},
            input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed:\n{result.stderr}")
        return result

    def ready(self) -> bool:
        if not self.socket.exists():
            return False
        return self("version", config=self.home, check=False).returncode == 0

    def image(self, reference: str, config: Path) -> dict:
        return json.loads(self("image", "inspect", reference, config=config).stdout)[0]

    def remove_all(self) -> None:
        ids = self("images", "--all", "--quiet", config=self.home).stdout.split()
        if ids:
            # Newest first, as listed: a built image goes before the image it was built from.
            self("rmi", "--force", *dict.fromkeys(ids), config=self.home)


def _require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(
            f"{binary} is missing: bin/test installs it (Debian's docker.io and containerd)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def containerd_daemon() -> Iterator[Containerd]:
    _require("containerd")
    _require("ctr")
    # A short path: the socket's must fit in 108 bytes.
    home = Path(tempfile.mkdtemp(prefix="ctd-"))
    daemon = Containerd(home)
    config = home / "config.toml"
    config.write_text(
        f"""version = 2
root = "{home / "root"}"
state = "{home / "state"}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{daemon.socket}"
"""
    )
    process = _start(
        ["containerd", "--config", str(config)], home / "containerd.log", daemon.ready, "containerd"
    )
    try:
        yield daemon
    finally:
        stop_process(process, timeout=20)
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def running_dockerd(containerd: Containerd, *options: str) -> Iterator[DockerEngine]:
    """A Docker engine of its own on `containerd`, with `options` added to its command line."""
    _require("dockerd")
    _require(DOCKER_CLIENT)
    home = Path(tempfile.mkdtemp(prefix="dockerd-"))
    engine = DockerEngine(home)
    # containerd namespaces are letters and digits, with single separators between them.
    namespace = re.sub(r"[^A-Za-z0-9]", "", home.name)
    command = [
        "dockerd",
        "--data-root", str(home / "root"),
        "--exec-root", str(home / "exec"),
        "--pidfile", str(home / "dockerd.pid"),
        "--host", f"unix://{engine.socket}",
        "--containerd", str(containerd.socket),
        # Engines sharing one containerd keep out of each other's way.
        "--containerd-namespace", namespace,
        "--containerd-plugins-namespace", f"{namespace}-plugins",
        "--storage-driver", "vfs",
        "--bridge", "none",
        "--iptables=false",
        "--ip6tables=false",
        # Every test proxy listens on loopback over plain HTTP, each on a port of its own.
        "--insecure-registry", "127.0.0.0/8",
        *options,
    ]  # fmt: skip
    process = _start(command, home / "dockerd.log", engine.ready, "dockerd")
    try:
        yield engine
    finally:
        stop_process(process, timeout=20)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_engine(containerd_daemon: Containerd) -> Iterator[DockerEngine]:
    with running_dockerd(containerd_daemon) as engine:
        yield engine


@pytest.fixture
def docker(docker_engine: DockerEngine) -> Iterator[DockerEngine]:
    """The engine with no images, before and after the test."""
    docker_engine.remove_all()
    yield docker_engine
    docker_engine.remove_all()


@pytest.fixture
def containerd(containerd_daemon: Containerd) -> Iterator[Containerd]:
    """containerd with no images, before and after the test."""
    containerd_daemon.remove_all()
    yield containerd_daemon
    containerd_daemon.remove_all()
