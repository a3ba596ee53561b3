"""Objects are stored once, whichever groups pulled them; access stays each group's own.

A real server process in front of the real token-auth upstream, pulled through with skopeo.
Two groups with upstream credentials for a private repository pull the same image: its blobs
are fetched once and stored once, the second group proving its access with a HEAD per blob.
A third group, whose upstream access does not reach the repository, gets nothing of it from
the cache. Purging one group leaves the other's pulls intact, and cleanup deletes the objects
only once no group references them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import requests

from depproxy_pyramid.services.overview import InstanceOverview, instance_overview
from tests.proxy import PROXY_MARKER, PULLER, Proxy, running_proxy
from tests.server import admin
from tests.support.registry import MANIFEST_ACCEPT, skopeo_pull

TAG = "1.0"


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def pulled_blobs(layout: Path) -> dict[str, bytes]:
    """The image's config and layers as skopeo wrote them, each checked against its digest (an
    OCI layout keeps the manifest among its blobs too; it came from /manifests)."""
    blobs = {f"sha256:{p.name}": p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}
    for digest, content in blobs.items():
        assert "sha256:" + hashlib.sha256(content).hexdigest() == digest
    for manifest in json.loads((layout / "index.json").read_text())["manifests"]:
        del blobs[manifest["digest"]]
    return blobs


def stored_objects(proxy: Proxy) -> set[Path]:
    return {path for path in (proxy.storage / "blobs").rglob("*") if path.is_file()}


def stored_bytes(proxy: Proxy) -> int:
    return sum(
        path.stat().st_size
        for kind in ("blobs", "manifests")
        for path in (proxy.storage / kind).rglob("*")
        if path.is_file()
    )


def overview(proxy: Proxy) -> InstanceOverview:
    manager, session = proxy.db.session()
    with manager:
        return instance_overview(session)


def get_blob(proxy: Proxy, group: str, image: str, digest: str) -> requests.Response:
    return requests.get(
        f"{proxy.url}/v2/{group}/{PROXY_MARKER}/{image}/blobs/{digest}",
        headers={"Authorization": f"Bearer {proxy.token(group, image)}"},
        timeout=60,
    )


def test_two_groups_store_an_image_once_and_a_third_cannot_read_it(
    upstream, tmp_path, empty_database_url
):
    image = f"{upstream.private_prefix}secret"
    username, password = upstream.private_credentials
    with running_proxy(tmp_path, empty_database_url, upstream.url) as proxy:
        for group in ("team-a", "team-b", "team-c"):
            ok(admin(proxy.ini, "group", "add", group))
            ok(admin(proxy.ini, "member", "add", group, PULLER[0], "--role", "developer"))
        for group in ("team-a", "team-b"):
            ok(proxy.set_upstream_credentials(group, username, password))
        upstream.relay.reset_counts()

        skopeo_pull(proxy.ref("team-a", f"{image}:{TAG}"), tmp_path / "a", creds=PULLER)
        blobs = pulled_blobs(tmp_path / "a")
        # Every blob of the image (layers and config) came from upstream exactly once.
        assert upstream.relay.blob_fetches() == {digest: 1 for digest in blobs}
        objects = stored_objects(proxy)
        assert {path.name for path in objects} == {digest[7:] for digest in blobs}
        upstream.relay.reset_counts()

        skopeo_pull(proxy.ref("team-b", f"{image}:{TAG}"), tmp_path / "b", creds=PULLER)
        assert pulled_blobs(tmp_path / "b") == blobs
        # Nothing transferred again: team-b's own credentials were checked with a HEAD each.
        assert upstream.relay.count(method="GET", kind="blob") == 0
        assert set(upstream.relay.blob_fetches("HEAD")) == set(blobs)
        assert stored_objects(proxy) == objects
        assert proxy.cached_blobs("team-b") == len(blobs)
        assert set(proxy.stored_blob_files("team-a")) == set(proxy.stored_blob_files("team-b"))
        # The admin overview counts each stored object once, not once per group.
        assert overview(proxy).bytes_in_use == stored_bytes(proxy)
        upstream.relay.reset_counts()

        # team-c's upstream access (anonymous: it has no credentials) does not reach the
        # private repository, so the bytes stored for the others are not its to read.
        for digest, content in blobs.items():
            answer = get_blob(proxy, "team-c", image, digest)
            assert answer.status_code in (401, 403, 404), answer.text
            assert answer.headers["Content-Type"] == "application/json"
            assert content not in answer.content
        assert upstream.relay.count(method="GET", kind="blob") == 0
        assert proxy.cached_blobs("team-c") == 0
        manifest = requests.get(
            f"{proxy.url}/v2/team-c/{PROXY_MARKER}/{image}/manifests/{TAG}",
            headers={
                "Authorization": f"Bearer {proxy.token('team-c', image)}",
                "Accept": MANIFEST_ACCEPT,
            },
            timeout=60,
        )
        assert manifest.status_code == 404, manifest.text

        # Purging team-a and cleaning up keeps every object team-b still references.
        ok(admin(proxy.ini, "purge", "team-a"))
        admin(proxy.ini, "cleanup")
        assert stored_objects(proxy) == objects
        assert (overview(proxy).bytes_in_use, overview(proxy).bytes_pending_deletion) == (
            stored_bytes(proxy),
            0,
        )
        upstream.relay.reset_counts()
        skopeo_pull(proxy.ref("team-b", f"{image}:{TAG}"), tmp_path / "b2", creds=PULLER)
        assert pulled_blobs(tmp_path / "b2") == blobs
        assert upstream.relay.count(method="GET", kind="blob") == 0

        # Once no group references them, cleanup deletes them.
        ok(admin(proxy.ini, "purge", "team-b"))
        admin(proxy.ini, "cleanup")
        assert stored_objects(proxy) == set()
