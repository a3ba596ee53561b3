"""Single-flight blob fills: one upstream transfer per (group, digest), shared by every client.

A fill runs on its own thread, writes the upstream body to a spool file while hashing it, and
is committed (storage, then the metadata row) only when length and digest match. Clients never
read the upstream response themselves: they read the spool file as it grows, so one that
disconnects cancels nothing, and late arrivals never go upstream. Until the digest is verified
every reader holds back the final byte, so no client can ever receive a complete wrong blob; a
failed fill makes every reader raise, which cuts its connection short.

Upstream decides how much it sends, so a fill is bounded: a blob declared or running larger than
`FillLimits.max_size` is refused or cut, and all fills in flight together take no more than
`FillLimits.disk_share` of the spool's free disk (`SpoolBudget`).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass

from ..errors import RegistryError
from ..upstream import BlobResponse, UpstreamError

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
SPOOL_PREFIX = "fill-"
SPOOL_FULL_RETRY_AFTER = 60  # seconds; about what a few large fills take to finish


def remove_abandoned_spool_files(spool_dir: str) -> int:
    """Delete spool files of fills whose process died (no lock held); return how many."""
    removed = 0
    for entry in os.scandir(spool_dir):
        if not entry.name.startswith(SPOOL_PREFIX):
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
    """One blob transfer from upstream into the spool, and the readers following it."""

    def __init__(
        self,
        digest: str,
        spool_dir: str,
        limits: FillLimits | None = None,
        budget: SpoolBudget | None = None,
    ) -> None:
        self.digest = digest
        self.size: int | None = None
        self.content_type = "application/octet-stream"
        self.upstream_status: int | None = None
        self.error: Exception | None = None
        self.limits = limits or FillLimits()
        self._budget = budget or SpoolBudget(spool_dir)
        self._written = 0
        self._started = False
        self._verified = False
        self._cond = threading.Condition()
        fd, self.spool_path = tempfile.mkstemp(dir=spool_dir, prefix=SPOOL_PREFIX)
        # Held for the fill's lifetime: a spool file nobody holds is a dead process's leftover.
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._out = os.fdopen(fd, "wb")
        # Readers share one descriptor through pread; it outlives the rename at commit time and
        # is closed when the last reference to this fill (a reader's, say) is gone.
        self._read_fd = os.open(self.spool_path, os.O_RDONLY)
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
        claimed = 0
        try:
            with open_upstream() as response:
                # Refused before a body byte is read: closing the response drops the rest.
                if response.size is not None:
                    if max_size is not None and response.size > max_size:
                        raise BlobTooLarge.over(max_size)
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
                    if total > claimed:
                        self._budget.claim(self, total, self.limits.disk_share)
                        claimed = total
                    self._out.write(chunk)
                    self._out.flush()
                    hasher.update(chunk)
                    with self._cond:
                        self._written += len(chunk)
                        self._cond.notify_all()
            # Left open until the commit is done: closing it would drop the lock that tells
            # `remove_abandoned_spool_files` (and `depproxy-admin cleanup`) the file is in use.
            self._out.flush()
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
            commit(self)
        except (UpstreamError, FillError, OSError) as error:
            self._fail(error)
        except Exception as error:
            log.exception("blob fill for %s failed unexpectedly", self.digest)
            self._fail(error)
        finally:
            self._out.close()

    @property
    def written(self) -> int:
        return self._written

    def _fail(self, error: Exception) -> None:
        # Gone before any reader hears of the failure: nothing of it outlives the response.
        with suppress(FileNotFoundError):
            os.unlink(self.spool_path)
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
            # A commit failure after verification leaves readers with correct bytes to finish.
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
        position = start
        while end is None or position < end:
            with self._cond:
                while True:
                    if self.error is not None:
                        raise self._reader_error()
                    if self._verified:
                        available = self._written
                    else:
                        total = self.size if self.size is not None else self._written
                        available = min(self._written, total - 1)
                    if available > position:
                        break
                    if self._verified:
                        return
                    self._cond.wait()
            count = min(CHUNK_SIZE, available - position)
            if end is not None:
                count = min(count, end - position)
            data = os.pread(self._read_fd, count, position)
            if not data:
                raise FillError("spool file ended early")
            position += len(data)
            yield data


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

    def __init__(self, spool_dir: str, commit: Callable[[int, Fill], None]) -> None:
        self._spool_dir = spool_dir
        self._commit = commit
        removed = remove_abandoned_spool_files(spool_dir)
        if removed:
            log.info("removed %d spool files left by interrupted fills", removed)
        self._fills: dict[tuple[int, str], Fill] = {}
        self._lock = threading.Lock()
        self.budget = SpoolBudget(spool_dir)

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
                fill = self._fills[key] = Fill(digest, self._spool_dir, limits, self.budget)
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
