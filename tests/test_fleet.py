"""Scale-out: three server processes on one PostgreSQL database and one S3 bucket, behind the
shipped nginx, fetch each blob and manifest from upstream once for the whole fleet.

skopeo x 8 --TLS--> nginx (deploy/nginx/depproxy.conf) --> pserve x 3 --> relay --> registry
                                                             |     \\
                                                     PostgreSQL    moto's S3 server

The relay counts what reached upstream; a fill in progress is owned through a row of
`depproxy_leases` (key `blob:sha256:<hex>`, owner `<hostname>:<pid>:<random>`), which is how
the test finds the process to kill.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.proxy import Proxy
from tests.server import wait_for
from tests.support import oci
from tests.support.fixtures import SeededImage, Upstream
from tests.support.fleet import Fleet, concurrent_pulls, layout_blobs, start_fleet
from tests.support.relay import Fault

PULLS = 8
# Several MiB each, so that the pulls' fills of different blobs overlap in time.
LAYERS_MB = (8, 4, 2, 1)
# At the relay's throttle (1 MiB/s) the big layer takes 12 s upstream: long enough to find its
# fill's owner and kill it before it is done.
THROTTLED_LAYERS_MB = (12, 1)
LEASE_TIMEOUT = 60


@pytest.fixture
def fleet(upstream, moto_s3, postgres_database, tmp_path):
    fleet = start_fleet(tmp_path / "fleet", postgres_database(), upstream.url, moto_s3)
    yield fleet
    fleet.stop()


def push_image(upstream: Upstream, name: str, layers_mb: tuple[int, ...], seed: int) -> SeededImage:
    """An image of the test's own upstream, so no other test has cached its blobs."""
    source = oci.write_layered_image(upstream.layout_dir(name), "1.0", layers_mb, seed=seed)
    return upstream.push(source, f"fleet/{name}", "1.0")


def hex_of(digest: str) -> str:
    return digest.removeprefix("sha256:")


def assert_pulled_intact(dests: list[Path], image: SeededImage) -> None:
    """Every copy holds exactly the image's manifest and blobs, each hashing to its name."""
    expected = {hex_of(d) for d in image.source.blob_digests | {image.digest}}
    for dest in dests:
        blobs = layout_blobs(dest)
        assert set(blobs) == expected, dest
        assert [name for name, sha256 in blobs.items() if name != sha256] == [], dest


def assert_bucket_holds_the_image(fleet: Fleet, image: SeededImage) -> None:
    """Blobs are content-addressed (`blobs/sha256/<hex>`, one copy for every group and process),
    complete and verified; nothing else is stored but the manifest, and no upload is left
    half-done."""
    objects = fleet.stored_objects()
    blobs = {key: body for key, body in objects.items() if key.startswith("blobs/")}
    assert set(blobs) == {f"blobs/sha256/{hex_of(d)}" for d in image.source.blob_digests}
    for key, body in blobs.items():
        assert hashlib.sha256(body).hexdigest() == key.rsplit("/", 1)[1], key
    strays = [
        key
        for key, body in objects.items()
        if key not in blobs and hashlib.sha256(body).hexdigest() != hex_of(image.digest)
    ]
    assert strays == []
    assert fleet.pending_multipart_uploads() == []


def assert_serves(member: Proxy, group: str, image: SeededImage) -> None:
    """`member`, asked directly on its own port, answers the image's manifest and blobs."""
    manifest = member.get(group, image.repo, "manifests", image.tag)
    assert manifest.status_code == 200, (member.url, manifest.text)
    assert manifest.headers["Docker-Content-Digest"] == image.digest
    for digest in sorted(image.source.blob_digests):
        blob = member.get(group, image.repo, "blobs", digest)
        assert blob.status_code == 200, (member.url, digest, blob.text[:200])
        assert f"sha256:{hashlib.sha256(blob.content).hexdigest()}" == digest, member.url


