"""read_at, when a cached manifest or blob was last served, written in batches.

Cleanup expires cached images after days unread, so read_at needs no more than hour precision.
A hit only notes its row; the notes are written with one UPDATE per table, at most every
`FLUSH_SECONDS`, on a thread that the first hit after that starts (so no hit waits for the
database's write lock), by a timer when no hit comes, and at process exit.

So a row read at some moment has a read_at no earlier than `READ_AT_LAG` before it, once the
notes are written: a process notes a row once an hour, and its UPDATE leaves a read_at written
within the hour (by any process) alone. Cleanup counts a row as read until `READ_AT_LAG` after
its read_at.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..caching import MISSING, BoundedCache
from ..models import CachedBlob, CachedManifest

log = logging.getLogger(__name__)

READ_AT_GRANULARITY = timedelta(hours=1)
FLUSH_SECONDS = 10.0
READ_AT_LAG = 2 * READ_AT_GRANULARITY + timedelta(seconds=FLUSH_SECONDS)
# Rows this process wrote within the hour; one forgotten early is only written once more.
ROWS_REMEMBERED = 20_000
# Ids per UPDATE: SQLite allows a few thousand bound parameters per statement at the least.
BATCH = 500

Model = type[CachedBlob] | type[CachedManifest]


class ReadTimes:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        flush_seconds: float = FLUSH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_factory = session_factory
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._written: BoundedCache[tuple[Model, int], bool] = BoundedCache(
            ROWS_REMEMBERED, ttl=READ_AT_GRANULARITY.total_seconds(), clock=clock
        )
        self._pending: dict[Model, set[int]] = {}
        self._next_flush = clock() + flush_seconds
        self._flusher: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        _flush_at_exit(self)

    def touch(self, model: Model, row_id: int) -> None:
        """Note that the row was read now; written within `flush_seconds` if traffic goes on."""
        if self._written.get((model, row_id)) is MISSING:
            self._written.put((model, row_id), True)
            with self._lock:
                self._pending.setdefault(model, set()).add(row_id)
                if self._timer is None:
                    # Written even when no other hit follows: cleanup expires rows by what is
                    # written, so a note must not wait for traffic that may never come.
                    self._timer = threading.Timer(self.flush_seconds, self._flush_on_timer)
                    self._timer.daemon = True
                    self._timer.start()
        # Any hit may start writing what others noted: read without the lock, then checked
        # under it.
        if self._pending and self._clock() >= self._next_flush:
            with self._lock:
                if self._flusher is not None and self._flusher.is_alive():
                    return
                self._next_flush = self._clock() + self.flush_seconds
                self._flusher = threading.Thread(
                    target=self.flush, name="depproxy-read-at", daemon=True
                )
                self._flusher.start()

    def _flush_on_timer(self) -> None:
        with self._lock:
            self._timer = None
        self.flush()

    def close(self) -> None:
        """Write everything noted, waiting for a write under way first."""
        flusher = self._flusher
        if flusher is not None:
            flusher.join(timeout=30)
        self.flush()

    def flush(self) -> None:
        """Write what is pending, in a transaction of its own; no lock is held meanwhile."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._next_flush = self._clock() + self.flush_seconds
        if not pending:
            return
        now = datetime.now(UTC)
        try:
            with self.session_factory() as session, session.begin():
                for model, ids in pending.items():
                    ordered = sorted(ids)
                    for start in range(0, len(ordered), BATCH):
                        session.execute(
                            update(model)
                            .where(
                                model.id.in_(ordered[start : start + BATCH]),
                                # Another process may have written it within the hour already.
                                model.read_at < now - READ_AT_GRANULARITY,
                            )
                            .values(read_at=now)
                        )
        except SQLAlchemyError as error:
            count = sum(len(ids) for ids in pending.values())
            log.warning("could not write read_at of %d rows; retrying later: %s", count, error)
            with self._lock:
                for model, ids in pending.items():
                    self._pending.setdefault(model, set()).update(ids)


def _flush_at_exit(read_times: ReadTimes) -> None:
    # A weak reference: an application that is gone (tests make many) is not kept alive.
    ref = weakref.ref(read_times)

    def close() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    atexit.register(close)
