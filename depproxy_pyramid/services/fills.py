"""Single-flight blob fills: one upstream transfer per (group, digest), shared by every client.

A fill runs on its own thread, writes the upstream body to a spool file while hashing it, and
is committed (storage, then the metadata row) only when length and digest match. Clients never
read the upstream response themselves: they read the spool file as it grows, so one that
disconnects cancels nothing, and late arrivals never go upstream. Until the digest is verified
every reader holds back the final byte, so no client can ever receive a complete wrong blob; a
failed fill makes every reader raise, which cuts its connection short.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, suppress

from ..upstream import BlobResponse, UpstreamError

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
SPOOL_PREFIX = "fill-"


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
    """The upstream transfer failed or its bytes did not match the digest; nothing was kept."""


class Fill:
    """One blob transfer from upstream into the spool, and the readers following it."""

    def __init__(self, digest: str, spool_dir: str) -> None:
        self.digest = digest
        self.size: int | None = None
        self.content_type = "application/octet-stream"
        self.upstream_status: int | None = None
        self.error: Exception | None = None
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
        try:
            with open_upstream() as response:
                with self._cond:
                    self.size = response.size
                    self.upstream_status = response.status
                    self.content_type = (
                        response.headers.get("Content-Type") or self.content_type
                    ).split(";")[0].strip() or self.content_type
                    self._started = True
                    self._cond.notify_all()
                for chunk in response.iter_chunks(CHUNK_SIZE):
                    if self.size is not None and self._written + len(chunk) > self.size:
                        raise FillError(f"upstream sent more than the {self.size} bytes announced")
                    self._out.write(chunk)
                    self._out.flush()
                    hasher.update(chunk)
                    with self._cond:
                        self._written += len(chunk)
                        self._cond.notify_all()
            self._out.close()
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

    def _fail(self, error: Exception) -> None:
        # Gone before any reader hears of the failure: nothing of it outlives the response.
        with suppress(FileNotFoundError):
            os.unlink(self.spool_path)
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

    def read(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes `start..end-1` (to the end of the blob when `end` is None), as they land."""
        position = start
        while end is None or position < end:
            with self._cond:
                while True:
                    if self.error is not None:
                        raise FillError(str(self.error))
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

    def join_or_start(
        self,
        group_id: int,
        digest: str,
        is_cached: Callable[[], bool],
        open_upstream: Callable[[], AbstractContextManager[BlobResponse]],
    ) -> Fill | None:
        """The fill in flight for the blob, a new one, or None when it has been cached since."""
        key = (group_id, digest)
        with self._lock:
            fill = self._fills.get(key)
            if fill is not None:
                return fill
            # A fill records its row before it leaves this table, so this check closes the
            # window between a caller's cache miss and a fill that finished meanwhile.
            if is_cached():
                return None
            fill = Fill(digest, self._spool_dir)
            self._fills[key] = fill
        threading.Thread(
            target=self._run,
            args=(key, fill, open_upstream),
            name=f"fill-{digest[7:19]}",
            daemon=True,
        ).start()
        return fill

    def _run(
        self,
        key: tuple[int, str],
        fill: Fill,
        open_upstream: Callable[[], AbstractContextManager[BlobResponse]],
    ) -> None:
        try:
            fill.run(open_upstream, lambda done: self._commit(key[0], done))
        finally:
            with self._lock:
                del self._fills[key]

    def in_flight(self) -> int:
        with self._lock:
            return len(self._fills)
