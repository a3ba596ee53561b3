"""`migrate-storage`: a real pulled cache moved from the filesystem to S3 (moto over HTTP) and
back, each way killed part-way and resumed, then served by a proxy on the new storage without
upstream; what it refuses to copy, and what it refuses to start."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from depproxy_pyramid.models import CachedBlob, CachedManifest, CacheStatus, Group, Visibility
from depproxy_pyramid.services import storage_migration
from depproxy_pyramid.services.proxy import storage_key
from depproxy_pyramid.services.storage_migration import CHUNK, StorageMigration
from depproxy_pyramid.storage import Storage, storage_from_settings
from tests.conftest import Database, app_settings, migrate
from tests.proxy import PULLER, Proxy, start_proxy
from tests.server import BIN, ROOT, ServerProcess, free_port, write_ini
from tests.support.registry import skopeo_pull

IMAGES = ("multiarch/app:1.0", "library/alpine:latest")


def run_admin(ini: Path, *args: str, tmpdir: Path) -> subprocess.CompletedProcess:
    """`depproxy-admin INI ...` with a temporary directory of its own (S3's spool is in it)."""
    tmpdir.mkdir(exist_ok=True)
    return subprocess.run(
        [str(BIN / "depproxy-admin"), str(ini), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir)},
    )


def live_objects(database) -> dict[str, tuple[str, int]]:
    """Every key a live row refers to, with its digest and size."""
    manager, session = database.session()
    with manager:
        return {
            key: (digest, size)
            for model in (CachedManifest, CachedBlob)
            for key, digest, size in session.execute(
                select(model.storage_key, model.digest, model.size).where(
                    model.status != CacheStatus.PENDING_DESTRUCTION
                )
            )
        }


def stored_digests(storage: Storage) -> dict[str, str]:
    """Every object in `storage`, by key, with the sha256 digest of what it holds."""
    digests = {}
    for item in storage.objects():
        with storage.open(item.key) as stream:
            hasher = hashlib.sha256()
            while chunk := stream.read(CHUNK):
                hasher.update(chunk)
        digests[item.key] = "sha256:" + hasher.hexdigest()
    return digests


def pull_without_upstream(proxy: Proxy, group: str, upstream, tmp_path: Path) -> None:
    tmp_path.mkdir()
    upstream.relay.reset_counts()
    for number, image in enumerate(IMAGES):
        skopeo_pull(proxy.ref(group, image), tmp_path / f"pull-{number}", creds=PULLER, all=True)
    assert upstream.relay.count(kind="manifest") == 0
    assert upstream.relay.count(kind="blob") == 0


