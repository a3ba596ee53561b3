"""Purge and cleanup with `depproxy-admin` against a real server pulling from a real registry:
what a re-pull fetches again, what cleanup leaves in storage, and a reader it must not cut."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests
from sqlalchemy import select, update

from depproxy_pyramid.models import CachedBlob, CachedManifest, CacheStatus, ImageTtlPolicy
from depproxy_pyramid.services.read_times import READ_AT_LAG
from tests.proxy import PROXY_MARKER, PULLER, Proxy, running_proxy
from tests.server import admin, wait_for
from tests.support.registry import skopeo_pull

ALPINE = "library/alpine:latest"
SCHEMA2 = "schema2/app:1.0"


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.strip()


def stored(proxy: Proxy) -> set[str]:
    """The keys of every object in the proxy's storage."""
    return {
        str(path.relative_to(proxy.storage))
        for path in proxy.storage.rglob("*")
        if path.is_file() and ".tmp" not in path.parts
    }


def row_keys(proxy: Proxy) -> dict[str, str]:
    """Every cache row's storage key, with its status."""
    manager, session = proxy.db.session()
    with manager:
        return {
            key: status
            for model in (CachedManifest, CachedBlob)
            for key, status in session.execute(select(model.storage_key, model.status)).all()
        }


def layout_blobs(layout: Path) -> dict[str, bytes]:
    return {f"sha256:{p.name}": p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def pull(proxy: Proxy, group: str, image: str, dest: Path) -> dict[str, bytes]:
    skopeo_pull(proxy.ref(group, image), dest, creds=PULLER)
    return layout_blobs(dest)


def test_purge_then_a_re_pull_refetches_and_cleanup_keeps_exactly_what_it_pulled(
    tmp_path, upstream, empty_database_url
):
    with running_proxy(
        tmp_path, empty_database_url, upstream.url, **{"depproxy.lookup_cache_seconds": "0"}
    ) as proxy:
        group = proxy.new_group("acme")
        first = pull(proxy, group, ALPINE, tmp_path / "alpine")
        alpine_keys = stored(proxy)
        pull(proxy, group, SCHEMA2, tmp_path / "schema2")
        assert stored(proxy) > alpine_keys
        fetched_first = upstream.relay.blob_fetches()

        manifests, blobs = (
            len([k for k in stored(proxy) if k.startswith("manifests/")]),
            len([k for k in stored(proxy) if k.startswith("blobs/")]),
        )
        assert ok(admin(proxy.ini, "purge", group)) == (
            f"purged {group}: {manifests} manifest(s) and {blobs} blob(s) are no longer served; "
            "`depproxy-admin CONFIG_URI cleanup` deletes them from storage"
        )
        upstream.relay.reset_counts()
        again = pull(proxy, group, ALPINE, tmp_path / "alpine-again")

        # Every blob of the image came from upstream again, once, and the bytes are the same.
        refetched = upstream.relay.blob_fetches()
        assert set(refetched.values()) == {1}
        alpine_blobs = {
            "sha256:" + k.rsplit("/", 1)[1] for k in alpine_keys if k.startswith("blobs/")
        }
        assert set(refetched) == alpine_blobs and alpine_blobs < set(fetched_first)
        assert again == first

        report = ok(admin(proxy.ini, "cleanup"))
        assert report.splitlines()[-1].startswith("cleanup done: ")
        assert stored(proxy) == alpine_keys
        assert row_keys(proxy) == {key: CacheStatus.DEFAULT for key in alpine_keys}
        assert ok(admin(proxy.ini, "cleanup")) == ""  # nothing left to do: silent

        # A row whose object went missing (as when a re-pull raced a cleanup) heals itself.
        lost = next(key for key in alpine_keys if key.startswith("blobs/"))
        (proxy.storage / lost).unlink()
        upstream.relay.reset_counts()
        digest = "sha256:" + lost.rsplit("/", 1)[1]
        answer = proxy.get(group, "library/alpine", "blobs", digest)
        assert answer.status_code == 200
        assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == digest
        assert upstream.relay.blob_fetches() == {digest: 1}
        wait_for((proxy.storage / lost).exists)  # committed just after the last byte


def test_ttl_cleanup_removes_exactly_the_images_not_read_within_the_ttl(
    tmp_path, upstream, empty_database_url
):
    with running_proxy(tmp_path, empty_database_url, upstream.url) as proxy:
        group = proxy.new_group("ttl")
        pull(proxy, group, ALPINE, tmp_path / "alpine")
        alpine_keys = stored(proxy)
        pull(proxy, group, SCHEMA2, tmp_path / "schema2")
        schema2_keys = stored(proxy) - alpine_keys
        # Stopped, the server writes the reads it noted: nothing of it overwrites what follows.
        proxy.server.stop()
        now = datetime.now(UTC)
        manager, session = proxy.db.session()
        with manager:
            session.add(ImageTtlPolicy(group_id=proxy.group_id(group), enabled=True, ttl_days=7))
            for model in (CachedManifest, CachedBlob):
                for keys, read_at in (
                    # Read up to READ_AT_LAG after its read_at: within the TTL.
                    (alpine_keys, now - timedelta(days=7)),
                    (schema2_keys, now - timedelta(days=7) - READ_AT_LAG - timedelta(minutes=1)),
                ):
                    session.execute(
                        update(model).where(model.storage_key.in_(keys)).values(read_at=read_at)
                    )
        proxy.server.start()

        report = ok(admin(proxy.ini, "cleanup")).splitlines()
        manifests = len([k for k in schema2_keys if k.startswith("manifests/")])
        assert report[0] == (
            f"{group}: {manifests} manifest(s) and {len(schema2_keys) - manifests} blob(s) "
            "unread for 7 day(s) marked for destruction"
        )
        assert stored(proxy) == alpine_keys
        assert set(row_keys(proxy)) == alpine_keys
        assert ok(admin(proxy.ini, "cleanup")) == ""

        upstream.relay.reset_counts()
        pull(proxy, group, ALPINE, tmp_path / "alpine-again")
        assert upstream.relay.count(method="GET", kind="blob") == 0
        pull(proxy, group, SCHEMA2, tmp_path / "schema2-again")
        assert upstream.relay.count(method="GET", kind="blob") == len(schema2_keys) - manifests
        audit = ok(admin(proxy.ini, "audit", "--group", group))
        assert "cache.expire" in audit and "cache.cleanup" in audit


def test_cleanup_does_not_cut_a_client_reading_a_destroyed_blob(tmp_path, upstream):
    with running_proxy(
        tmp_path,
        f"sqlite:///{tmp_path / 'proxy.sqlite'}",
        upstream.url,
        **{"depproxy.lookup_cache_seconds": "0"},
    ) as proxy:
        group = proxy.new_group("slow")
        layer = upstream.manifest("big/image", "1.0").json()["layers"][0]
        digest, size = layer["digest"], layer["size"]
        assert proxy.get(group, "big/image", "blobs", digest).status_code == 200  # cached
        key = f"blobs/sha256/{digest[7:]}"
        wait_for((proxy.storage / key).exists)

        url = f"{proxy.url}/v2/{group}/{PROXY_MARKER}/big/image/blobs/{digest}"
        bearer = proxy.token(group, "big/image")
        with requests.get(
            url, headers={"Authorization": f"Bearer {bearer}"}, stream=True, timeout=60
        ) as answer:
            assert answer.status_code == 200
            chunks = answer.iter_content(64 * 1024)
            received = [next(chunks)]
            ok(admin(proxy.ini, "purge", group))
            assert "destroyed" in ok(admin(proxy.ini, "cleanup"))
            assert not (proxy.storage / key).exists()
            received.extend(chunks)
        body = b"".join(received)
        assert len(body) == size
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
