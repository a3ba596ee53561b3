"""Pulling through the proxy, as a real server process, from a real registry with token auth."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from depproxy_pyramid.models import CachedTag, Group
from tests.proxy import PULLER, running_proxy
from tests.server import admin, wait_for
from tests.support.registry import skopeo_pull
from tests.support.relay import Fault


def layout_blobs(layout: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()}


def upstream_blobs(upstream, repo: str, reference: str) -> set[str]:
    """Config and layer digests of an image as the upstream registry holds it."""
    manifest = upstream.manifest(repo, reference).json()
    if "manifests" in manifest:
        return set().union(
            *(upstream_blobs(upstream, repo, entry["digest"]) for entry in manifest["manifests"])
        )
    return {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}


def pull(proxy, group, image, dest, **kw):
    return skopeo_pull(proxy.ref(group, image), dest, creds=PULLER, **kw)


@pytest.mark.parametrize(
    ("image", "media_type", "all_platforms"),
    [
        ("library/alpine:latest", "application/vnd.oci.image.manifest.v1+json", False),
        ("multiarch/app:1.0", "application/vnd.oci.image.index.v1+json", True),
        ("dockerlist/app:1.0", "application/vnd.docker.distribution.manifest.list.v2+json", True),
        ("schema2/app:1.0", "application/vnd.docker.distribution.manifest.v2+json", False),
    ],
)
def test_pull_is_byte_identical(proxy, upstream, group, tmp_path, image, media_type, all_platforms):
    repo, _, tag = image.partition(":")
    pull(proxy, group, image, tmp_path / "pulled", all=all_platforms)

    expected = upstream.manifest(repo, tag)
    served = proxy.get(group, repo, "manifests", tag)
    assert served.status_code == 200
    assert served.content == expected.content
    assert served.headers["Content-Type"] == media_type == expected.headers["Content-Type"]
    assert served.headers["Docker-Content-Digest"] == upstream.digest_of(repo, tag)
    assert served.headers["ETag"] == f'"{served.headers["Docker-Content-Digest"]}"'
    assert int(served.headers["Content-Length"]) == len(expected.content)
    assert served.headers["Docker-Distribution-Api-Version"] == "registry/2.0"

    head = proxy.get(group, repo, "manifests", tag, method="HEAD")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Docker-Content-Digest"] == served.headers["Docker-Content-Digest"]
    assert head.headers["Content-Length"] == served.headers["Content-Length"]

    blobs = upstream_blobs(upstream, repo, tag)
    if "oci" in media_type:
        # An OCI layout stores Docker-typed images converted, so only OCI ones compare 1:1.
        assert blobs <= layout_blobs(tmp_path / "pulled")
    for digest in blobs:
        blob = proxy.get(group, repo, "blobs", digest)
        assert blob.status_code == 200
        assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
        assert blob.headers["Docker-Content-Digest"] == digest
        assert blob.headers["Accept-Ranges"] == "bytes"
        assert int(blob.headers["Content-Length"]) == len(blob.content)
    if all_platforms:
        index = json.loads(served.content)
        for platform in index["manifests"]:
            by_digest = proxy.get(group, repo, "manifests", platform["digest"])
            assert by_digest.content == upstream.manifest(repo, platform["digest"]).content


def test_second_pull_touches_no_upstream_blob(proxy, upstream, group, tmp_path):
    pull(proxy, group, "multiarch/app:1.0", tmp_path / "first", all=True)
    first = upstream.relay.blob_fetches()
    assert first and set(first.values()) == {1}
    upstream.relay.reset_counts()

    pull(proxy, group, "multiarch/app:1.0", tmp_path / "second", all=True)
    assert upstream.relay.count(method="GET", kind="blob") == 0
    assert upstream.relay.count(method="GET", kind="manifest") == 0
    # Only the tag is revalidated, with a HEAD.
    assert upstream.relay.count(method="HEAD", kind="manifest") >= 1


@pytest.mark.parametrize("failure", ["stopped", Fault.STATUS_503, Fault.STATUS_429, Fault.DOWN])
def test_cached_images_pull_while_upstream_fails(proxy, upstream, group, tmp_path, failure):
    pull(proxy, group, "library/alpine:latest", tmp_path / "warm")
    if failure == "stopped":
        upstream.registry.stop()
    else:
        upstream.relay.set_mode(failure)
        upstream.token_relay.set_mode(failure)
    pull(proxy, group, "library/alpine:latest", tmp_path / "stale")
    assert layout_blobs(tmp_path / "stale") == layout_blobs(tmp_path / "warm")
    proxy.server.wait_for_log("result=stale")


def test_uncached_image_with_upstream_down_is_a_clear_error(proxy, upstream, group):
    upstream.registry.stop()
    answer = proxy.get(group, "library/alpine", "manifests", "latest")
    assert answer.status_code in (502, 503, 504)
    error = answer.json()["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert "upstream" in error["message"]


def test_rate_limit_is_passed_on_with_retry_after(proxy, upstream, group):
    upstream.relay.set_mode(Fault.STATUS_429)
    answer = proxy.get(group, "library/alpine", "manifests", "3.20")
    assert answer.status_code == 429
    assert answer.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert answer.headers["Retry-After"] == "7"


def test_moved_tag_serves_the_new_digest(proxy, upstream, group, tmp_path):
    repo = f"moving/{group}"
    first = upstream.move_tag(repo, "stable")
    assert proxy.get(group, repo, "manifests", "stable").headers["Docker-Content-Digest"] == (
        first.digest
    )
    second = upstream.move_tag(repo, "stable")
    assert second.digest != first.digest
    answer = proxy.get(group, repo, "manifests", "stable")
    assert answer.headers["Docker-Content-Digest"] == second.digest
    assert answer.content == upstream.manifest(repo, "stable").content
    pull(proxy, group, f"{repo}:stable", tmp_path / "pulled")
    # The old manifest stays pullable by digest, from the cache.
    upstream.registry.stop()
    old = proxy.get(group, repo, "manifests", first.digest)
    assert old.status_code == 200
    assert old.headers["Docker-Content-Digest"] == first.digest


@pytest.mark.parametrize("fault", [Fault.CORRUPT_BLOBS, Fault.TRUNCATE_BLOBS, Fault.STALL_BLOBS])
def test_corrupting_upstream_caches_nothing(proxy, upstream, group, tmp_path, fault):
    image = "library/alpine:latest"
    upstream.relay.set_mode(fault)
    failed = pull(proxy, group, image, tmp_path / "bad", check=False)
    assert failed.returncode != 0
    upstream.relay.release_stalled()
    upstream.relay.set_mode(Fault.NORMAL)
    wait_for(lambda: not proxy.spool_files())
    assert proxy.cached_blobs(group) == 0
    assert proxy.stored_blob_files(group) == []
    assert proxy.spool_files() == []

    pull(proxy, group, image, tmp_path / "good")
    assert set(upstream.images[image].source.blob_digests) <= layout_blobs(tmp_path / "good")
    # A fill records its row just after its clients have the last byte.
    wait_for(lambda: proxy.cached_blobs(group) == len(upstream.images[image].source.blob_digests))
    assert len(proxy.stored_blob_files(group)) == proxy.cached_blobs(group)


def receive(answer: requests.Response) -> tuple[int, bool]:
    """How many body bytes arrived, and whether the connection was cut short."""
    received = 0
    try:
        for chunk in answer.iter_content(1 << 20):
            received += len(chunk)
    except requests.exceptions.ChunkedEncodingError:
        return received, True
    return received, False


@pytest.mark.parametrize("image", ["library/alpine:latest", "big/image:1.0"])
def test_corrupt_blob_never_reaches_the_client_whole(proxy, upstream, group, image):
    repo = image.partition(":")[0]
    layer = upstream.images[image].source.layers[0]
    upstream.relay.set_mode(Fault.CORRUPT_BLOBS)
    answer = proxy.get(group, repo, "blobs", layer.digest, stream=True)
    if answer.status_code == 502:
        # The fill failed before the first byte could go out.
        assert "do not match" in answer.json()["errors"][0]["message"]
    else:
        assert answer.status_code == 200
        assert int(answer.headers["Content-Length"]) == layer.size
        received, cut = receive(answer)
        assert cut
        assert received < layer.size
    assert proxy.cached_blobs(group) == 0


def test_concurrent_cold_pulls_fetch_each_blob_once(proxy, upstream, group, tmp_path):
    image = "big/image:1.0"
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda i: pull(proxy, group, image, tmp_path / f"p{i}", check=False), range(8))
        )
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    fetches = upstream.relay.blob_fetches()
    assert set(fetches) == set(upstream.images[image].source.blob_digests)
    assert set(fetches.values()) == {1}
    # Docker Hub counts manifest GETs against its rate limit: one, not eight (the other pulls
    # revalidate the tag with a HEAD). A GET without a token, when this process has none for
    # the image yet, only fetches the challenge.
    fetched = [r for r in upstream.relay.requests if r.kind == "manifest" and r.authorized]
    assert [r.method for r in fetched if r.method == "GET"] == ["GET"]
    big_layer = upstream.images[image].source.layers[0].digest
    for i in range(8):
        assert (tmp_path / f"p{i}" / "blobs" / "sha256" / big_layer[7:]).stat().st_size == (
            upstream.images[image].source.layers[0].size
        )


def test_client_disconnect_does_not_abort_the_fill(proxy, upstream, group):
    layer = upstream.images["big/image:1.0"].source.layers[0]
    token = proxy.token(group, "big/image")
    path = f"/v2/{group}/dependency_proxy/containers/big/image/blobs/{layer.digest}"
    with socket.create_connection(("127.0.0.1", proxy.server.port)) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        assert sock.recv(65536)
    wait_for(lambda: proxy.cached_blobs(group) == 1, timeout=60)
    upstream.relay.reset_counts()
    # A client leaving a cached blob half read does not disturb the server either.
    with socket.create_connection(("127.0.0.1", proxy.server.port)) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        assert sock.recv(65536)
    answer = proxy.get(group, "big/image", "blobs", layer.digest, stream=True)
    assert int(answer.headers["Content-Length"]) == layer.size
    digest = hashlib.sha256()
    for chunk in answer.iter_content(1 << 20):
        digest.update(chunk)
    assert "sha256:" + digest.hexdigest() == layer.digest
    assert upstream.relay.count(method="GET", kind="blob") == 0


@pytest.mark.parametrize("cached", [False, True])
def test_range_requests(proxy, upstream, group, cached):
    layer = upstream.images["library/alpine:3.20"].source.layers[-1]
    whole = (
        upstream.registry.admin_client()
        .request("GET", f"/v2/library/alpine/blobs/{layer.digest}")
        .content
    )
    if cached:
        assert proxy.get(group, "library/alpine", "blobs", layer.digest).content == whole
    answer = proxy.get(
        group, "library/alpine", "blobs", layer.digest, headers={"Range": "bytes=10-99"}
    )
    assert answer.status_code == 206
    assert answer.content == whole[10:100]
    assert answer.headers["Content-Range"] == f"bytes 10-99/{len(whole)}"
    suffix = proxy.get(
        group, "library/alpine", "blobs", layer.digest, headers={"Range": "bytes=-16"}
    )
    assert suffix.status_code == 206 and suffix.content == whole[-16:]
    beyond = proxy.get(
        group,
        "library/alpine",
        "blobs",
        layer.digest,
        headers={"Range": f"bytes={len(whole) + 10}-"},
    )
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(whole)}"
    assert beyond.json()["errors"][0]["code"]


def test_head_on_uncached_blob_downloads_nothing(proxy, upstream, group):
    layer = upstream.images["schema2/app:1.0"].source.layers[0]
    answer = proxy.get(group, "schema2/app", "blobs", layer.digest, method="HEAD")
    assert answer.status_code == 200
    assert int(answer.headers["Content-Length"]) == layer.size
    assert answer.headers["Docker-Content-Digest"] == layer.digest
    assert upstream.relay.count(method="GET", kind="blob") == 0
    assert upstream.relay.count(method="HEAD", kind="blob") == 1
    assert proxy.cached_blobs(group) == 0
    missing = proxy.get(group, "schema2/app", "blobs", "sha256:" + "0" * 64, method="HEAD")
    assert missing.status_code == 404


def test_unknown_manifest_and_blob(proxy, upstream, group):
    answer = proxy.get(group, "library/alpine", "manifests", "no-such-tag")
    assert answer.status_code == 404
    assert answer.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    answer = proxy.get(group, "library/alpine", "blobs", "sha256:" + "1" * 64)
    assert answer.status_code == 404
    assert answer.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    # The spec allows only 404 on these endpoints: a malformed reference names nothing.
    answer = proxy.get(group, "library/alpine", "blobs", "sha256:short")
    assert answer.status_code == 404
    assert answer.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    answer = proxy.get(group, "library/alpine", "manifests", "bad!tag")
    assert answer.status_code == 404
    assert answer.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_private_upstream_repository_needs_group_credentials(proxy, upstream, group, tmp_path):
    image = f"{upstream.private_prefix}secret"
    denied = proxy.get(group, image, "manifests", "1.0")
    assert denied.status_code == 404
    assert "upstream credentials" in denied.json()["errors"][0]["message"]

    username, password = upstream.private_credentials
    result = admin(
        proxy.ini, "proxy", "credentials", group, "--username", username, stdin=password + "\n"
    )
    assert result.returncode == 0, result.stderr
    pull(proxy, group, f"{image}:1.0", tmp_path / "pulled")
    assert proxy.get(group, image, "manifests", "1.0").content == (
        upstream.manifest(image, "1.0").content
    )


def test_disabled_group_and_missing_token(proxy, upstream, group):
    base = f"{proxy.url}/v2/{group}/dependency_proxy/containers/library/alpine/manifests/latest"
    challenge = requests.get(base, timeout=10)
    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"] == (
        f'Bearer realm="{proxy.url}/jwt/auth",service="dependency_proxy",'
        f'scope="repository:{group}/dependency_proxy/containers/library/alpine:pull"'
    )
    result = admin(proxy.ini, "proxy", "disable", group)
    assert result.returncode == 0, result.stderr
    denied = proxy.get(group, "library/alpine", "manifests", "latest")
    assert denied.status_code == 403
    assert denied.json()["errors"][0]["code"] == "DENIED"
    assert "disabled" in denied.json()["errors"][0]["message"]
    for method in ("PUT", "POST", "PATCH", "DELETE"):
        push = requests.request(method, base, timeout=10)
        assert push.status_code == 405
        assert push.json()["errors"][0]["code"] == "UNSUPPORTED"


def test_access_log_and_metrics(proxy, upstream, group, tmp_path):
    pull(proxy, group, "library/alpine:3.20", tmp_path / "first")
    pull(proxy, group, "library/alpine:3.20", tmp_path / "second")
    refused = f"/v2/{group}/dependency_proxy/containers/library/alpine/manifests/3.20"
    assert requests.get(f"{proxy.url}{refused}\n", timeout=10).status_code == 400
    log = proxy.server.wait_for_log(f"method=GET path={refused}\\n status=400 result=refused")
    assert f"group={group} image=library/alpine kind=manifests reference=3.20" in log
    assert "result=miss" in log and "result=hit" in log
    metrics = requests.get(f"{proxy.url}/-/metrics", timeout=10).text
    for name in (
        'depproxy_requests_total{kind="blob",result="hit"}',
        'depproxy_requests_total{kind="manifest",result="miss"}',
        'depproxy_bytes_served_total{source="cache"}',
        'depproxy_bytes_served_total{source="upstream"}',
        "depproxy_upstream_blob_fetches_total",
    ):
        assert name in metrics


def test_pull_on_postgresql(upstream, postgres_database, tmp_path):
    with running_proxy(tmp_path, postgres_database(), upstream.url) as proxy:
        group = proxy.new_group("pg")
        pull(proxy, group, "dockerlist/app:1.0", tmp_path / "pulled", all=True)
        assert proxy.cached_manifests(group) == 3
        upstream.relay.reset_counts()
        pull(proxy, group, "dockerlist/app:1.0", tmp_path / "again", all=True)
        assert upstream.relay.count(method="GET", kind="blob") == 0


def test_fresh_tags_skip_revalidation(upstream, tmp_path):
    with running_proxy(
        tmp_path,
        f"sqlite:///{tmp_path / 'fresh.sqlite'}",
        upstream.url,
        **{"depproxy.manifest.freshness_seconds": "300"},
    ) as proxy:
        group = proxy.new_group("fresh")
        first = proxy.get(group, "library/alpine", "manifests", "latest")
        assert first.status_code == 200
        upstream.relay.reset_counts()
        again = proxy.get(group, "library/alpine", "manifests", "latest")
        assert again.content == first.content
        assert upstream.relay.count(kind="manifest") == 0


def test_concurrent_requests_do_not_exhaust_a_small_pool(upstream, tmp_path, empty_database_url):
    """Each request holds at most one pooled connection at a time, so a pool smaller than the
    server's thread count only queues requests, never deadlocks them."""
    with running_proxy(
        tmp_path,
        empty_database_url,
        upstream.url,
        **{
            "sqlalchemy.pool_size": "2",
            "sqlalchemy.max_overflow": "0",
            "sqlalchemy.pool_timeout": "5",
        },
    ) as proxy:
        group = proxy.new_group("pool")
        token = proxy.token(group, "library/alpine")
        url = f"{proxy.url}/v2/{group}/dependency_proxy/containers/library/alpine/manifests/latest"

        def get(_):
            return requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

        assert get(0).status_code == 200
        with ThreadPoolExecutor(16) as pool:
            statuses = [answer.status_code for answer in pool.map(get, range(64))]
        assert statuses == [200] * 64
        assert "QueuePool limit" not in proxy.server.log()