# Downloads are GETs with credentials: a process's first GET of a repository goes without a
# token, is answered with the registry's challenge and downloads nothing. HEADs download
# nothing either, and token requests go to the token server, not through this relay.
def manifest_downloads(upstream: Upstream) -> list[str]:
    """The paths of the manifest GETs upstream answered with the manifest, in order."""
    return [
        r.path
        for r in upstream.relay.requests
        if r.kind == "manifest" and r.method == "GET" and r.authorized
    ]


def test_concurrent_cold_pulls_over_three_processes_fetch_everything_from_upstream_once(
    fleet, upstream, tmp_path
):
    image = push_image(upstream, "cold", LAYERS_MB, seed=1)
    group = fleet.new_group("fleet-cold")
    dests = [tmp_path / f"pull-{n}" for n in range(PULLS)]

    results = concurrent_pulls(fleet.ref(group, image.ref), dests, fleet.front.cert_dir)

    assert [r.stderr for r in results if r.returncode != 0] == []
    # nginx spread the pulls: every process answered some of their requests.
    assert [len(fleet.access_lines(m)) > 0 for m in fleet.members] == [True] * len(fleet.members)
    assert upstream.relay.blob_downloads() == Counter(dict.fromkeys(image.source.blob_digests, 1))
    # Every skopeo asks for the tag. The first ask fetches the manifest with a GET by tag; the
    # others find the tag cached and at most revalidate it with a HEAD, which is not counted.
    # A GET by digest would fetch the same bytes a second time, so any manifest GET counts.
    assert manifest_downloads(upstream) == [f"/v2/{image.repo}/manifests/{image.tag}"]
    assert_pulled_intact(dests, image)
    assert_bucket_holds_the_image(fleet, image)

    upstream.relay.reset_counts()
    for member in fleet.members:
        assert_serves(member, group, image)
    # Not even a GET answered with a challenge.
    assert upstream.relay.count(method="GET", kind="blob") == 0
    assert upstream.relay.count(method="GET", kind="manifest") == 0


def test_a_fill_whose_owner_is_killed_is_taken_over_and_the_pulls_complete(
    fleet, upstream, tmp_path
):
    image = push_image(upstream, "killed", THROTTLED_LAYERS_MB, seed=2)
    big = max(image.source.layers, key=lambda layer: layer.size)
    group = fleet.new_group("fleet-killed")
    dests = [tmp_path / f"pull-{n}" for n in range(PULLS)]
    upstream.relay.set_mode(Fault.THROTTLE_BLOBS)

    with ThreadPoolExecutor(1) as pool:
        # Up to 3 attempts each: the pulls the killed process was answering are cut short.
        pulling = pool.submit(
            concurrent_pulls, fleet.ref(group, image.ref), dests, fleet.front.cert_dir, 3
        )
        owner = fleet.wait_for_lease(f"blob:{big.digest}", LEASE_TIMEOUT)
        victim = fleet.member_with_pid(int(owner.split(":")[1]))
        # Killed mid-fill: its upstream GET has begun, and at the throttle takes 12 s.
        wait_for(lambda: upstream.relay.blob_downloads()[big.digest] == 1)
        os.kill(victim.server.process.pid, signal.SIGKILL)
        victim.server.process.wait(timeout=10)
        # The takeover need not wait on the throttle: only the killed fill had to be slow.
        upstream.relay.set_mode(Fault.NORMAL)
        results = pulling.result()

    assert [r.stderr for r in results if r.returncode != 0] == []
    assert_pulled_intact(dests, image)
    fetches = upstream.relay.blob_downloads()
    assert set(fetches) == image.source.blob_digests
    # The killed fill, and the takeover's; any other blob the victim was filling likewise.
    assert fetches[big.digest] <= 2
    assert max(fetches.values()) <= 2
    # The manifest was answered before any blob was asked for, so before the kill.
    assert manifest_downloads(upstream) == [f"/v2/{image.repo}/manifests/{image.tag}"]
    assert_bucket_holds_the_image(fleet, image)

    upstream.relay.reset_counts()
    survivors = [member for member in fleet.members if member is not victim]
    assert len(survivors) == 2
    for member in survivors:
        assert_serves(member, group, image)
    assert upstream.relay.count(method="GET", kind="blob") == 0
