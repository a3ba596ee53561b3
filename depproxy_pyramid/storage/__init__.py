"""Where cached blobs live: the storage interface, and the factory that picks a strategy.

A strategy is chosen by the `depproxy.storage` setting: `filesystem`, `s3`, or the dotted name
(`package.module:Class` or `package.module.Class`) of a class whose classmethod
`from_settings(settings)` returns a `Storage`. Each strategy parses its own settings there, once.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Protocol, runtime_checkable

from ..settings import ConfigurationError

__all__ = [
    "BlobNotFound",
    "ConfigurationError",
    "Storage",
    "StoredObject",
    "UPLOAD_PREFIX",
    "Upload",
    "storage_from_settings",
]

_ALIASES = {
    "filesystem": "depproxy_pyramid.storage.filesystem:FilesystemStorage",
    "s3": "depproxy_pyramid.storage.s3:S3Storage",
}
# Spelled out rather than \w or [^/]: those would admit Unicode letters and digits. A segment may
# not start with a dot, which rules out `.` and `..` and keeps keys off the spool directory.
_KEY_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")

UPLOAD_PREFIX = "fill-"
"""How the temporary file of an upload in `spool_dir` is named. The process writing it holds an
exclusive `flock` on it until the upload is committed or aborted, so one that nobody holds is
the leftover of a process that died."""


class BlobNotFound(LookupError):
    """No blob is stored under the key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no blob stored under {key!r}")
        self.key = key


@dataclass(frozen=True)
class StoredObject:
    """A blob as a listing of the store sees it."""

    key: str
    modified: datetime
    """When it was last written (timezone-aware), by the store's clock."""


class Upload(Protocol):
    """Bytes on their way to one key, invisible under it until `commit`.

    Written by one thread; `abort` may follow any other call, including a failed one.
    """

    @property
    def local_path(self) -> str | None:
        """A local file holding every byte written so far, which others may read while it
        grows; None when the bytes go straight to a remote store."""
        ...

    def write(self, data: bytes) -> None:
        """Append `data`; on failure the upload is aborted before the error is raised."""
        ...

    def commit(self) -> None:
        """Publish the bytes written under the key in one step. Callers commit only bytes they
        have verified. On failure the upload is aborted before the error is raised."""
        ...

    def abort(self) -> None:
        """Leave nothing of the upload behind: no object, no pending remote upload, no local
        file. Idempotent, and a no-op after a successful `commit`."""
        ...


@runtime_checkable
class Storage(Protocol):
    """A flat store of immutable blobs addressed by keys such as `blobs/sha256/<hex>`.

    Every method raises ValueError for a key that `validate_key` rejects.
    """

    spool_dir: str
    """A local directory for the temporary files that callers later hand to `put_file`, and for
    the strategy's own upload files (named `UPLOAD_PREFIX...`)."""

    location: str
    """Where the blobs are, for messages; two instances with the same location are one store."""

    def open(self, key: str) -> BinaryIO:
        """Return the blob for streaming reads; raise BlobNotFound when absent."""
        ...

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        """Return bytes `start..end` inclusive, `end` clamped to the blob's last byte.

        Raise BlobNotFound when absent and ValueError when `start` is not inside the blob.
        """
        ...

    def size(self, key: str) -> int | None:
        """Return the blob's length in bytes, or None when absent."""
        ...

    def begin_upload(self, key: str) -> Upload:
        """Start writing a blob that `Upload.commit` publishes under `key`; until then, and
        after `Upload.abort`, nothing new is visible under `key`."""
        ...

    def put_file(self, key: str, path: str) -> None:
        """Publish the complete local file at `path` under `key` in one step, consuming it.

        The file is gone afterwards whether or not this succeeds, and a failure leaves nothing
        new visible under `key`.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove the blob; removing an absent blob is not an error."""
        ...

    def objects(self) -> Iterator[StoredObject]:
        """Every blob stored, in no particular order, with when it was last written.

        Only keys that `validate_key` accepts are listed; the spool directory is not.
        """
        ...

    def url_for(self, key: str, *, expires_in: int = 300) -> str | None:
        """Return a URL that serves the blob to anyone for `expires_in` seconds, or None when
        the strategy cannot (or is configured not to) hand out such URLs."""
        ...

    def local_path(self, key: str) -> str | None:
        """Return the path of the blob's file on this machine (whether or not it exists), or
        None when blobs are not local files."""
        ...


def validate_key(key: str) -> str:
    """Return `key` if it is a relative path of plain segments; raise ValueError otherwise."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def validate_range(start: int, end: int) -> None:
    """Raise ValueError unless `start..end` is a well-formed inclusive byte range."""
    if start < 0 or end < start:
        raise ValueError(f"invalid byte range {start}-{end}")


def storage_from_settings(settings: Mapping[str, str]) -> Storage:
    """Build the strategy named by `depproxy.storage` (default `filesystem`) from `settings`."""
    key = "depproxy.storage"
    name = str(settings.get(key) or "").strip() or "filesystem"
    target = _ALIASES.get(name, name)
    if ":" in target:
        module_name, _, attribute = target.partition(":")
    else:
        module_name, _, attribute = target.rpartition(".")
    if not module_name or not attribute:
        raise ConfigurationError(
            key, f"expected {' or '.join(sorted(_ALIASES))} or a dotted class name, got {name!r}"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(key, f"cannot load {target!r}: {exc}") from exc
    from_settings = getattr(factory, "from_settings", None)
    if not callable(from_settings):
        raise ConfigurationError(key, f"{target!r} has no from_settings(settings)")
    storage = from_settings(settings)
    if not isinstance(storage, Storage):
        raise ConfigurationError(key, f"{target!r}.from_settings() did not return a Storage")
    return storage