def test_a_pulled_cache_moves_to_s3_and_back_through_kills(upstream, moto_s3, tmp_path):
    database_url = f"sqlite:///{tmp_path / 'proxy.sqlite'}"
    # Tags fresh for an hour: the pulls on the new storage then need upstream for nothing.
    fresh = {"depproxy.manifest.freshness_seconds": "3600"}
    proxy = start_proxy(tmp_path / "first", database_url, upstream.url, **fresh)
    try:
        group = proxy.new_group("moving")
        for number, image in enumerate(IMAGES):
            skopeo_pull(
                proxy.ref(group, image), tmp_path / f"fill-{number}", creds=PULLER, all=True
            )
    finally:
        proxy.server.stop()
    expected = live_objects(proxy.db)
    assert len(expected) >= 8

    base = {
        key: value
        for key, value in app_settings(
            database_url,
            tmp_path / "unused",
            **{"depproxy.upstream.url": upstream.url, "depproxy.external_url": "", **fresh},
        ).items()
        if not key.startswith("depproxy.storage")
    }
    first = base | {"depproxy.storage": "filesystem", "depproxy.storage.path": str(proxy.storage)}
    on_s3 = base | moto_s3.settings(prefix=f"moved-{uuid.uuid4().hex}")
    back = base | {
        "depproxy.storage": "filesystem",
        "depproxy.storage.path": str(tmp_path / "back"),
    }

    for source, destination, name in ((first, on_s3, "s3"), (on_s3, back, "back")):
        source_ini = write_ini(tmp_path / f"from-{name}.ini", source, free_port())
        destination_port = free_port()
        destination_ini = write_ini(tmp_path / f"{name}.ini", destination, destination_port)
        killing_ini = write_ini(
            tmp_path / f"killing-{name}.ini",
            source
            | {
                "depproxy.storage": "tests.support.killing_storage:KillingStorage",
                "depproxy.test.inner_storage": source["depproxy.storage"],
                "depproxy.test.kill_on_open": "4",
            },
            free_port(),
        )
        tmpdir = tmp_path / f"tmp-{name}"
        destination_storage = storage_from_settings(destination)
        # The command's spool: S3's is in its temporary directory, the filesystem's in the root.
        spool = (
            tmpdir / "depproxy-spool"
            if destination["depproxy.storage"] == "s3"
            else tmp_path / name / ".tmp"
        )

        killed = run_admin(
            killing_ini, "migrate-storage", "--to", str(destination_ini), tmpdir=tmpdir
        )

        assert killed.returncode == -signal.SIGKILL, killed.stderr
        # Three objects were published; the fourth was being written to a spool file when the
        # process died, and is not under its key.
        published = stored_digests(destination_storage)
        assert len(published) == 3
        assert all(expected[key][0] == digest for key, digest in published.items())
        assert len(list(spool.glob("migrate-*"))) == 1

        resumed = run_admin(
            source_ini, "migrate-storage", "--to", str(destination_ini), tmpdir=tmpdir
        )

        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stderr == ""
        assert resumed.stdout.splitlines()[-1] == (
            f"migrate-storage done: {len(expected)}/{len(expected)} object(s), "
            f"{_mib(expected)}/{_mib(expected)}: {len(expected) - 3} copied "
            f"({_mib(expected, without=published)}), 3 already there, 0 not copied"
        )
        assert stored_digests(destination_storage) == {
            key: digest for key, (digest, _) in expected.items()
        }

        with ServerProcess(destination_ini, destination_port, tmp_path / f"{name}.log") as server:
            moved = Proxy(server, destination_ini, proxy.db, tmp_path / "unused")
            pull_without_upstream(moved, group, upstream, tmp_path / f"pulled-{name}")


def _mib(objects: dict[str, tuple[str, int]], without: dict[str, str] | None = None) -> str:
    size = sum(size for key, (_, size) in objects.items() if key not in (without or {}))
    return f"{size / (1024 * 1024):.1f} MiB"


# --- What is copied, and what is not ---------------------------------------------------------


@pytest.fixture
def database(empty_database_url) -> Iterator[Database]:
    """A database of the test's own: a run copies what every row of it refers to."""
    migrate(empty_database_url)
    db = Database(empty_database_url)
    yield db
    db.engine.dispose()


def filesystem_storage(path: Path) -> Storage:
    return storage_from_settings(
        {"depproxy.storage": "filesystem", "depproxy.storage.path": str(path)}
    )


@pytest.fixture(params=["filesystem-to-s3", "s3-to-filesystem"])
def stores(request, tmp_path) -> tuple[Storage, Storage]:
    on_s3 = storage_from_settings(
        request.getfixturevalue("moto_s3").settings(prefix=uuid.uuid4().hex)
    )
    on_disk = filesystem_storage(tmp_path / "store")
    return (on_disk, on_s3) if request.param == "filesystem-to-s3" else (on_s3, on_disk)


def new_group(database: Database) -> int:
    path = f"migrating-{uuid.uuid4().hex[:8]}"
    manager, session = database.session()
    with manager:
        group = Group(path=path, name=path, visibility=Visibility.PRIVATE)
        session.add(group)
        session.flush()
        return group.id


def put(storage: Storage, key: str, data: bytes) -> None:
    fd, path = tempfile.mkstemp(dir=storage.spool_dir)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    storage.put_file(key, path)


