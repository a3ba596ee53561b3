"""The storage contract, run against every strategy, then each strategy's own promises."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
import threading
import types
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from depproxy_pyramid.services.cleanup import _remove_unless_locked
from depproxy_pyramid.services.fills import remove_abandoned_spool_files
from depproxy_pyramid.storage import (
    UPLOAD_PREFIX,
    BlobNotFound,
    ConfigurationError,
    Storage,
    Upload,
    storage_from_settings,
)
from depproxy_pyramid.storage.filesystem import FilesystemStorage, accel_redirect_uri
from depproxy_pyramid.storage.s3 import UPLOAD_PART_SIZE, S3Storage

if TYPE_CHECKING:
    from tests.support_s3 import MotoS3

# Provides the moto_s3 fixture.

MIB = 1024 * 1024
DATA = b"0123456789abcdefghij"
KEY = "12/blobs/sha256/" + "ab" * 32
OTHER_KEY = "blobs/sha256/" + "cd" * 32


@dataclass
class Backend:
    name: str
    storage: Storage
    break_publishing: Callable[[], None]
    """Make the next put_file or upload commit fail with OSError where it would publish the
    blob."""
    server: MotoS3 | None = None


@pytest.fixture(params=["filesystem", "s3"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Backend:
    if request.param == "filesystem":
        storage = storage_from_settings(
            {"depproxy.storage": "filesystem", "depproxy.storage.path": str(tmp_path / "store")}
        )

        def failing_replace(source: str, target: str) -> None:
            raise OSError("injected rename failure")

        def break_publishing() -> None:
            monkeypatch.setattr(os, "replace", failing_replace)

        return Backend("filesystem", storage, break_publishing)

    server: MotoS3 = request.getfixturevalue("moto_s3")
    # A spool directory of its own, so that what a test finds there is its own doing.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # A fresh prefix per test keeps tests apart in the one shared bucket.
    storage = storage_from_settings(server.settings(prefix=uuid.uuid4().hex, redirect="true"))

    def failing_put(**_: Any) -> None:
        raise OSError("injected upload failure")

    def break_publishing() -> None:
        # The client is private, but hooking it is the only way to fail a real upload mid-way.
        storage._client.meta.events.register("before-call.s3.PutObject", failing_put)
        storage._client.meta.events.register("before-call.s3.CompleteMultipartUpload", failing_put)

    return Backend("s3", storage, break_publishing, server)


def spool(storage: Storage, data: bytes) -> str:
    fd, path = tempfile.mkstemp(dir=storage.spool_dir)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return path


def read_all(storage: Storage, key: str) -> bytes:
    with storage.open(key) as file:
        return file.read()


# --- the contract ---------------------------------------------------------------------------


def test_put_file_publishes_blob_and_consumes_source(backend: Backend) -> None:
    storage = backend.storage
    source = spool(storage, DATA)
    assert storage.size(KEY) is None

    storage.put_file(KEY, source)

    assert not os.path.exists(source)
    assert storage.size(KEY) == len(DATA)
    assert read_all(storage, KEY) == DATA


def test_empty_blob(backend: Backend) -> None:
    backend.storage.put_file(KEY, spool(backend.storage, b""))

    assert backend.storage.size(KEY) == 0
    assert read_all(backend.storage, KEY) == b""


def test_open_range_is_inclusive_and_clamps_end(backend: Backend) -> None:
    storage = backend.storage
    storage.put_file(KEY, spool(storage, DATA))

    with storage.open_range(KEY, 2, 5) as part:
        assert part.read() == DATA[2:6]
    with storage.open_range(KEY, 0, 0) as part:
        assert part.read() == DATA[:1]
    last = len(DATA) - 1
    with storage.open_range(KEY, last, last) as part:
        assert part.read() == DATA[-1:]
    with storage.open_range(KEY, 15, 10_000) as part:
        assert part.read() == DATA[15:]


@pytest.mark.parametrize(
    ("start", "end"), [(-1, 3), (5, 4), (len(DATA), len(DATA) + 5), (10_000, 10_001)]
)
def test_open_range_rejects_ranges_outside_the_blob(backend: Backend, start: int, end: int) -> None:
    backend.storage.put_file(KEY, spool(backend.storage, DATA))

    with pytest.raises(ValueError, match="range"):
        backend.storage.open_range(KEY, start, end)


def test_url_for(backend: Backend) -> None:
    storage = backend.storage
    storage.put_file(KEY, spool(storage, DATA))

    url = storage.url_for(KEY, expires_in=60)

    if backend.name == "filesystem":
        assert url is None
    else:
        assert url is not None and "X-Amz-Expires=60" in url
        response = requests.get(url, timeout=10)
        assert response.status_code == 200
        assert response.content == DATA


def test_local_path(backend: Backend) -> None:
    storage = backend.storage
    storage.put_file(KEY, spool(storage, DATA))

    path = storage.local_path(KEY)

    if backend.name == "filesystem":
        assert path is not None
        with open(path, "rb") as file:
            assert file.read() == DATA
    else:
        assert path is None


def test_overwrite_replaces_content(backend: Backend) -> None:
    storage = backend.storage
    storage.put_file(KEY, spool(storage, b"first version, longer"))
    storage.put_file(KEY, spool(storage, b"second"))

    assert storage.size(KEY) == len(b"second")
    assert read_all(storage, KEY) == b"second"


def test_delete_is_idempotent(backend: Backend) -> None:
    storage = backend.storage
    storage.put_file(KEY, spool(storage, DATA))

    storage.delete(KEY)
    assert storage.size(KEY) is None
    with pytest.raises(BlobNotFound):
        storage.open(KEY)
    storage.delete(KEY)
    storage.delete("12/blobs/never-stored")


def test_objects_lists_every_blob_with_when_it_was_written(backend: Backend) -> None:
    storage = backend.storage
    assert list(storage.objects()) == []
    before = datetime.now(UTC) - timedelta(seconds=2)
    keys = {KEY, "12/manifests/sha256/" + "cd" * 32, "7/blobs/sha256/" + "ef" * 32}
    for key in keys:
        storage.put_file(key, spool(storage, DATA))
    # A spool file in flight is no blob.
    spool(storage, b"half a blob")

    listed = {item.key: item.modified for item in storage.objects()}

    assert set(listed) == keys
    after = datetime.now(UTC) + timedelta(seconds=2)
    assert all(before <= modified <= after for modified in listed.values())
    storage.delete(KEY)
    assert {item.key for item in storage.objects()} == keys - {KEY}


def test_missing_blob(backend: Backend) -> None:
    storage = backend.storage
    storage.put_file("12/blobs/present", spool(storage, DATA))

    for key in (KEY, "12/blobs", "12/blobs/present/below"):
        assert storage.size(key) is None
        with pytest.raises(BlobNotFound) as caught:
            storage.open(key)
        assert caught.value.key == key
        with pytest.raises(BlobNotFound):
            storage.open_range(key, 0, 1)


INVALID_KEYS = [
    "",
    ".",
    "..",
    "../x",
    "12/../../x",
    "a/..",
    "/abs",
    "a//b",
    "a/",
    "a/./b",
    ".tmp/x",
    "a/.hidden",
    "a\\b",
    "a b",
    "a\n",
    "12/blobs/sha256/caf\u00e9",
    "\uff11\uff12/blobs",  # fullwidth digits, which \d would accept
]


def test_accel_redirect_uri_is_the_key_under_the_location() -> None:
    assert accel_redirect_uri("/_store/", "12/blobs/sha256/ab") == "/_store/12/blobs/sha256/ab"


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_accel_redirect_uri_refuses_invalid_keys(key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        accel_redirect_uri("/_store/", key)


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_rejected(backend: Backend, key: str) -> None:
    storage = backend.storage
    uses: dict[str, Callable[[], object]] = {
        "open": lambda: storage.open(key),
        "open_range": lambda: storage.open_range(key, 0, 0),
        "size": lambda: storage.size(key),
        "delete": lambda: storage.delete(key),
        "url_for": lambda: storage.url_for(key),
        "local_path": lambda: storage.local_path(key),
    }
    accepted = []
    for name, use in uses.items():
        try:
            use()
        except ValueError as exc:
            assert "invalid storage key" in str(exc)
        else:
            accepted.append(name)
    assert accepted == []

    source = spool(storage, DATA)
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put_file(key, source)
    assert not os.path.exists(source)
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.begin_upload(key)
    assert os.listdir(storage.spool_dir) == []


def test_failed_put_publishes_nothing_and_removes_source(backend: Backend) -> None:
    storage = backend.storage
    source = spool(storage, DATA)
    backend.break_publishing()

    with pytest.raises(OSError, match="injected"):
        storage.put_file(KEY, source)

    assert not os.path.exists(source)
    assert storage.size(KEY) is None
    with pytest.raises(BlobNotFound):
        storage.open(KEY)


def test_put_of_missing_source_publishes_nothing(backend: Backend) -> None:
    storage = backend.storage

    with pytest.raises(OSError):
        storage.put_file(KEY, os.path.join(storage.spool_dir, "does-not-exist"))

    assert storage.size(KEY) is None


def test_large_blob_round_trip_in_bounded_chunks(backend: Backend) -> None:
    storage = backend.storage
    written = hashlib.sha256()
    fd, source = tempfile.mkstemp(dir=storage.spool_dir)
    with os.fdopen(fd, "wb") as file:
        for _ in range(64):
            chunk = os.urandom(MIB)
            written.update(chunk)
            file.write(chunk)
    key = "12/blobs/sha256/" + written.hexdigest()

    storage.put_file(key, source)

    assert storage.size(key) == 64 * MIB
    read = hashlib.sha256()
    total = 0
    with storage.open(key) as blob:
        while chunk := blob.read(MIB):
            assert len(chunk) <= MIB
            read.update(chunk)
            total += len(chunk)
    assert total == 64 * MIB
    assert read.hexdigest() == written.hexdigest()


def test_concurrent_puts_into_one_new_directory(backend: Backend) -> None:
    storage = backend.storage
    blobs = {f"7/blobs/sha256/{n:064x}": os.urandom(1000 + n) for n in range(16)}
    sources = {key: spool(storage, data) for key, data in blobs.items()}
    start = threading.Barrier(8)

    def put(key: str) -> None:
        start.wait()
        storage.put_file(key, sources[key])

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, blobs))

    for key, data in blobs.items():
        assert read_all(storage, key) == data


def write_in_chunks(upload: Upload, size: int, chunk_size: int = MIB) -> bytes:
    """Write `size` random bytes in `chunk_size` pieces; return them."""
    data = os.urandom(size)
    for offset in range(0, size, chunk_size):
        upload.write(data[offset : offset + chunk_size])
    return data


def pending_uploads(backend: Backend) -> list[object]:
    """What a failed or aborted upload could have left behind besides an object."""
    left = [
        os.path.join(backend.storage.spool_dir, name)
        for name in os.listdir(backend.storage.spool_dir)
    ]
    if backend.name == "s3":
        assert isinstance(backend.storage, S3Storage)
        server: MotoS3 = backend.server
        listing = server.client().list_multipart_uploads(
            Bucket=server.bucket, Prefix=backend.storage._prefix
        )
        left += listing.get("Uploads", [])
    return left


def test_upload_is_published_only_by_commit(backend: Backend) -> None:
    storage = backend.storage
    upload = storage.begin_upload(KEY)
    # Three parts and a short fourth on S3: more than a single part's path.
    data = write_in_chunks(upload, 3 * UPLOAD_PART_SIZE + 17)

    assert storage.size(KEY) is None
    upload.commit()

    assert storage.size(KEY) == len(data)
    assert hashlib.sha256(read_all(storage, KEY)).digest() == hashlib.sha256(data).digest()
    assert pending_uploads(backend) == []
    upload.abort()  # after a commit: nothing to undo
    assert storage.size(KEY) == len(data)


@pytest.mark.parametrize(
    "size", [0, 1, UPLOAD_PART_SIZE - 1, UPLOAD_PART_SIZE, 2 * UPLOAD_PART_SIZE]
)
def test_upload_sizes_around_a_part(backend: Backend, size: int) -> None:
    upload = backend.storage.begin_upload(KEY)
    data = write_in_chunks(upload, size, chunk_size=3 * MIB)
    upload.commit()

    assert read_all(backend.storage, KEY) == data
    assert pending_uploads(backend) == []


def test_aborted_upload_leaves_nothing(backend: Backend) -> None:
    storage = backend.storage
    upload = storage.begin_upload(KEY)
    write_in_chunks(upload, 2 * UPLOAD_PART_SIZE + 5)
    assert pending_uploads(backend) != []  # under way: a file, or parts sent

    upload.abort()
    upload.abort()

    assert storage.size(KEY) is None
    assert pending_uploads(backend) == []
    with pytest.raises(ValueError, match="aborted"):
        upload.write(b"more")
    with pytest.raises(ValueError, match="aborted"):
        upload.commit()
    assert storage.size(KEY) is None


def test_an_upload_does_not_disturb_what_the_key_holds(backend: Backend) -> None:
    storage = backend.storage
    storage.put_file(KEY, spool(storage, DATA))
    upload = storage.begin_upload(KEY)
    write_in_chunks(upload, UPLOAD_PART_SIZE + 1)

    assert read_all(storage, KEY) == DATA
    upload.abort()
    assert read_all(storage, KEY) == DATA


def test_failed_upload_commit_publishes_nothing(backend: Backend) -> None:
    storage = backend.storage
    upload = storage.begin_upload(KEY)
    write_in_chunks(upload, 2 * UPLOAD_PART_SIZE + 5)
    backend.break_publishing()

    with pytest.raises(OSError, match="injected"):
        upload.commit()

    assert storage.size(KEY) is None
    assert pending_uploads(backend) == []
    upload.abort()


def test_spool_dir_is_a_writable_directory(backend: Backend) -> None:
    spool_dir = backend.storage.spool_dir

    assert os.path.isdir(spool_dir)
    assert os.access(spool_dir, os.W_OK)


# --- filesystem ------------------------------------------------------------------------------


@pytest.fixture
def fs_storage(tmp_path: Path) -> FilesystemStorage:
    return FilesystemStorage(str(tmp_path / "store"))


def test_fs_put_is_a_rename_within_the_root(fs_storage: FilesystemStorage) -> None:
    source = spool(fs_storage, DATA)
    inode = os.stat(source).st_ino

    fs_storage.put_file(KEY, source)

    path = os.path.join(fs_storage.root, KEY)
    assert fs_storage.local_path(KEY) == path
    assert os.stat(path).st_ino == inode
    assert os.stat(fs_storage.spool_dir).st_dev == os.stat(fs_storage.root).st_dev


def test_fs_permissions(fs_storage: FilesystemStorage) -> None:
    fs_storage.put_file(KEY, spool(fs_storage, DATA))

    assert stat.S_IMODE(os.stat(os.path.join(fs_storage.root, KEY)).st_mode) == 0o640
    # Every directory the put created, not just the innermost.
    for directory in ("12", "12/blobs", "12/blobs/sha256"):
        mode = stat.S_IMODE(os.stat(os.path.join(fs_storage.root, directory)).st_mode)
        assert mode & ~0o750 == 0, (directory, oct(mode))
        assert mode & 0o700 == 0o700, (directory, oct(mode))


def test_fs_put_syncs_file_before_directory(
    fs_storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append("sync " + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def recording_replace(source: str, target: str) -> None:
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    source = os.path.realpath(spool(fs_storage, DATA))

    fs_storage.put_file(KEY, source)

    target_dir = os.path.realpath(os.path.dirname(os.path.join(fs_storage.root, KEY)))
    assert events.index(f"sync {source}") < events.index("rename")
    assert events[-1] == f"sync {target_dir}"


def test_fs_failed_directory_sync_unpublishes(
    fs_storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs_storage.put_file("12/blobs/sha256/" + "cd" * 32, spool(fs_storage, DATA))
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError("injected directory sync failure")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    source = spool(fs_storage, DATA)

    with pytest.raises(OSError, match="injected"):
        fs_storage.put_file(KEY, source)

    assert not os.path.exists(source)
    assert fs_storage.size(KEY) is None


def test_fs_upload_is_a_locked_spool_file_readers_can_follow(
    fs_storage: FilesystemStorage,
) -> None:
    upload = fs_storage.begin_upload(KEY)
    assert upload.local_path is not None
    assert os.path.dirname(upload.local_path) == fs_storage.spool_dir
    assert os.path.basename(upload.local_path).startswith(UPLOAD_PREFIX)
    upload.write(DATA[:5])
    with open(upload.local_path, "rb") as follower:
        assert follower.read() == DATA[:5]
        upload.write(DATA[5:])
        assert follower.read() == DATA[5:]

        # A starting process and `depproxy-admin cleanup` leave a running upload's file alone.
        assert remove_abandoned_spool_files(fs_storage.spool_dir) == 0
        assert _remove_unless_locked(upload.local_path) is False
        upload.commit()

    assert os.listdir(fs_storage.spool_dir) == []
    assert read_all(fs_storage, KEY) == DATA
    assert stat.S_IMODE(os.stat(os.path.join(fs_storage.root, KEY)).st_mode) == 0o640


def test_fs_open_returns_a_seekable_file(fs_storage: FilesystemStorage) -> None:
    fs_storage.put_file(KEY, spool(fs_storage, DATA))

    with fs_storage.open(KEY) as file:
        assert file.seekable()
        file.seek(10)
        assert file.read(3) == DATA[10:13]


def test_fs_objects_are_dated_by_mtime_and_skip_foreign_files(
    fs_storage: FilesystemStorage,
) -> None:
    fs_storage.put_file(KEY, spool(fs_storage, DATA))
    path = Path(fs_storage.root, KEY)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    Path(fs_storage.root, "12", "not a key").write_bytes(b"x")
    (Path(fs_storage.root) / ".editor").mkdir()
    (Path(fs_storage.root) / ".editor" / "swap").write_bytes(b"x")

    [listed] = fs_storage.objects()

    assert listed.key == KEY
    assert listed.modified == datetime.fromtimestamp(1_700_000_000, UTC)


def test_fs_creates_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "store"

    storage = storage_from_settings({"depproxy.storage.path": str(root)})

    assert isinstance(storage, FilesystemStorage)
    assert root.is_dir()
    assert os.path.isdir(storage.spool_dir)


def test_fs_location_is_the_resolved_root(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "store")

    storage = storage_from_settings({"depproxy.storage.path": str(tmp_path / "store")})
    through_link = storage_from_settings({"depproxy.storage.path": str(tmp_path / "link")})
    other = storage_from_settings({"depproxy.storage.path": str(tmp_path / "other")})

    assert storage.location == f"file://{(tmp_path / 'store').resolve()}"
    assert through_link.location == storage.location
    assert other.location != storage.location


# --- S3 --------------------------------------------------------------------------------------


@pytest.fixture
def s3_prefix() -> str:
    return uuid.uuid4().hex


def test_s3_objects_live_under_the_prefix(moto_s3: MotoS3, s3_prefix: str) -> None:
    storage = storage_from_settings(moto_s3.settings(prefix=f"/{s3_prefix}/"))

    storage.put_file(KEY, spool(storage, DATA))

    listed = moto_s3.client().list_objects_v2(Bucket=moto_s3.bucket, Prefix=s3_prefix)
    assert [item["Key"] for item in listed["Contents"]] == [f"{s3_prefix}/{KEY}"]


def test_s3_objects_are_those_under_the_prefix(moto_s3: MotoS3, s3_prefix: str) -> None:
    storage = storage_from_settings(moto_s3.settings(prefix=s3_prefix))
    neighbour = storage_from_settings(moto_s3.settings(prefix=s3_prefix + "-other"))
    storage.put_file(KEY, spool(storage, DATA))
    neighbour.put_file(KEY, spool(neighbour, DATA))
    moto_s3.client().put_object(Bucket=moto_s3.bucket, Key=f"{s3_prefix}/not a key", Body=b"x")

    assert [item.key for item in storage.objects()] == [KEY]


def test_s3_location_is_endpoint_bucket_and_prefix(moto_s3: MotoS3, s3_prefix: str) -> None:
    storage = storage_from_settings(moto_s3.settings(prefix=s3_prefix))
    # Credentials written into the endpoint's URL stay out of messages.
    port = moto_s3.endpoint_url.rsplit(":", 1)[1]
    with_userinfo = storage_from_settings(
        moto_s3.settings(prefix=s3_prefix, endpoint_url=f"http://user:pw@127.0.0.1:{port}")
    )
    other_prefix = storage_from_settings(moto_s3.settings(prefix=s3_prefix + "-other"))

    assert storage.location == f"s3://{moto_s3.bucket}/{s3_prefix} at {moto_s3.endpoint_url}"
    assert with_userinfo.location == storage.location
    assert other_prefix.location != storage.location


def test_s3_large_upload_is_multipart(moto_s3: MotoS3, s3_prefix: str) -> None:
    storage = storage_from_settings(moto_s3.settings(prefix=s3_prefix))

    storage.put_file(KEY, spool(storage, os.urandom(17 * MIB)))

    head = moto_s3.client().head_object(Bucket=moto_s3.bucket, Key=f"{s3_prefix}/{KEY}")
    assert head["ETag"].strip('"').endswith("-3")


def test_s3_failed_multipart_upload_is_aborted(
    moto_s3: MotoS3,
    s3_prefix: str,
) -> None:
    storage = storage_from_settings(moto_s3.settings(prefix=s3_prefix))

    def fail_second_part(params: Mapping[str, Any], **_: Any) -> None:
        if params["PartNumber"] == 2:
            raise OSError("injected part failure")

    storage._client.meta.events.register("before-parameter-build.s3.UploadPart", fail_second_part)
    source = spool(storage, os.urandom(20 * MIB))

    with pytest.raises(OSError, match="injected"):
        storage.put_file(KEY, source)

    assert not os.path.exists(source)
    assert storage.size(KEY) is None
    pending = moto_s3.client().list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=s3_prefix)
    assert pending.get("Uploads", []) == []


def test_s3_upload_sends_parts_as_they_fill_and_keeps_no_file(
    moto_s3: MotoS3, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    storage = storage_from_settings(moto_s3.settings(prefix=s3_prefix))
    sent: list[int] = []
    storage._client.meta.events.register(
        "before-parameter-build.s3.UploadPart",
        lambda params, **_: sent.append(len(params["Body"])),
    )
    upload = storage.begin_upload(KEY)
    assert upload.local_path is None

    data = write_in_chunks(upload, 2 * UPLOAD_PART_SIZE + MIB)

    assert sent == [UPLOAD_PART_SIZE, UPLOAD_PART_SIZE]
    assert os.listdir(storage.spool_dir) == []
    upload.commit()
    assert sent == [UPLOAD_PART_SIZE, UPLOAD_PART_SIZE, MIB]
    head = moto_s3.client().head_object(Bucket=moto_s3.bucket, Key=f"{s3_prefix}/{KEY}")
    assert head["ETag"].strip('"').endswith("-3")
    assert read_all(storage, KEY) == data


def test_s3_upload_aborts_what_a_dead_fill_left_pending_under_its_key(
    moto_s3: MotoS3, s3_prefix: str
) -> None:
    storage = storage_from_settings(moto_s3.settings(prefix=s3_prefix))
    client = moto_s3.client()
    # A fill killed after its first part, and another key's upload still running.
    dead = storage.begin_upload(KEY)
    write_in_chunks(dead, UPLOAD_PART_SIZE)
    other = storage.begin_upload(OTHER_KEY)
    write_in_chunks(other, UPLOAD_PART_SIZE)

    taken_over = storage.begin_upload(KEY)
    data = write_in_chunks(taken_over, UPLOAD_PART_SIZE + MIB)
    taken_over.commit()

    pending = client.list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=s3_prefix)
    assert [upload["Key"] for upload in pending.get("Uploads", [])] == [f"{s3_prefix}/{OTHER_KEY}"]
    assert read_all(storage, KEY) == data
    other.abort()


def test_s3_upload_whose_part_fails_is_aborted(moto_s3: MotoS3, s3_prefix: str) -> None:
    storage = storage_from_settings(moto_s3.settings(prefix=s3_prefix))

    def fail_second_part(params: Mapping[str, Any], **_: Any) -> None:
        if params["PartNumber"] == 2:
            raise OSError("injected part failure")

    storage._client.meta.events.register("before-parameter-build.s3.UploadPart", fail_second_part)
    upload = storage.begin_upload(KEY)

    with pytest.raises(OSError, match="injected"):
        write_in_chunks(upload, 3 * UPLOAD_PART_SIZE)

    assert storage.size(KEY) is None
    pending = moto_s3.client().list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=s3_prefix)
    assert pending.get("Uploads", []) == []
    upload.abort()


def test_s3_upload_whose_abort_fails_too_reports_the_first_failure_and_aborts_later(
    moto_s3: MotoS3, s3_prefix: str
) -> None:
    storage = storage_from_settings(moto_s3.settings(prefix=s3_prefix))
    aborts: list[str] = []

    def fail_second_part(params: Mapping[str, Any], **_: Any) -> None:
        if params["PartNumber"] == 2:
            raise OSError("injected part failure")

    def fail_first_abort(**_: Any) -> None:
        aborts.append("tried")
        if len(aborts) == 1:
            raise OSError("injected abort failure")

    storage._client.meta.events.register("before-parameter-build.s3.UploadPart", fail_second_part)
    storage._client.meta.events.register("before-call.s3.AbortMultipartUpload", fail_first_abort)
    upload = storage.begin_upload(KEY)

    with pytest.raises(OSError, match="injected part failure"):
        write_in_chunks(upload, 3 * UPLOAD_PART_SIZE)
    client = moto_s3.client()
    assert client.list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=s3_prefix).get("Uploads")

    upload.abort()

    assert aborts == ["tried", "tried"]
    pending = client.list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=s3_prefix)
    assert pending.get("Uploads", []) == []
    assert storage.size(KEY) is None


def test_s3_url_for_without_redirect_is_none(moto_s3: MotoS3, s3_prefix: str) -> None:
    storage = storage_from_settings(moto_s3.settings(prefix=s3_prefix))
    storage.put_file(KEY, spool(storage, DATA))

    assert storage.url_for(KEY) is None


@pytest.mark.parametrize("expires_in", [0, -1, 7 * 24 * 3600 + 1])
def test_s3_url_for_rejects_impossible_lifetimes(
    moto_s3: MotoS3,
    expires_in: int,
) -> None:
    storage = storage_from_settings(moto_s3.settings(redirect="yes"))

    with pytest.raises(ValueError, match="expires_in"):
        storage.url_for(KEY, expires_in=expires_in)


def test_s3_spool_dir_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "depproxy-spool").mkdir(mode=0o777)

    storage = storage_from_settings({"depproxy.storage": "s3", "depproxy.storage.s3.bucket": "b"})

    assert storage.spool_dir == str(tmp_path / "depproxy-spool")
    assert stat.S_IMODE(os.stat(storage.spool_dir).st_mode) == 0o700


def test_s3_spool_dir_refuses_a_planted_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "depproxy-spool").symlink_to(tmp_path / "elsewhere")

    with pytest.raises(PermissionError, match="depproxy-spool"):
        storage_from_settings({"depproxy.storage": "s3", "depproxy.storage.s3.bucket": "b"})


# --- storage_from_settings -------------------------------------------------------------------


class PluginStorage(FilesystemStorage):
    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> PluginStorage:
        return cls(settings["plugin.root"])


class StorageWithoutUploads(PluginStorage):
    """A strategy written before `begin_upload` was part of the interface."""

    begin_upload = None  # what a protocol check reads as a method not provided


class NotAStorage:
    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> NotAStorage:
        return cls()


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("depproxy_test_plugin")
    module.PluginStorage = PluginStorage
    module.NotAStorage = NotAStorage
    module.StorageWithoutUploads = StorageWithoutUploads
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


@pytest.mark.parametrize(
    ("name", "expected"),
    [("filesystem", FilesystemStorage), ("", FilesystemStorage), (" s3 ", S3Storage)],
)
def test_aliases(tmp_path: Path, name: str, expected: type) -> None:
    storage = storage_from_settings(
        {
            "depproxy.storage": name,
            "depproxy.storage.path": str(tmp_path),
            "depproxy.storage.s3.bucket": "bucket",
        }
    )

    assert type(storage) is expected


@pytest.mark.parametrize("separator", [":", "."])
def test_dotted_name(plugin_module: str, tmp_path: Path, separator: str) -> None:
    storage = storage_from_settings(
        {
            "depproxy.storage": f"{plugin_module}{separator}PluginStorage",
            "plugin.root": str(tmp_path / "plugin"),
        }
    )

    assert type(storage) is PluginStorage
    assert storage.root == str(tmp_path / "plugin")


@pytest.mark.parametrize(
    "name",
    [
        "nosuch",
        "s4",
        "no_such_module:Storage",
        "no_such_module.Storage",
        "depproxy_pyramid.storage.filesystem:Missing",
        "depproxy_pyramid.storage.filesystem:",
        ":FilesystemStorage",
        "builtins:dict",
        "depproxy_test_plugin:NotAStorage",
    ],
)
def test_unusable_storage_name(plugin_module: str, name: str) -> None:
    with pytest.raises(ConfigurationError, match="depproxy.storage'") as caught:
        storage_from_settings({"depproxy.storage": name})

    assert caught.value.key == "depproxy.storage"


def test_a_strategy_without_uploads_is_refused(plugin_module: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="did not return a Storage") as caught:
        storage_from_settings(
            {
                "depproxy.storage": f"{plugin_module}:StorageWithoutUploads",
                "plugin.root": str(tmp_path),
            }
        )

    assert caught.value.key == "depproxy.storage"


def assert_rejects(settings: Mapping[str, str], key: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        storage_from_settings(settings)
    assert caught.value.key == key
    assert key in str(caught.value)


def test_fs_settings_errors(tmp_path: Path) -> None:
    occupied = tmp_path / "file"
    occupied.write_bytes(b"")

    assert_rejects({"depproxy.storage": "filesystem"}, "depproxy.storage.path")
    assert_rejects({"depproxy.storage.path": "  "}, "depproxy.storage.path")
    assert_rejects({"depproxy.storage.path": str(occupied)}, "depproxy.storage.path")
    assert_rejects({"depproxy.storage.path": str(occupied / "below")}, "depproxy.storage.path")


@pytest.mark.parametrize(
    ("s3_settings", "key"),
    [
        ({}, "bucket"),
        ({"bucket": " "}, "bucket"),
        ({"bucket": "my bucket"}, "bucket"),
        ({"bucket": "b", "prefix": "a/../b"}, "prefix"),
        ({"bucket": "b", "endpoint_url": "localhost:9000"}, "endpoint_url"),
        ({"bucket": "b", "endpoint_url": "ftp://host"}, "endpoint_url"),
        ({"bucket": "b", "access_key_id": "id"}, "secret_access_key"),
        ({"bucket": "b", "secret_access_key": "secret"}, "access_key_id"),
        ({"bucket": "b", "redirect": "maybe"}, "redirect"),
    ],
)
def test_s3_settings_errors(s3_settings: dict[str, str], key: str) -> None:
    settings = {"depproxy.storage": "s3"} | {
        f"depproxy.storage.s3.{name}": value for name, value in s3_settings.items()
    }

    assert_rejects(settings, f"depproxy.storage.s3.{key}")
