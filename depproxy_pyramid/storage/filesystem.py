"""Blobs as files under one local directory, published by an atomic rename out of its spool."""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import io
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import BinaryIO, cast

from depproxy_pyramid.storage import (
    UPLOAD_PREFIX,
    BlobNotFound,
    ConfigurationError,
    StoredObject,
    validate_key,
    validate_range,
)

# Group-readable so that a front-end server in the service's group can send files directly.
_DIR_MODE = 0o750
_FILE_MODE = 0o640
# A missing blob can surface as any of these, depending on which part of its path is missing or
# is a file of the wrong kind.
_ABSENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class FilesystemStorage:
    """Settings: `depproxy.storage.path`, the root directory (created when missing)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        # Resolved, so that two spellings of one directory (a symlink, `..`) name one store.
        self.location = "file://" + os.path.realpath(self.root)
        # Inside the root so that publishing a spooled file is a rename on one filesystem; keys
        # cannot start with a dot, so none can land in here.
        self.spool_dir = os.path.join(self.root, ".tmp")
        _make_dirs(self.spool_dir)

    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> FilesystemStorage:
        key = "depproxy.storage.path"
        root = str(settings.get(key) or "").strip()
        if not root:
            raise ConfigurationError(key, "is required")
        try:
            return cls(root)
        except OSError as exc:
            raise ConfigurationError(key, f"cannot create {root!r}: {exc}") from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return builtins.open(self._path(key), "rb")
        except _ABSENT:
            raise BlobNotFound(key) from None

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        validate_range(start, end)
        file = self.open(key)
        try:
            size = os.fstat(file.fileno()).st_size
            if start >= size:
                raise ValueError(f"range start {start} is past the end of {size}-byte {key!r}")
            file.seek(start)
        except BaseException:
            file.close()
            raise
        return cast(BinaryIO, _RangeReader(file, min(end, size - 1) - start + 1))

    def size(self, key: str) -> int | None:
        try:
            info = os.stat(self._path(key))
        except _ABSENT:
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def begin_upload(self, key: str) -> FileUpload:
        return FileUpload(self, key)

    def put_file(self, key: str, path: str) -> None:
        try:
            target = self._path(key)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fchmod(fd, _FILE_MODE)
                # The rename below may reach the disk before the data does; without this a crash
                # could leave a published blob with missing contents.
                os.fsync(fd)
            finally:
                os.close(fd)
            parent = os.path.dirname(target)
            _make_dirs(parent)
            os.replace(path, target)
        except BaseException:
            _remove(path)
            raise
        try:
            _fsync_dir(parent)
        except BaseException:
            # Callers treat a failed put as "not stored"; a blob left behind would contradict that.
            _remove(target)
            raise

    def delete(self, key: str) -> None:
        with contextlib.suppress(*_ABSENT):
            os.unlink(self._path(key))

    def objects(self) -> Iterator[StoredObject]:
        for directory, subdirectories, files in os.walk(self.root):
            # Keys never start with a dot: that keeps the spool (and editors' litter) out.
            subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
            for name in files:
                path = os.path.join(directory, name)
                key = os.path.relpath(path, self.root)
                try:
                    validate_key(key)
                    info = os.lstat(path)
                except (ValueError, FileNotFoundError):
                    continue
                if stat.S_ISREG(info.st_mode):
                    yield StoredObject(key, datetime.fromtimestamp(info.st_mtime, UTC))

    def url_for(self, key: str, *, expires_in: int = 300) -> str | None:
        validate_key(key)
        return None

    def local_path(self, key: str) -> str | None:
        return self._path(key)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, validate_key(key))


def accel_redirect_uri(prefix: str, key: str) -> str:
    """Where the blob under `key` is, for a front-end server whose location `prefix` maps to
    the storage root (nginx's `X-Accel-Redirect`).

    Keys are plain path segments of unreserved characters, so the URI needs no escaping and
    cannot climb out of the location.
    """
    return prefix + validate_key(key)


class FileUpload:
    """A blob spooled to a locked file in the spool directory, renamed into place on commit."""

    def __init__(self, storage: FilesystemStorage, key: str) -> None:
        self._storage = storage
        self._key = validate_key(key)
        fd, self.local_path = tempfile.mkstemp(dir=storage.spool_dir, prefix=UPLOAD_PREFIX)
        try:
            # Held until commit or abort: a spool file nobody holds is a dead process's leftover
            # (`depproxy-admin cleanup` and a starting process remove those).
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._file: io.BufferedWriter | None = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            _remove(self.local_path)
            raise

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError("the upload is already committed or aborted")
        try:
            self._file.write(data)
            # Readers follow the file through their own descriptors: nothing may wait in our
            # buffer.
            self._file.flush()
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        if self._file is None:
            raise ValueError("the upload is already committed or aborted")
        file, self._file = self._file, None
        try:
            file.flush()
            # Renamed while still locked: closing first would let a cleanup take the file.
            self._storage.put_file(self._key, self.local_path)
        finally:
            # put_file removed the file if it failed.
            file.close()

    def abort(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        _remove(self.local_path)
        file.close()


class _RangeReader(io.RawIOBase):
    """Reads at most `length` bytes from a file already positioned at the range's start."""

    def __init__(self, file: BinaryIO, length: int) -> None:
        super().__init__()
        self._file = file
        self._remaining = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        with memoryview(buffer).cast("B") as view:
            data = self._file.read(min(len(view), self._remaining))
            view[: len(data)] = data
        self._remaining -= len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def _make_dirs(path: str) -> None:
    """Create `path` and its missing parents, each with our mode (os.makedirs gives the mode only
    to the last one) and each recorded durably in its parent directory."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    _make_dirs(parent)
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        # Another put may have created it meanwhile; anything but a directory is a real conflict.
        if os.path.isdir(path):
            return
        raise
    _fsync_dir(parent)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
