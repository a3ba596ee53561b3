"""The one in-memory cache every cross-request lookup uses: bounded, least recently used first.

Immutable things (a manifest by digest, a verified registry token) stay until evicted or until
their own expiry; slow-changing ones (a group, who a token's subject is now) for a few seconds
at most, which bounds how long a change made elsewhere goes unnoticed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MISSING: object = object()


class BoundedCache(Generic[K, V]):
    """A thread-safe mapping of at most `capacity` (in the units of `size_of`, one per entry by
    default), evicting the least recently used entries first.

    Entries live `ttl` seconds at most (None: until evicted), or less when `put` says so.
    A value larger than the whole capacity is not kept.
    """

    def __init__(
        self,
        capacity: int,
        *,
        ttl: float | None = None,
        size_of: Callable[[V], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._size_of = size_of
        self._clock = clock
        # key -> (value, deadline or None, size)
        self._entries: OrderedDict[K, tuple[V, float | None, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: K, default: object = MISSING) -> V | object:
        """The value, or `default` when it is absent or expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return default
            value, deadline, _ = entry
            if deadline is not None and self._clock() >= deadline:
                self._remove(key)
                return default
            self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V, *, lifetime: float | None = None) -> None:
        """Keep `value` for at most `lifetime` seconds, and never beyond the cache's `ttl`."""
        limits = [t for t in (self.ttl, lifetime) if t is not None]
        seconds = min(limits) if limits else None
        size = self._size_of(value) if self._size_of is not None else 1
        if (seconds is not None and seconds <= 0) or size > self.capacity:
            self.discard(key)
            return
        with self._lock:
            deadline = self._clock() + seconds if seconds is not None else None
            self._remove(key)
            self._entries[key] = (value, deadline, size)
            self._size += size
            while self._size > self.capacity:
                self._remove(next(iter(self._entries)))

    def discard(self, key: K) -> None:
        with self._lock:
            self._remove(key)

    def discard_where(self, predicate: Callable[[K], bool]) -> None:
        """Drop every entry whose key `predicate` holds for."""
        with self._lock:
            for key in [key for key in self._entries if predicate(key)]:
                self._remove(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._size = 0

    @property
    def size(self) -> int:
        """What the entries take, in the units of `size_of` (expired ones until looked at)."""
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._size -= entry[2]
