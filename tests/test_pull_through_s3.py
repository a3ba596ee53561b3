"""Pull-through with S3 storage (moto's server over HTTP), streamed or by presigned redirect."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from tests.proxy import PULLER, start_proxy
from tests.server import wait_for
from tests.support.registry import skopeo_pull
from tests.support.relay import Fault


@pytest.fixture(params=["stream", "redirect"])
def s3_proxy(request, upstream, moto_s3, tmp_path):
    prefix = f"cache-{request.param}-{tmp_path.name}"
    proxy = start_proxy(
        tmp_path,
        f"sqlite:///{tmp_path / 'proxy.sqlite'}",
        upstream.url,
        **moto_s3.settings(prefix=prefix, redirect=str(request.param == "redirect").lower()),
    )
    proxy.s3_prefix = prefix
    proxy.redirects = request.param == "redirect"
    yield proxy
    proxy.server.stop()


def stored_objects(moto_s3, prefix: str) -> dict[str, bytes]:
    client = moto_s3.client()
    listing = client.list_objects_v2(Bucket=moto_s3.bucket, Prefix=prefix + "/")
    return {
        item["Key"]: client.get_object(Bucket=moto_s3.bucket, Key=item["Key"])["Body"].read()
        for item in listing.get("Contents", [])
    }


def test_pull_through_s3(s3_proxy, upstream, moto_s3, tmp_path):
    group = s3_proxy.new_group("s3")
    image = "multiarch/app:1.0"
    skopeo_pull(s3_proxy.ref(group, image), tmp_path / "first", creds=PULLER, all=True)
    objects = stored_objects(moto_s3, s3_proxy.s3_prefix)
    blobs = {
        key: body
        for key, body in objects.items()
        if key.startswith(f"{s3_proxy.s3_prefix}/blobs/sha256/")
    }
    assert set(upstream.relay.blob_fetches()) == {
        "sha256:" + key.rsplit("/", 1)[1] for key in blobs
    }
    for key, body in blobs.items():
        assert hashlib.sha256(body).hexdigest() == key.rsplit("/", 1)[1]

    upstream.relay.reset_counts()
    skopeo_pull(s3_proxy.ref(group, image), tmp_path / "second", creds=PULLER, all=True)
    assert upstream.relay.count(method="GET", kind="blob") == 0
    def redirected() -> list[str]:
        return [
            line
            for line in s3_proxy.server.log().splitlines()
            if "result=hit" in line and "kind=blobs" in line and "status=307" in line
        ]

    # Access lines are written when a response's body is done, just after the client has it.
    wait_for(lambda: len(redirected()) == (len(blobs) if s3_proxy.redirects else 0))


def test_corrupt_upstream_leaves_nothing_in_the_bucket(s3_proxy, upstream, moto_s3, tmp_path):
    group = s3_proxy.new_group("s3bad")
    upstream.relay.set_mode(Fault.CORRUPT_BLOBS)
    failed = skopeo_pull(
        s3_proxy.ref(group, "library/alpine:latest"), tmp_path / "bad", creds=PULLER, check=False
    )
    assert failed.returncode != 0
    assert not [
        key
        for key in stored_objects(moto_s3, s3_proxy.s3_prefix)
        if key.startswith(f"{s3_proxy.s3_prefix}/blobs/")
    ]
    assert s3_proxy.cached_blobs(group) == 0


def test_a_large_layer_streams_into_s3_past_a_slow_client_and_no_spool_file(
    upstream, moto_s3, tmp_path, monkeypatch
):
    # The S3 strategy spools under the temporary directory: this proxy's own, to be watched.
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    prefix = f"cache-large-{tmp_path.name}"
    proxy = start_proxy(
        tmp_path, f"sqlite:///{tmp_path / 'proxy.sqlite'}", upstream.url,
        **moto_s3.settings(prefix=prefix),
    )
    try:
        group = proxy.new_group("s3large")
        (layer,) = upstream.images["big/image:1.0"].source.layers
        upstream.relay.reset_counts()
        spool_dir = tmp_path / "tmp" / "depproxy-spool"
        seen_in_spool: set[str] = set()
        done = threading.Event()

        def watch_spool() -> None:
            while not done.is_set():
                if spool_dir.is_dir():
                    seen_in_spool.update(path.name for path in spool_dir.iterdir())
                time.sleep(0.005)

        watcher = threading.Thread(target=watch_spool)
        watcher.start()
        try:
            slow = proxy.get(group, "big/image", "blobs", layer.digest, stream=True)
            fast = proxy.get(group, "big/image", "blobs", layer.digest, stream=True)
            slow_hash = hashlib.sha256(slow.raw.read(1024 * 1024))
            fast_hash = hashlib.sha256()
            for chunk in fast.iter_content(1024 * 1024):
                fast_hash.update(chunk)
            # By now the slow client is far behind the fill's window in memory.
            wait_for(lambda: proxy.cached_blobs(group) == 1, timeout=60)
            for chunk in slow.iter_content(1024 * 1024):
                slow_hash.update(chunk)
        finally:
            done.set()
            watcher.join()

        assert fast.status_code == slow.status_code == 200
        assert fast_hash.hexdigest() == slow_hash.hexdigest() == layer.digest.split(":")[1]
        # One transfer (its first request, without a token, is answered with a challenge).
        fetched = [r for r in upstream.relay.requests if r.digest == layer.digest and r.authorized]
        assert len(fetched) == 1
        assert spool_dir.is_dir()
        assert seen_in_spool == set()
        object_key = f"{prefix}/blobs/sha256/{layer.digest.split(':')[1]}"
        client = moto_s3.client()
        head = client.head_object(Bucket=moto_s3.bucket, Key=object_key)
        assert head["ContentLength"] == layer.size
        assert client.list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=prefix).get(
            "Uploads", []
        ) == []
    finally:
        proxy.server.stop()
