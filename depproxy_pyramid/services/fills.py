"""Single-flight blob fills: one upstream transfer per (group, digest), shared by every client.

A fill runs on its own thread and writes the upstream body into a storage upload while hashing
it; the upload is committed, then the metadata row recorded, only when length and digest match,
and aborted otherwise. Clients never read the upstream response themselves, so one that
disconnects cancels nothing, and late arrivals never go upstream: they read the upload's local
file as it grows (filesystem storage), or, when it has none (S3), follow the fill through a
window of its most recent bytes in memory, and continue from storage once the fill is committed
if they fall behind that window. Until the digest is verified and the blob committed every reader
holds back the final byte, so no client can ever receive a complete wrong blob, and one that
has a whole blob finds it cached; a failed fill makes every reader raise, which cuts its
connection short.

Upstream decides how much it sends, so a fill is bounded: a blob declared or running larger than
`FillLimits.max_size` is refused or cut, and all fills in flight with a local file together take
no more than `FillLimits.disk_share` of the spool's free disk (`SpoolBudget`).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import threading
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass

from ..errors import RegistryError
from ..storage import UPLOAD_PREFIX, Storage
from ..upstream import BlobResponse, UpstreamError

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
# What a fill without a local file keeps of its latest bytes for its readers: a reader that falls
# further behind continues from storage once the fill is committed.
WINDOW_SIZE = 16 * CHUNK_SIZE
SPOOL_FULL_RETRY_AFTER = 60  # seconds; about what a few large fills take to finish


def remove_abandoned_spool_files(spool_dir: str) -> int:
    """Delete spool files of fills whose process died (no lock held); return how many."""
    removed = 0
    for entry in os.scandir(spool_dir):
        if not entry.name.startswith(UPLOAD_PREFIX):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            with suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        finally:
            os.close(fd)
    return removed


class FillError(Exception):
    """The upstream transfer failed or its bytes did not match the digest; nothing was kept.

    The message names no upstream host, port or URL: clients see it.
    """

    def registry_error(self, upstream_status: int | None = None) -> RegistryError:
        return RegistryError(
            502,
            "UNAVAILABLE",
            f"fetching the blob from upstream failed: {self}",
            {"upstream_status": upstream_status},
        )


class BlobTooLarge(FillError):
    """The blob is larger than the configured maximum: refused up front, or cut at the cap."""

    @classmethod
    def over(cls, limit: int) -> BlobTooLarge:
        return cls(f"the blob is larger than this proxy's limit of {limit} bytes")

    def registry_error(self, upstream_status: int | None = None) -> RegistryError:
        # A refusal by policy, as for a disabled group: retrying cannot help.
        return RegistryError(403, "DENIED", str(self))


class SpoolFull(FillError):
    """The blob would take the fills in flight past their share of the spool's disk."""

    def registry_error(self, upstream_status: int | None = None) -> RegistryError:
        return RegistryError(
            503,
            "UNAVAILABLE",
            f"{self}; retry later",
            None,
            {"Retry-After": str(SPOOL_FULL_RETRY_AFTER)},
        )


@dataclass(frozen=True)
class FillLimits:
    """`max_size`: bytes one blob may have (None: any); `disk_share`: the share of the spool's
    free disk all fills in flight may take together."""

    max_size: int | None = None
    disk_share: float = 1.0


class SpoolBudget:
    """The spool space claimed by the fills in flight in this process.

    A fill claims its declared size before it downloads anything, or, of unknown size, each
    chunk before writing it. Claims together stay within the share of the disk space that
    would be free were the spool empty of fills (free now plus what they have written).
    """

    def __init__(self, spool_dir: str) -> None:
        self._spool_dir = spool_dir
        self._lock = threading.Lock()
        self._claims: dict[Fill, int] = {}

    def claim(self, fill: Fill, total: int, share: float) -> None:
        """Let `fill` hold `total` bytes in the spool, or raise SpoolFull."""
        with self._lock:
            others = [(f, claimed) for f, claimed in self._claims.items() if f is not fill]
            free = shutil.disk_usage(self._spool_dir).free
            written = fill.written + sum(f.written for f, _ in others)
            budget = share * (free + written)
            claimed = total + sum(claimed for _, claimed in others)
            if claimed > budget:
                raise SpoolFull("the proxy's spool has no room for this blob now")
            self._claims[fill] = total

    def release(self, fill: Fill) -> None:
        with self._lock:
            self._claims.pop(fill, None)

    def claimed(self) -> int:
        with self._lock:
            return sum(self._claims.values())


