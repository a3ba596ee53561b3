"""Pull-through with S3 storage (moto's server over HTTP), streamed or by presigned redirect."""

from __future__ import annotations

import hashlib

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