def revalidated_at(proxy, group: str) -> datetime:
    manager, session = proxy.db.session()
    with manager:
        return session.scalar(
            select(CachedTag.revalidated_at)
            .join(Group, Group.id == CachedTag.group_id)
            .where(Group.path == group)
        )


def test_slow_upstream_serves_the_cached_tag_quickly(upstream, tmp_path, monkeypatch):
    """A revalidation past the deadline answers with the cached copy and goes on in the
    background: the tag is confirmed once upstream answers, and slowness is no failure."""
    with running_proxy(
        tmp_path,
        f"sqlite:///{tmp_path / 'slow.sqlite'}",
        upstream.url,
        **{"depproxy.upstream.revalidate_timeout": "0.5"},
    ) as proxy:
        group = proxy.new_group("slow")
        first = proxy.get(group, "library/alpine", "manifests", "latest")
        assert first.status_code == 200
        token = proxy.token(group, "library/alpine")
        before = revalidated_at(proxy, group)
        # Slower than the deadline, within the read timeout (5 s in tests).
        monkeypatch.setattr(upstream.relay, "slow_seconds", 3)
        upstream.relay.set_mode(Fault.SLOW)
        started = time.monotonic()
        again = requests.get(
            f"{proxy.url}/v2/{group}/dependency_proxy/containers/library/alpine/manifests/latest",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        elapsed = time.monotonic() - started
        assert again.status_code == 200
        assert again.content == first.content
        assert elapsed < 3, elapsed
        proxy.server.wait_for_log("result=stale")
        wait_for(lambda: revalidated_at(proxy, group) > before)
        metrics = requests.get(f"{proxy.url}/-/metrics", timeout=10).text
        closed = r'^depproxy_upstream_circuit_state\{registry="[^"]+"\} 0\.0$'
        assert re.search(closed, metrics, re.M)
        assert 'error="UpstreamTimeout"' not in metrics
