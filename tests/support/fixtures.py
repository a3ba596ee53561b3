"""Pytest fixtures giving tests a seeded, real upstream registry behind a fault relay.

Load with ``pytest_plugins = ["tests.support.fixtures"]`` in a conftest. The upstream
is started and seeded once per session (a few seconds, dominated by the big layer);
use the function-scoped ``upstream`` fixture in tests so each starts from normal
fault modes, zeroed counters and a running registry.

Layout of the upstream::

    proxy under test --> relay --> docker-registry
                                        | 401 realm
    clients ---------> token_relay --> token_server
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import oci
from tests.support.registry import SERVICE, Registry, require_binary
from tests.support.relay import Fault, Relay
from tests.support.token_server import TokenServer


@dataclass(frozen=True)
class SeededImage:
    """An image pushed upstream: where it is, its digest, and the layout it came from."""

    repo: str
    tag: str
    digest: str
    media_type: str
    source: oci.Image | oci.ImageIndex

    @property
    def ref(self) -> str:
        """``repo:tag``."""
        return f"{self.repo}:{self.tag}"


class Upstream:
    """The upstream a proxy under test talks to, plus handles to observe and break it."""

    def __init__(self, workdir: Path, big_layer_mb: int) -> None:
        """Bind ports and write configs; nothing runs until :meth:`start`."""
        self.workdir = workdir
        self.big_layer_mb = big_layer_mb
        self.token_server = TokenServer(workdir / "token")
        self.token_relay = Relay(self.token_server.port)
        self.registry = Registry(
            workdir / "registry", self.token_server, realm=f"{self.token_relay.url}/token"
        )
        self.relay = Relay(self.registry.port)
        self.images: dict[str, SeededImage] = {}
        self._layouts = itertools.count()

    def start(self) -> None:
        """Start the token server, relays and registry (empty until seeded)."""
        self.token_server.start()
        self.token_relay.start()
        self.registry.start()
        self.relay.start()

    @property
    def url(self) -> str:
        """Upstream URL for the proxy under test (the relay, so requests are counted)."""
        return self.relay.url

    @property
    def registry_url(self) -> str:
        """The registry itself, bypassing the relay (nothing counted, no faults)."""
        return self.registry.url

    @property
    def service(self) -> str:
        """The ``service`` the registry asks tokens for."""
        return SERVICE

    @property
    def private_prefix(self) -> str:
        """Repositories under this prefix need :attr:`private_credentials` to pull."""
        return self.token_server.policy.private_prefix

    @property
    def private_credentials(self) -> tuple[str, str]:
        """Username and password allowed to pull private repositories."""
        policy = self.token_server.policy
        return policy.username, policy.password

    @property
    def admin_credentials(self) -> tuple[str, str]:
        """Username and password allowed to push anywhere."""
        policy = self.token_server.policy
        return policy.admin_username, policy.admin_password

    def layout_dir(self, name: str) -> Path:
        """A fresh directory for an OCI layout."""
        return self.workdir / "layouts" / f"{next(self._layouts):03d}-{name.replace('/', '_')}"

    def push(
        self, source: oci.Image | oci.ImageIndex, repo: str, tag: str, fmt: str | None = None
    ) -> SeededImage:
        """Push a generated image to ``repo:tag`` directly (not via relay) and remember it."""
        digest = self.registry.seed_image(source, repo, tag, fmt=fmt)
        media_type = self.manifest(repo, digest).headers["Content-Type"]
        seeded = SeededImage(repo, tag, digest, media_type, source)
        self.images[seeded.ref] = seeded
        return seeded

    def move_tag(self, repo: str, tag: str, fmt: str | None = None) -> SeededImage:
        """Point ``repo:tag`` at a brand-new single-platform image (creating it if needed).

        Session state is shared: move tags of repositories your test owns (e.g.
        ``moving/<test name>``) rather than the seeded ones.
        """
        marker = f"{repo}:{tag}#{next(self._layouts)}"
        image = oci.write_image(self.layout_dir(repo), tag=tag, marker=marker)
        return self.push(image, repo, tag, fmt=fmt)

    def manifest(self, repo: str, ref: str, method: str = "GET") -> requests.Response:
        """Fetch a manifest from the registry directly, as admin."""
        response = self.registry.admin_client().manifest(repo, ref, method)
        response.raise_for_status()
        return response

    def push_referrer(
        self, repo: str, subject_ref: str, artifact_type: str, payload: bytes
    ) -> dict[str, Any]:
        """Push an artifact whose subject is ``repo:subject_ref`` and record it in the
        subject's referrers tag, as an OCI 1.1 client does on a registry without the referrers
        API (distribution 2.8 has none); the artifact's descriptor as that index lists it."""
        client = self.registry.admin_client()
        subject = self.manifest(repo, subject_ref)
        subject_descriptor = oci.Descriptor(
            subject.headers["Content-Type"],
            subject.headers["Docker-Content-Digest"],
            len(subject.content),
        )
        client.push_blob(repo, oci.EMPTY_JSON)
        layer = oci.Descriptor(
            "application/octet-stream", client.push_blob(repo, payload), len(payload)
        )
        manifest = oci.artifact_manifest(subject_descriptor, artifact_type, layer)
        digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        client.push_manifest(repo, digest, manifest, oci.OCI_MANIFEST)
        referrer = {
            **oci.Descriptor(oci.OCI_MANIFEST, digest, len(manifest)).to_json(),
            "artifactType": artifact_type,
        }
        tag = oci.referrers_tag(subject_descriptor.digest)
        existing = client.manifest(repo, tag)
        index = existing.content if existing.status_code == 200 else None
        client.push_manifest(repo, tag, oci.with_referrer(index, referrer), oci.OCI_INDEX)
        return referrer

    def digest_of(self, repo: str, ref: str) -> str:
        """The registry's current manifest digest for ``repo:ref`` (direct, as admin)."""
        return self.registry.admin_client().digest_of(repo, ref)

    def seed_defaults(self) -> None:
        """Push the images every test session can rely on.

        The big layer is generated in a thread while the small images are pushed
        (skopeo runs as a subprocess, so the two overlap).
        """
        alpine = self.layout_dir("alpine")
        small: list[tuple[oci.Image | oci.ImageIndex, str, str, str | None]] = [
            (oci.write_image(alpine, "latest", "alpine-latest", base="alpine"),
             "library/alpine", "latest", None),
            (oci.write_image(alpine, "3.20", "alpine-3.20", base="alpine"),
             "library/alpine", "3.20", None),
            (oci.write_index(self.layout_dir("multiarch"), "1.0", "multiarch"),
             "multiarch/app", "1.0", None),
            (oci.write_index(self.layout_dir("dockerlist"), "1.0", "dockerlist"),
             "dockerlist/app", "1.0", "v2s2"),
            (oci.write_image(self.layout_dir("schema2"), "1.0", "schema2"),
             "schema2/app", "1.0", "v2s2"),
            (oci.write_image(self.layout_dir("secret"), "1.0", "secret"),
             f"{self.private_prefix}secret", "1.0", None),
        ]  # fmt: skip
        with ThreadPoolExecutor(max_workers=1) as pool:
            big = pool.submit(
                oci.write_big_image, self.layout_dir("big"), "1.0", size_mb=self.big_layer_mb
            )
            for source, repo, tag, fmt in small:
                self.push(source, repo, tag, fmt=fmt)
            self.push(big.result(), "big/image", "1.0")

    def reset(self) -> None:
        """Back to a healthy upstream with zeroed counters: normal modes, registry running."""
        self.relay.set_mode(Fault.NORMAL)
        self.token_relay.set_mode(Fault.NORMAL)
        self.registry.start()
        self.relay.reset_counts()
        self.token_relay.reset_counts()
        self.token_server.reset()
        self.registry.reset_counts()

    def close(self) -> None:
        """Stop whatever runs, relays first so no request hits a half-stopped backend."""
        self.relay.stop()
        self.token_relay.stop()
        self.registry.stop()
        self.token_server.stop()