def cached(
    database: Database,
    storage: Storage,
    model: type[CachedBlob] | type[CachedManifest],
    group_id: int,
    data: bytes,
    *,
    stored: bytes | None = None,
    algorithm: str = "sha256",
    status: CacheStatus = CacheStatus.DEFAULT,
    image: str = "app",
) -> str:
    """A row for `data`, with `stored` (when given) put under its key; the key."""
    digest = f"{algorithm}:" + hashlib.new(algorithm, data).hexdigest()
    kind = "manifests" if model is CachedManifest else "blobs"
    key = storage_key(kind, digest)
    if stored is not None:
        put(storage, key, stored)
    values = {
        "group_id": group_id,
        "digest": digest,
        "size": len(data),
        "content_type": "application/octet-stream",
        "storage_key": key,
        "status": status,
    }
    if model is CachedManifest:
        values["image"] = image
    manager, session = database.session()
    with manager:
        session.add(model(**values))
    return key


class ReadSizes:
    """A storage that records the largest read its streams were asked for."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.largest = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def open(self, key: str) -> _RecordedStream:
        return _RecordedStream(self.inner.open(key), self)


class _RecordedStream:
    def __init__(self, stream, sizes: ReadSizes) -> None:
        self.stream = stream
        self.sizes = sizes

    def read(self, size: int = -1) -> bytes:
        assert size > 0, "an unbounded read"
        self.sizes.largest = max(self.sizes.largest, size)
        return self.stream.read(size)

    def __enter__(self) -> _RecordedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()


def test_only_objects_that_match_their_rows_are_copied_in_bounded_reads(database, stores):
    source, destination = stores
    group_id = new_group(database)
    layer = os.urandom(3 * CHUNK + 5)
    copied = {
        cached(database, source, CachedBlob, group_id, layer, stored=layer): layer,
        cached(
            database, source, CachedBlob, group_id, b"sha512", stored=b"sha512",
            algorithm="sha512",
        ): b"sha512",
        # Two images' rows of one manifest share its object; one of them is purged.
        cached(database, source, CachedManifest, group_id, b"{}", stored=b"{}", image="a"): b"{}",
    }  # fmt: skip
    cached(
        database, source, CachedManifest, group_id, b"{}", image="b",
        status=CacheStatus.PENDING_DESTRUCTION,
    )  # fmt: skip
    purged = cached(
        database, source, CachedBlob, group_id, b"purged", stored=b"purged",
        status=CacheStatus.PENDING_DESTRUCTION,
    )  # fmt: skip
    flipped = cached(database, source, CachedBlob, group_id, b"original", stored=b"0riginal")
    short = cached(database, source, CachedBlob, group_id, b"complete", stored=b"compl")
    long = cached(database, source, CachedBlob, group_id, b"exact", stored=b"exact and more")
    missing = cached(database, source, CachedBlob, group_id, b"never stored")
    reads = ReadSizes(source)
    failed: list[str] = []

    counts = StorageMigration(
        database.session_factory, reads, destination, failed=failed.append
    ).run()

    assert sorted(failed) == sorted(
        [
            f"{flipped}: the source's object does not match its sha256 digest; not copied",
            f"{short}: the source's object has 5 bytes where its row records 8; not copied",
            f"{long}: the source's object has more than the 5 bytes its row records; not copied",
            f"{missing}: missing from the source; not copied",
        ]
    )
    assert counts.failures == failed
    assert (counts.objects, counts.copied_objects, counts.present_objects) == (7, 3, 0)
    assert {item.key for item in destination.objects()} == set(copied)
    for key, data in copied.items():
        with destination.open(key) as stream:
            assert stream.read() == data
    assert destination.size(purged) is None
    assert reads.largest == CHUNK


def test_a_spoiled_object_at_the_destination_is_trusted_by_size_unless_verified(database, tmp_path):
    source, destination = filesystem_storage(tmp_path / "a"), filesystem_storage(tmp_path / "b")
    group_id = new_group(database)
    key = cached(database, source, CachedBlob, group_id, b"layer", stored=b"layer")
    StorageMigration(database.session_factory, source, destination).run()
    Path(destination.local_path(key)).write_bytes(b"LAYER")

    trusted = StorageMigration(database.session_factory, source, destination).run()

    assert (trusted.present_objects, trusted.copied_objects) == (1, 0)
    assert Path(destination.local_path(key)).read_bytes() == b"LAYER"
    notes: list[str] = []

    verified = StorageMigration(
        database.session_factory,
        source,
        destination,
        verify_existing=True,
        progress=notes.append,
    ).run()

    assert (verified.present_objects, verified.copied_objects) == (0, 1)
    assert (
        f"{key}: the destination's object does not match its sha256 digest; copying it again"
        in notes
    )
    assert Path(destination.local_path(key)).read_bytes() == b"layer"


class DestroyedWhileOpened:
    """A storage whose object under `key` is destroyed, as `cleanup` does, as it is opened."""

    def __init__(self, inner: Storage, database: Database, key: str) -> None:
        self.inner = inner
        self.database = database
        self.key = key

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def open(self, key: str):
        if key == self.key:
            manager, session = self.database.session()
            with manager:
                session.execute(delete(CachedBlob).where(CachedBlob.storage_key == key))
            self.inner.delete(key)
        return self.inner.open(key)


def test_an_object_destroyed_during_the_run_is_no_failure(database, tmp_path):
    source, destination = filesystem_storage(tmp_path / "a"), filesystem_storage(tmp_path / "b")
    group_id = new_group(database)
    kept = cached(database, source, CachedBlob, group_id, b"kept", stored=b"kept")
    destroyed = cached(database, source, CachedBlob, group_id, b"destroyed", stored=b"destroyed")

    counts = StorageMigration(
        database.session_factory, DestroyedWhileOpened(source, database, destroyed), destination
    ).run()

    assert (counts.copied_objects, counts.vanished_objects, counts.failures) == (1, 1, [])
    assert [item.key for item in destination.objects()] == [kept]


# --- The command's refusals ------------------------------------------------------------------


@pytest.fixture
def source_ini(tmp_path) -> Path:
    path = write_ini(
        tmp_path / "source.ini",
        app_settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "source"),
        free_port(),
    )
    migrate(f"sqlite:///{tmp_path / 'db.sqlite'}")
    return path


def refused(source_ini: Path, destination: dict[str, str] | str, tmp_path: Path) -> str:
    """The one line `migrate-storage --to` a destination ini (or path) fails with."""
    if isinstance(destination, dict):
        to = str(write_ini(tmp_path / "to.ini", destination, free_port()))
    else:
        to = destination
    result = run_admin(source_ini, "migrate-storage", "--to", to, tmpdir=tmp_path / "tmp")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("depproxy-admin: error: ")
    return line.removeprefix("depproxy-admin: error: ")


def test_migrate_storage_refuses_what_it_cannot_do_in_one_line(source_ini, tmp_path, moto_s3):
    database_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    missing = tmp_path / "missing.ini"
    assert refused(source_ini, str(missing), tmp_path) == (
        f"cannot read --to {missing}: [Errno 2] No such file or directory: '{missing}'"
    )
    (tmp_path / "no-app.ini").write_text("[server:main]\nport = 1\n")
    assert refused(source_ini, str(tmp_path / "no-app.ini"), tmp_path).startswith(
        f"cannot read --to {tmp_path / 'no-app.ini'}: No section 'main'"
    )
    assert refused(source_ini, {"depproxy.storage.path": str(tmp_path / "b")}, tmp_path) == (
        f"--to {tmp_path / 'to.ini'} names no database (sqlalchemy.url)"
    )
    assert refused(
        source_ini, app_settings(f"sqlite:///{tmp_path / 'other.sqlite'}", tmp_path / "b"), tmp_path
    ) == (
        f"--to {tmp_path / 'to.ini'} names another database than {source_ini}: both must name "
        "the one whose rows refer to the objects"
    )
    (tmp_path / "link").symlink_to(tmp_path / "source")
    assert refused(source_ini, app_settings(database_url, tmp_path / "link"), tmp_path) == (
        f"{source_ini} and --to {tmp_path / 'to.ini'} configure the same storage "
        f"(file://{(tmp_path / 'source').resolve()}): there is nothing to copy"
    )
    assert refused(
        source_ini,
        app_settings(database_url, tmp_path / "b") | {"depproxy.storage": "s3"},
        tmp_path,
    ) == (f"--to {tmp_path / 'to.ini'}: setting 'depproxy.storage.s3.bucket': is required")
    closed = f"http://127.0.0.1:{free_port()}"
    s3 = app_settings(database_url, tmp_path / "b") | moto_s3.settings(endpoint_url=closed)
    assert refused(source_ini, s3, tmp_path).startswith(
        f"destination storage s3://{moto_s3.bucket}/ at {closed}: EndpointConnectionError: "
        f'Could not connect to the endpoint URL: "{closed}/'
    )


def test_corrupt_source_objects_are_named_and_fail_the_run(source_ini, tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    source = filesystem_storage(tmp_path / "source")
    group_id = new_group(database)
    cached(database, source, CachedBlob, group_id, b"good", stored=b"good")
    corrupt = cached(database, source, CachedBlob, group_id, b"good?", stored=b"evil?")
    to = write_ini(
        tmp_path / "to.ini",
        app_settings(database.url, tmp_path / "destination"),
        free_port(),
    )

    result = run_admin(
        source_ini, "migrate-storage", "--to", str(to), "--quiet", tmpdir=tmp_path / "tmp"
    )

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"depproxy-admin: error: {corrupt}: the source's object does not match its sha256 "
        "digest; not copied",
        "depproxy-admin: error: 1 object(s) missing or corrupt in the source were not copied "
        "(named above)",
    ]
    assert result.stdout.splitlines() == [
        "migrate-storage done: 2/2 object(s), 0.0 MiB/0.0 MiB: 1 copied (0.0 MiB), "
        "0 already there, 1 not copied"
    ]
    assert [item.key for item in filesystem_storage(tmp_path / "destination").objects()] == [
        storage_key("blobs", "sha256:" + hashlib.sha256(b"good").hexdigest())
    ]
    database.engine.dispose()


@pytest.mark.parametrize(
    ("every_objects", "every_bytes", "sizes", "reported_after"),
    [(2, 100 * CHUNK, [1, 2, 3, 4, 5], [2, 4]), (100, 2 * CHUNK, [CHUNK + 1] * 3, [2])],
    ids=["objects", "bytes"],
)
def test_progress_is_a_line_every_so_many_objects_or_bytes(
    database, tmp_path, monkeypatch, every_objects, every_bytes, sizes, reported_after
):
    monkeypatch.setattr(storage_migration, "PROGRESS_OBJECTS", every_objects)
    monkeypatch.setattr(storage_migration, "PROGRESS_BYTES", every_bytes)
    source, destination = filesystem_storage(tmp_path / "a"), filesystem_storage(tmp_path / "b")
    group_id = new_group(database)
    for size in sizes:
        data = os.urandom(size)
        cached(database, source, CachedBlob, group_id, data, stored=data)
    lines: list[str] = []

    StorageMigration(database.session_factory, source, destination, progress=lines.append).run()

    total = sum(sizes) / (1024 * 1024)
    assert lines[0] == (
        f"copying {len(sizes)} object(s), {total:.1f} MiB, from {source.location} to "
        f"{destination.location}"
    )
    assert [line.split(" ", 1)[0] for line in lines[1:]] == [
        f"{done}/{len(sizes)}" for done in reported_after
    ]
    assert all(line.endswith("0 already there, 0 not copied") for line in lines[1:])
