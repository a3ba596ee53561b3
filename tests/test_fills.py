"""Single-flight fills at unit level: upstream mocked with `responses`, spool and threads real."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import responses

from depproxy_pyramid.services.fills import BlobFills, FillError
from depproxy_pyramid.upstream import UpstreamClient, UpstreamNotFound

UPSTREAM = "https://registry.test"
BODY = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()


def blob_url(digest: str = DIGEST) -> str:
    return f"{UPSTREAM}/v2/library/app/blobs/{digest}"


class Committed:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str, bytes]] = []
        self.event = threading.Event()

    def __call__(self, group_id: int, fill) -> None:
        with open(fill.spool_path, "rb") as spool:
            self.calls.append((group_id, fill.digest, spool.read()))
        os.unlink(fill.spool_path)
        self.event.set()


@pytest.fixture
def committed() -> Committed:
    return Committed()


@pytest.fixture
def fills(tmp_path, committed) -> BlobFills:
    return BlobFills(str(tmp_path), committed)


def opener(digest: str = DIGEST):
    client = UpstreamClient(UPSTREAM)
    return lambda: client.open_blob("library/app", digest)


def upstream_held_until_released() -> threading.Event:
    """The upstream answers the blob only once the returned event is set."""
    gate = threading.Event()

    def held(request):
        gate.wait(5)
        return 200, {"Content-Length": str(len(BODY))}, BODY

    responses.add_callback(responses.GET, blob_url(), callback=held)
    return gate


def start(fills: BlobFills, digest: str = DIGEST):
    fill = fills.join_or_start(1, digest, lambda: False, opener(digest))
    fill.wait_started()
    return fill


@responses.activate
def test_readers_get_the_verified_blob_and_it_is_committed_once(fills, committed, tmp_path):
    responses.get(blob_url(), body=BODY, auto_calculate_content_length=True)
    fill = start(fills)
    again = fills.join_or_start(1, DIGEST, lambda: False, opener())
    assert again is fill or again is None
    assert b"".join(fill.read()) == BODY
    assert b"".join(fill.read(10, 20)) == BODY[10:20]
    assert committed.event.wait(5)
    assert committed.calls == [(1, DIGEST, BODY)]
    assert len(responses.calls) == 1
    assert os.listdir(tmp_path) == []


@responses.activate
def test_unknown_length_is_verified_before_the_last_byte(fills, committed):
    responses.get(blob_url(), body=BODY)  # no Content-Length: size unknown until the end
    fill = start(fills)
    assert b"".join(fill.read()) == BODY
    assert committed.event.wait(5)


@pytest.mark.parametrize(
    "body",
    [BODY[:-1] + bytes([BODY[-1] ^ 1]), BODY + b"extra", b""],
    ids=["last-byte-flipped", "longer", "empty"],
)
@responses.activate
def test_wrong_bytes_never_reach_a_reader_whole(fills, committed, tmp_path, body):
    responses.get(blob_url(), body=body)
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    received = bytearray()
    with pytest.raises(FillError):
        fill.wait_started()
        for chunk in fill.read():
            received += chunk
    assert len(received) < max(len(body), 1)
    assert committed.calls == []
    assert os.listdir(tmp_path) == []


@responses.activate
def test_truncated_body_fails(fills, committed):
    responses.get(
        blob_url(), body=BODY[: len(BODY) // 2],
        headers={"Content-Length": str(len(BODY))}, auto_calculate_content_length=False,
    )
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    with pytest.raises(FillError):
        fill.wait_started()
        for _ in fill.read():
            pass
    assert committed.calls == []


@responses.activate
def test_upstream_error_is_raised_to_every_waiter(fills, committed):
    responses.get(blob_url(), status=404)
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    with pytest.raises(UpstreamNotFound):
        fill.wait_started()
    with pytest.raises(UpstreamNotFound):
        fill.wait_started()
    assert committed.calls == []


@responses.activate
def test_empty_blob(fills, committed):
    digest = "sha256:" + hashlib.sha256(b"").hexdigest()
    responses.get(blob_url(digest), body=b"", auto_calculate_content_length=True)
    fill = start(fills, digest)
    assert b"".join(fill.read()) == b""
    assert committed.event.wait(5)


def test_a_cached_blob_starts_no_fill(fills):
    assert fills.join_or_start(1, DIGEST, lambda: True, opener()) is None
    assert fills.in_flight() == 0


@responses.activate
def test_concurrent_joiners_share_one_transfer(fills, committed):
    gate = upstream_held_until_released()
    results: list[bytes] = []
    lock = threading.Lock()

    def pull() -> None:
        fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
        if fill is None:
            return
        fill.wait_started()
        data = b"".join(fill.read())
        with lock:
            results.append(data)

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join(10)
    assert results == [BODY] * 8
    assert len(responses.calls) == 1
    assert committed.event.wait(5)
    assert len(committed.calls) == 1


@responses.activate
def test_spool_files_of_dead_fills_are_removed_at_start(tmp_path, committed):
    gate = upstream_held_until_released()
    abandoned = tmp_path / "fill-abandoned"
    abandoned.write_bytes(b"half a layer")
    fills = BlobFills(str(tmp_path), committed)
    assert not abandoned.exists()
    fill = fills.join_or_start(1, DIGEST, lambda: False, opener())
    # A second process starting now must not take the spool file of a fill in progress.
    BlobFills(str(tmp_path), committed)
    assert os.path.exists(fill.spool_path)
    gate.set()
    fill.wait_started()
    assert b"".join(fill.read()) == BODY
