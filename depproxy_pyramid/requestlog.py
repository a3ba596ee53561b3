"""One record per registry request, written once its body is done.

A request's access-log line and its counters (requests by result, bytes by source) come from
one `RequestRecord`, finished when the server closes the response body: the bytes are those
that went out, the duration includes the transfer, and a client that stopped reading early is
recorded with what it got. A file body counts what the server took from the file, which is what
it sent; an iterated body counts what the server took from the iterator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from typing import BinaryIO

from pyramid.events import NewResponse
from pyramid.request import Request

from .logfields import log_line, raw_path
from .metrics import Metrics

log = logging.getLogger("depproxy_pyramid.access")

RECORD = "depproxy.request_record"


class Result(StrEnum):
    HIT = "hit"  # from the cache: fresh, or confirmed by upstream
    MISS = "miss"  # fetched from upstream for this request
    STALE = "stale"  # from the cache because upstream failed
    ERROR = "error"  # an error answer to an authorized request
    REFUSED = "refused"  # refused before the view ran: credentials, permission, bad input


SOURCE = {Result.HIT: "cache", Result.STALE: "cache", Result.MISS: "upstream"}


class RequestRecord:
    """What one registry request did; `finish` writes it, once."""

    def __init__(self, metrics: Metrics | None, kind: str | None, fields: dict) -> None:
        self.started = time.monotonic()
        self.metrics = metrics
        self.kind = kind
        self.fields = fields
        self.result: Result | None = None
        self.status: int | None = None
        self.upstream_status: int | None = None
        self.body_attached = False
        self._offloaded: tuple[int, int] | None = None
        self._finished = threading.Event()

    @classmethod
    def start(cls, request: Request, metrics: Metrics, kind: str, fields: dict) -> RequestRecord:
        """The record of a request the registry view serves."""
        user = request.identity.name if request.identity else "-"
        record = cls(metrics, kind, {"method": request.method, **fields, "user": user})
        request.environ[RECORD] = record
        return record

    @classmethod
    def refused(cls, request: Request) -> RequestRecord:
        # The raw path: a malformed one is refused, and logged, without being decoded. No user
        # field: the request's transaction is over, too late to look one up.
        record = cls(None, None, {"method": request.method, "path": raw_path(request.environ)})
        record.result = Result.REFUSED
        request.environ[RECORD] = record
        return record

    def offloaded(self, status: int, length: int) -> None:
        """The front-end server answers `status` and sends `length` bytes from storage itself."""
        self.fields["offload"] = "nginx"
        self._offloaded = (status, length)

    def failed(self, upstream_status: int | None) -> None:
        """The view raised a registry error; its response carries the status."""
        self.result = Result.ERROR
        self.upstream_status = upstream_status

    def file_body(
        self, file: BinaryIO, length: int, file_wrapper: Callable | None, block_size: int
    ) -> Iterable[bytes]:
        """A response body that sends `length` bytes of `file` from where it is positioned.

        A local file goes through the server's `wsgi.file_wrapper` when it has one: the server
        then sends the file itself, and a client that never reads holds no thread.
        """
        self.body_attached = True
        # A stream (an S3 object's body) cannot be sent by position: it is iterated.
        if file_wrapper is not None and getattr(file, "seekable", lambda: False)():
            return file_wrapper(CountingFile(file, self.finish), block_size)
        return CountedBody(_read(file, length, block_size), self.finish, close=file.close)

    def iterated_body(self, chunks: Iterable[bytes], close: Callable[[], None] | None = None):
        self.body_attached = True
        return CountedBody(chunks, self.finish, close=close)

    def finish(self, sent: int, failed: bool = False) -> None:
        if self._finished.is_set():
            return
        self._finished.set()
        if self._offloaded is not None:
            self.status, sent = self._offloaded
        if failed or self.result is None:
            self.result = Result.ERROR
        if self.metrics is not None and self.kind is not None:
            self.metrics.requests.labels(self.kind, self.result).inc()
            source = SOURCE.get(self.result)
            if source is not None:
                self.metrics.bytes_served.labels(source).inc(sent)
        fields = {**self.fields, "status": self.status, "result": self.result}
        if self.kind is not None:
            fields["bytes"] = sent
            fields["upstream_status"] = self.upstream_status
        fields["duration_ms"] = round((time.monotonic() - self.started) * 1000)
        log.info("%s", log_line(fields))


class CountingFile:
    """A file whose `close` reports how far past its starting position it was read.

    Waitress reads a file body ahead and seeks back over what the socket did not take, so the
    position at close is what was sent.
    """

    def __init__(self, file: BinaryIO, on_close: Callable[[int], None]) -> None:
        self._file = file
        self._on_close = on_close
        self._start = file.tell()
        self.read = file.read
        self.seek = file.seek
        self.tell = file.tell

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            sent = self._file.tell() - self._start
        except ValueError:  # already closed
            sent = 0
        self._file.close()
        self._on_close(sent)


class CountedBody:
    """A response body that counts what it gave the server and reports when it is closed."""

    def __init__(
        self,
        chunks: Iterable[bytes],
        on_close: Callable[[int, bool], None],
        close: Callable[[], None] | None = None,
    ) -> None:
        self._chunks = iter(chunks)
        self._on_close = on_close
        self._close = close
        self.sent = 0
        self.failed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            raise
        except Exception:
            self.failed = True
            raise
        self.sent += len(chunk)
        return chunk

    def close(self) -> None:
        try:
            if self._close is not None:
                self._close()
        finally:
            self._on_close(self.sent, self.failed)


def _read(file: BinaryIO, length: int, block_size: int) -> Iterator[bytes]:
    while length > 0 and (chunk := file.read(min(block_size, length))):
        length -= len(chunk)
        yield chunk


def record_when_body_done(event: NewResponse) -> None:
    """Finish the record of a registry request when the server closes its response body.

    Bodies the view built from a file or a fill carry their record already; every other
    answer (a manifest, a HEAD, a redirect, an error, a refusal) is wrapped here.
    """
    request, response = event.request, event.response
    record = request.environ.get(RECORD)
    if record is None:
        path = raw_path(request.environ)
        if not path.startswith("/v2/") or path == "/v2/":
            return
        record = RequestRecord.refused(request)
    record.status = response.status_int
    if (
        response.conditional_response
        and response.etag is not None
        and response.etag in request.if_none_match
    ):
        # The server answers 304 without the body (webob decides it when the body is sent).
        record.status = 304
    if record.body_attached:
        return
    length = response.content_length
    response.app_iter = record.iterated_body(response.app_iter)
    # Set after app_iter, whose setter forgets the length.
    response.content_length = length