_SETUP_SECONDS = pytest.StashKey[float]()


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Report how long the upstream took to start and seed, to keep an eye on it in CI."""
    if _SETUP_SECONDS in config.stash:
        seconds = config.stash[_SETUP_SECONDS]
        terminalreporter.write_line(f"depproxy upstream registry setup: {seconds:.1f}s")


@pytest.fixture(scope="session")
def upstream_registry(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[Upstream]:
    """Session-wide seeded upstream; tests should normally use ``upstream`` instead."""
    for tool in ("docker-registry", "skopeo"):
        try:
            require_binary(tool)
        except RuntimeError as error:
            pytest.fail(str(error), pytrace=False)
    started = time.monotonic()
    upstream = Upstream(
        tmp_path_factory.mktemp("upstream"),
        big_layer_mb=int(os.environ.get("DEPPROXY_TEST_BIG_LAYER_MB", "200")),
    )
    try:
        upstream.start()
        upstream.seed_defaults()
        upstream.reset()
        pytestconfig.stash[_SETUP_SECONDS] = time.monotonic() - started
        yield upstream
    finally:
        upstream.close()


@pytest.fixture(scope="session")
def token_server(upstream_registry: Upstream) -> TokenServer:
    """The token server behind the upstream registry (``upstream`` resets its log per test)."""
    return upstream_registry.token_server


@pytest.fixture
def upstream(upstream_registry: Upstream) -> Iterator[Upstream]:
    """The seeded upstream, reset to healthy with zeroed counters before and after the test."""
    upstream_registry.reset()
    yield upstream_registry
    upstream_registry.reset()
