"""The JSON API against a real server process pulling from the real upstream: what a pull
cached is listed with its sizes, and a purge through the API stops the cache at once."""

from __future__ import annotations

import json
from pathlib import Path

import requests
from sqlalchemy import select

from depproxy_pyramid.credentials import PERSONAL_TOKEN_PREFIX, new_token, token_digest
from depproxy_pyramid.models import Group, Membership, PersonalAccessToken, Role, User
from tests.proxy import PULLER
from tests.server import wait_for
from tests.support.registry import skopeo_pull

IMAGE = "library/alpine"


def owner_token(proxy, group: str) -> str:
    """An `api` personal access token of a fresh owner of `group`."""
    secret = new_token(PERSONAL_TOKEN_PREFIX)
    manager, session = proxy.db.session()
    with manager:
        owner = User(username=f"owner-{secret[-8:].lower()}", password_hash="!")
        session.add(owner)
        group_row = session.scalar(select(Group).where(Group.path == group))
        session.add(Membership(group=group_row, user=owner, role=Role.OWNER))
        session.add(
            PersonalAccessToken(
                user=owner, name="api", token_digest=token_digest(secret), scopes="api"
            )
        )
    return secret


def pulled_digest(layout: Path) -> str:
    return json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]


def test_pull_list_purge_and_pull_again(proxy, upstream, group, tmp_path):
    api = f"{proxy.url}/api/v4/groups/{group}/dependency_proxy"
    owner = {"PRIVATE-TOKEN": owner_token(proxy, group)}
    skopeo_pull(proxy.ref(group, f"{IMAGE}:latest"), tmp_path / "first", creds=PULLER)

    manifest = upstream.manifest(IMAGE, "latest")
    digest = upstream.digest_of(IMAGE, "latest")
    described = manifest.json()
    blobs = {
        entry["digest"]: entry["size"] for entry in [described["config"], *described["layers"]]
    }

    def listed_blobs() -> dict[str, int]:
        every = requests.get(f"{api}/blobs", headers=owner, timeout=10).json()
        return {blob["digest"]: blob["size"] for blob in every}

    # A fill records its row just after its last byte reached the client.
    wait_for(lambda: listed_blobs() == blobs, timeout=10)
    listed = requests.get(f"{api}/manifests", headers=owner, timeout=10)
    assert listed.status_code == 200
    assert [(m["image_name"], m["tag"], m["digest"], m["size"]) for m in listed.json()] == [
        (IMAGE, "latest", digest, len(manifest.content))
    ]
    # What pulling it moves: the manifest, its config and its layers.
    assert listed.json()[0]["image_size"] == len(manifest.content) + sum(blobs.values())
    first_page = requests.get(f"{api}/blobs", params={"per_page": 1}, headers=owner, timeout=10)
    assert first_page.status_code == 200
    assert first_page.headers["X-Total"] == str(len(blobs))
    assert first_page.headers["X-Total-Pages"] == str(len(blobs))
    assert (first_page.headers["X-Page"], first_page.headers["X-Next-Page"]) == ("1", "2")
    assert first_page.links["next"]["url"] == f"{api}/blobs?page=2&per_page=1"
    every = requests.get(f"{api}/blobs", headers=owner, timeout=10).json()
    assert first_page.json() == every[:1]  # largest first
    summary = requests.get(f"{api}/cache", headers=owner, timeout=10).json()
    assert (summary["image_count"], summary["blob_count"]) == (1, len(blobs))
    assert summary["total_size"] == len(manifest.content) + sum(blobs.values())

    # The process keeps a manifest pulled by digest in memory: this one costs upstream nothing.
    upstream.relay.reset_counts()
    assert proxy.get(group, IMAGE, "manifests", digest).status_code == 200
    assert upstream.relay.count("GET", "manifest") == 0

    purged = requests.delete(f"{api}/cache", headers=owner, timeout=10)
    assert (purged.status_code, purged.json()) == (
        202,
        {"message": "202 Accepted", "manifests": 1, "blobs": len(blobs)},
    )
    assert requests.get(f"{api}/cache", headers=owner, timeout=10).json()["total_size"] == 0

    # At once, not after depproxy.lookup_cache_seconds: memory no longer answers for it.
    refetched = proxy.get(group, IMAGE, "manifests", digest)
    assert (refetched.status_code, refetched.content) == (200, manifest.content)
    assert upstream.relay.count("GET", "manifest") == 1

    skopeo_pull(proxy.ref(group, f"{IMAGE}:latest"), tmp_path / "again", creds=PULLER)
    assert pulled_digest(tmp_path / "again") == pulled_digest(tmp_path / "first")
    assert set(upstream.relay.blob_fetches()) == set(blobs)
    wait_for(lambda: listed_blobs() == blobs, timeout=10)