class Fill:
    """One blob transfer from upstream into storage, and the readers following it."""

    def __init__(
        self,
        digest: str,
        storage: Storage,
        storage_key: str,
        limits: FillLimits | None = None,
        budget: SpoolBudget | None = None,
    ) -> None:
        self.digest = digest
        self.storage_key = storage_key
        self.size: int | None = None
        self.content_type = "application/octet-stream"
        self.upstream_status: int | None = None
        self.error: Exception | None = None
        self.limits = limits or FillLimits()
        self._storage = storage
        self._budget = budget or SpoolBudget(storage.spool_dir)
        self._written = 0
        self._started = False
        self._verified = False
        self._stored = False
        self._finished = False
        self._cond = threading.Condition()
        # The latest chunks and their offsets, kept when the upload has no local file to read.
        self._window: deque[tuple[int, bytes]] = deque()
        self._window_bytes = 0
        self._upload = storage.begin_upload(storage_key)
        self._read_fd: int | None = None
        if self._upload.local_path is not None:
            try:
                # Readers share one descriptor through pread; it outlives the rename at commit
                # time and is closed when the last reference to this fill (a reader's, say) is
                # gone.
                self._read_fd = os.open(self._upload.local_path, os.O_RDONLY)
            except BaseException:
                self._upload.abort()
                raise
            weakref.finalize(self, os.close, self._read_fd)

    def run(
        self,
        open_upstream: Callable[[], AbstractContextManager[BlobResponse]],
        commit: Callable[[Fill], None],
    ) -> None:
        """Transfer, verify, then commit; any failure is recorded for the readers to raise."""
        algorithm, _, expected = self.digest.partition(":")
        hasher = hashlib.new(algorithm)
        max_size = self.limits.max_size
        # Only an upload through a local file takes spool disk.
        on_disk = self._read_fd is not None
        claimed = 0
        try:
            with open_upstream() as response:
                # Refused before a body byte is read: closing the response drops the rest.
                if response.size is not None:
                    if max_size is not None and response.size > max_size:
                        raise BlobTooLarge.over(max_size)
                    if on_disk:
                        self._budget.claim(self, response.size, self.limits.disk_share)
                        claimed = response.size
                with self._cond:
                    self.size = response.size
                    self.upstream_status = response.status
                    self.content_type = (
                        response.headers.get("Content-Type") or self.content_type
                    ).split(";")[0].strip() or self.content_type
                    self._started = True
                    self._cond.notify_all()
                for chunk in response.iter_chunks(CHUNK_SIZE):
                    total = self._written + len(chunk)
                    if self.size is not None and total > self.size:
                        raise FillError(f"upstream sent more than the {self.size} bytes announced")
                    if max_size is not None and total > max_size:
                        raise BlobTooLarge.over(max_size)
                    if on_disk and total > claimed:
                        self._budget.claim(self, total, self.limits.disk_share)
                        claimed = total
                    self._upload.write(chunk)
                    hasher.update(chunk)
                    with self._cond:
                        if not on_disk:
                            self._remember(chunk)
                        self._written = total
                        self._cond.notify_all()
            if self.size is not None and self._written != self.size:
                raise FillError(
                    f"upstream closed the blob after {self._written} of {self.size} bytes"
                )
            if hasher.hexdigest() != expected:
                raise FillError(f"upstream bytes do not match {self.digest}; nothing was cached")
            with self._cond:
                self.size = self._written
                self._verified = True
                self._cond.notify_all()
            self._upload.commit()
            with self._cond:
                self._stored = True
                self._cond.notify_all()
            commit(self)
        except (UpstreamError, FillError, OSError) as error:
            self._fail(error)
        except Exception as error:
            log.exception("blob fill for %s failed unexpectedly", self.digest)
            self._fail(error)
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _remember(self, chunk: bytes) -> None:
        """Add the chunk that lands at `self._written` to the window, dropping the oldest
        beyond its size (never the latest). Call with the lock held."""
        self._window.append((self._written, chunk))
        self._window_bytes += len(chunk)
        while self._window_bytes > WINDOW_SIZE and len(self._window) > 1:
            _, dropped = self._window.popleft()
            self._window_bytes -= len(dropped)

    @property
    def written(self) -> int:
        return self._written

    def _fail(self, error: Exception) -> None:
        try:
            # Gone before any reader hears of the failure: nothing of it outlives the response.
            self._upload.abort()
        except Exception:
            log.exception("the upload of blob %s could not be aborted", self.digest)
        if not self._verified:
            detail = getattr(error, "detail", "")
            log.warning(
                "blob fill for %s failed after %d bytes: %s%s",
                self.digest,
                self._written,
                error,
                f" ({detail})" if detail else "",
            )
        with self._cond:
            # A commit failure after verification leaves readers with correct bytes to finish,
            # except those of an upload without a local file that fell behind its window.
            if not self._verified:
                self.error = error
            self._started = True
            self._cond.notify_all()
        if self._verified:
            log.error("verified blob %s could not be committed: %s", self.digest, error)

    def wait_started(self) -> None:
        """Block until upstream answered (size and type known) or the fill failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._started)
            if self.error is not None:
                raise self.error

    def wait_verified(self) -> None:
        """Block until the whole blob is in and matches its digest; raise FillError if not."""
        with self._cond:
            self._cond.wait_for(lambda: self._verified or self.error is not None)
            if not self._verified:
                raise self._reader_error()

    def _reader_error(self) -> FillError:
        """The failure as a reader may tell its client: never the upstream's own message,
        which can name hosts and addresses (the log has it)."""
        error = self.error
        if isinstance(error, FillError):
            return type(error)(str(error))
        if isinstance(error, UpstreamError):
            return FillError("the upstream transfer failed")
        return FillError("the transfer failed; the details are in the server log")

    def read(self, start: int = 0, end: int | None = None) -> Generator[bytes, None, None]:
        """Bytes `start..end-1` (to the end of the blob when `end` is None), as they land."""
        if self._read_fd is not None:
            return self._read_file(self._read_fd, start, end)
        return self._read_memory(start, end)

    def _readable_end(self, position: int) -> int:
        """Wait until there are bytes at `position` that a reader may have, and return where
        they end; at the end of the blob, return at once. Call with the lock held."""
        while True:
            if self.error is not None:
                raise self._reader_error()
            # The last byte waits for the commit as well as the digest: a client that has the
            # whole blob finds it cached (should the commit fail, its bytes are still right).
            if self._verified and self._finished:
                return self._written
            total = self.size if self.size is not None else self._written
            available = min(self._written, total - 1)
            if available > position:
                return available
            self._cond.wait()

    def _read_file(
        self, read_fd: int, position: int, end: int | None
    ) -> Generator[bytes, None, None]:
        while end is None or position < end:
            with self._cond:
                available = self._readable_end(position)
            if available <= position:
                return
            count = min(CHUNK_SIZE, available - position)
            if end is not None:
                count = min(count, end - position)
            data = os.pread(read_fd, count, position)
            if not data:
                raise FillError("spool file ended early")
            position += len(data)
            yield data

    def _read_memory(self, position: int, end: int | None) -> Generator[bytes, None, None]:
        while end is None or position < end:
            with self._cond:
                available = self._readable_end(position)
                if available <= position:
                    return
                stop = available if end is None else min(available, end)
                data = self._from_window(position, stop)
            if data is None:
                # The fill never waits for a reader; this one has to catch up from storage.
                yield from self._read_stored(position, end)
                return
            position += len(data)
            yield data

    def _from_window(self, position: int, stop: int) -> bytes | None:
        """Bytes from `position` to at most `stop` out of one chunk of the window, or None when
        `position` has left it. Call with the lock held."""
        # Most readers keep up with the fill: their chunk is among the latest.
        for offset, chunk in reversed(self._window):
            if offset <= position:
                return chunk[position - offset : stop - offset]
        return None

    def _read_stored(self, position: int, end: int | None) -> Generator[bytes, None, None]:
        with self._cond:
            self._cond.wait_for(lambda: self._stored or self._finished)
            if self.error is not None:
                raise self._reader_error()
            if not self._stored:
                raise FillError("the blob could not be stored; the details are in the server log")
            assert self.size is not None
            stop = self.size if end is None else end
        try:
            with self._storage.open_range(self.storage_key, position, stop - 1) as stored:
                while position < stop:
                    data = stored.read(min(CHUNK_SIZE, stop - position))
                    if not data:
                        raise FillError("storage ended the blob early")
                    position += len(data)
                    yield data
        except FillError:
            raise
        except Exception as error:
            log.warning("reading blob %s back from storage failed: %s", self.digest, error)
            raise FillError(
                "reading the blob from storage failed; the details are in the server log"
            ) from error


class FillStream:
    """One client's read of a fill, holding its place in the upstream budget until closed.

    The server closes the response body when it is done with it, whether the client read it
    all, disconnected or the fill failed: `close` stops the reads and releases the place.
    """

    def __init__(self, fill: Fill, release: Callable[[], None]) -> None:
        self.fill = fill
        self._readers: list[Generator[bytes, None, None]] = []
        # Also run should the body be dropped unclosed: a lost place would shrink the budget
        # for the rest of the process's life.
        self._release = weakref.finalize(self, release)

    @property
    def digest(self) -> str:
        return self.fill.digest

    @property
    def size(self) -> int | None:
        return self.fill.size

    @property
    def content_type(self) -> str:
        return self.fill.content_type

    @property
    def upstream_status(self) -> int | None:
        return self.fill.upstream_status

    def wait_verified(self) -> None:
        self.fill.wait_verified()

    def read(self, start: int = 0, end: int | None = None) -> Generator[bytes, None, None]:
        reader = self.fill.read(start, end)
        self._readers.append(reader)
        return reader

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._release()

    @contextmanager
    def closed_on_error(self) -> Iterator[None]:
        """Close the stream if the block fails: no body will be there for the server to close."""
        try:
            yield
        except BaseException:
            self.close()
            raise


class BlobFills:
    """The fills in flight in this process, keyed by (group id, digest)."""

    def __init__(
        self,
        storage: Storage,
        storage_key: Callable[[str], str],
        commit: Callable[[int, Fill], None],
    ) -> None:
        """`storage_key(digest)` is where a fill uploads the blob; `commit` records it for the
        group once the upload is committed."""
        self._storage = storage
        self._storage_key = storage_key
        self._commit = commit
        removed = remove_abandoned_spool_files(storage.spool_dir)
        if removed:
            log.info("removed %d spool files left by interrupted fills", removed)
        self._fills: dict[tuple[int, str], Fill] = {}
        self._lock = threading.Lock()
        self.budget = SpoolBudget(storage.spool_dir)

    def join_or_start(
        self,
        group_id: int,
        digest: str,
        is_cached: Callable[[], bool],
        open_upstream: Callable[[], AbstractContextManager[BlobResponse]],
        limits: FillLimits | None = None,
        on_end: Callable[[], None] = lambda: None,
    ) -> Fill | None:
        """The fill in flight for the blob, a new one, or None when it has been cached since.

        `limits` bound a new fill; one already in flight keeps its own. `on_end` is called when
        the fill this call started has ended (committed or failed), or at once if it started
        none.
        """
        key = (group_id, digest)
        with self._lock:
            fill = self._fills.get(key)
            # A fill records its row before it leaves this table, so this check closes the
            # window between a caller's cache miss and a fill that finished meanwhile.
            if fill is None and not is_cached():
                fill = self._fills[key] = Fill(
                    digest, self._storage, self._storage_key(digest), limits, self.budget
                )
                started = True
            else:
                started = False
        if not started:
            on_end()
            return fill
        threading.Thread(
            target=self._run,
            args=(key, fill, open_upstream, on_end),
            name=f"fill-{digest[7:19]}",
            daemon=True,
        ).start()
        return fill

    def _run(
        self,
        key: tuple[int, str],
        fill: Fill,
        open_upstream: Callable[[], AbstractContextManager[BlobResponse]],
        on_end: Callable[[], None],
    ) -> None:
        try:
            fill.run(open_upstream, lambda done: self._commit(key[0], done))
        finally:
            self.budget.release(fill)
            with self._lock:
                del self._fills[key]
            on_end()

    def running(self, group_id: int, digest: str) -> Fill | None:
        """The fill in flight in this process for the group's blob, if any."""
        with self._lock:
            return self._fills.get((group_id, digest))

    def in_flight(self) -> int:
        with self._lock:
            return len(self._fills)
