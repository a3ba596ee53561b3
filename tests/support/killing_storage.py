"""A storage whose process dies, as by `kill -9`, part-way through reading its Nth object.

For interrupting `migrate-storage` at a known point: name it as `depproxy.storage` with
`depproxy.test.inner_storage` (the strategy it reads through) and `depproxy.test.kill_on_open`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import BinaryIO

from depproxy_pyramid.storage import Storage, storage_from_settings


class KillingStorage:
    def __init__(self, inner: Storage, kill_on_open: int) -> None:
        self._inner = inner
        self._kill_on_open = kill_on_open
        self._opened = 0

    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> KillingStorage:
        inner = storage_from_settings(
            {**settings, "depproxy.storage": settings["depproxy.test.inner_storage"]}
        )
        return cls(inner, int(settings["depproxy.test.kill_on_open"]))

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def open(self, key: str) -> BinaryIO:
        self._opened += 1
        stream = self._inner.open(key)
        if self._opened < self._kill_on_open:
            return stream
        return _DyingReader(stream)  # type: ignore[return-value]


class _DyingReader:
    """Hands out half of the first read, then kills the process at the next."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._reads = 0

    def read(self, size: int = -1) -> bytes:
        self._reads += 1
        if self._reads > 1:
            os.kill(os.getpid(), signal.SIGKILL)
        data = self._stream.read(size)
        return data[: max(1, len(data) // 2)]

    def __enter__(self) -> _DyingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()
