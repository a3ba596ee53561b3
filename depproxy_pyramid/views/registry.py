"""The registry pull API: manifests and blobs of proxied images."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pyramid.events import NewResponse
from pyramid.request import Request
from pyramid.response import Response
from pyramid.security import NO_PERMISSION_REQUIRED
from pyramid.view import view_config

from ..errors import RegistryError, unsupported
from ..logfields import log_line, raw_path
from ..names import parse_repository, validate_digest, validate_reference
from ..permissions import Permission
from ..resources import RepositoryResource, Root
from ..security import check_metrics_access
from ..services.fills import CHUNK_SIZE, Fill, FillError
from ..services.proxy import GroupUpstream, ProxyService
from ..storage import BlobNotFound

log = logging.getLogger("depproxy_pyramid.access")

PULL_METHODS = ("GET", "HEAD")
ACCESS_LOGGED = "depproxy.access_logged"


class RegistryTarget(RepositoryResource):
    """A manifest or blob of a proxied image."""

    def __init__(self, repository, group, kind: str, reference: str) -> None:
        super().__init__(repository, group)
        self.kind = kind
        self.reference = reference


def registry_factory(request: Request) -> RegistryTarget:
    if request.method not in PULL_METHODS:
        raise unsupported("the dependency proxy is a read-only registry: pushing is not supported")
    segments = request.matchdict["subpath"]
    if len(segments) < 3 or segments[-2] not in ("manifests", "blobs"):
        raise RegistryError(
            404,
            "NOT_FOUND",
            "the dependency proxy serves only manifests and blobs",
            {"path": request.path[:300]},
        )
    repository = parse_repository("/".join(segments[:-2]))
    try:
        group = Root(request).find(repository.group_path)
    except KeyError:
        group = None
    return RegistryTarget(repository, group, segments[-2], segments[-1])


class AccessLog:
    """One structured line per registry request, written when its body is done."""

    def __init__(self, request: Request, context: RegistryTarget) -> None:
        request.environ[ACCESS_LOGGED] = True
        self.started = time.monotonic()
        self.fields = {
            "method": request.method,
            "group": context.repository.group_path,
            "image": context.repository.image,
            "kind": context.kind,
            "reference": context.reference,
            "user": request.identity.name if request.identity else "-",
        }

    def write(self, status: int, result: str, sent: int, upstream_status: int | None) -> None:
        fields = {
            **self.fields,
            "status": status,
            "result": result,
            "bytes": sent,
            "upstream_status": upstream_status if upstream_status is not None else "-",
            "duration_ms": round((time.monotonic() - self.started) * 1000),
        }
        log.info("%s", log_line(fields))


def log_refused_request(event: NewResponse) -> None:
    """The access-log line of a registry request refused before the view ran."""
    request = event.request
    # The raw path: a malformed one is refused, and logged, without being decoded.
    path = raw_path(request.environ)
    if request.environ.get(ACCESS_LOGGED) or not path.startswith("/v2/") or path == "/v2/":
        return
    # No user field: this runs after the request's transaction, too late to look one up.
    fields = {"method": request.method, "path": path, "status": event.response.status_int}
    log.info("%s", log_line({**fields, "result": "refused"}))


class CountedBody:
    """A response body that counts what it sent and reports when the server closes it."""

    def __init__(self, chunks: Iterable[bytes], on_close, close=None) -> None:
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
        if self._close is not None:
            self._close()
        self._on_close(self)


def release_request_connection(request: Request) -> None:
    """End the request's transaction once authorization is done.

    The proxy service runs short transactions of its own; were the request to keep its pooled
    connection while waiting for one of those, a full pool of such requests would wait on each
    other until the pool timeout.
    """
    request.tm.commit()
    request.tm.begin()


def _service(request: Request) -> ProxyService:
    return request.registry["depproxy.proxy"]


@view_config(
    route_name="depproxy.registry", request_method=PULL_METHODS, permission=Permission.PULL
)
def registry_view(context: RegistryTarget, request: Request) -> Response:
    service = _service(request)
    upstream = GroupUpstream(context.group.group.id)
    access = AccessLog(request, context)
    release_request_connection(request)
    kind = "manifest" if context.kind == "manifests" else "blob"
    try:
        if kind == "manifest":
            return manifest_response(request, service, upstream, context, access)
        return blob_response(request, service, upstream, context, access)
    except RegistryError as error:
        service.metrics.requests.labels(kind, "error").inc()
        detail = error.detail if isinstance(error.detail, dict) else {}
        access.write(error.status, "error", 0, detail.get("upstream_status"))
        raise


def manifest_response(
    request: Request,
    service: ProxyService,
    upstream: GroupUpstream,
    context: RegistryTarget,
    access: AccessLog,
) -> Response:
    reference = validate_reference(context.reference)
    manifest = service.manifest(upstream, context.repository.image, reference)
    service.metrics.requests.labels("manifest", manifest.result).inc()
    response = Response(body=manifest.content, charset=None)
    response.content_type = manifest.media_type
    response.headers["Docker-Content-Digest"] = manifest.digest
    response.headers["ETag"] = f'"{manifest.digest}"'
    response.conditional_response = True
    sent = 0 if request.method == "HEAD" else len(manifest.content)
    source = "upstream" if manifest.result == "miss" else "cache"
    service.metrics.bytes_served.labels(source).inc(sent)
    access.write(200, manifest.result, sent, manifest.upstream_status)
    return response


def _blob_headers(response: Response, digest: str, content_type: str) -> None:
    response.content_type = content_type
    response.headers["Docker-Content-Digest"] = digest
    response.headers["ETag"] = f'"{digest}"'
    response.headers["Accept-Ranges"] = "bytes"


def _byte_range(request: Request, size: int | None) -> tuple[int, int] | None:
    """The satisfiable single range asked for, None for the whole blob; 416 otherwise."""
    if request.range is None or size is None:
        return None
    span = request.range.range_for_length(size)
    if span is None:
        raise RegistryError(
            416,
            "RANGE_INVALID",
            "requested range not satisfiable",
            {"size": size},
            {"Content-Range": f"bytes */{size}"},
        )
    return span


def blob_response(
    request: Request,
    service: ProxyService,
    upstream: GroupUpstream,
    context: RegistryTarget,
    access: AccessLog,
) -> Response:
    digest = validate_digest(context.reference)
    row = service.cached_blob(upstream.group_id, digest)
    if row is not None:
        response = _cached_blob_response(request, service, row, access)
        if response is not None:
            return response
        service.forget_blob(row)

    if request.method == "HEAD":
        ref = service.head_blob_upstream(upstream, context.repository.image, digest)
        response = Response(status=200)
        _blob_headers(response, digest, ref.media_type or "application/octet-stream")
        response.app_iter = []
        response.content_length = ref.size
        service.metrics.requests.labels("blob", "miss").inc()
        access.write(200, "miss", 0, 200)
        return response

    fill = service.blob_fill(upstream, context.repository.image, digest)
    if fill is None:
        row = service.cached_blob(upstream.group_id, digest)
        response = row and _cached_blob_response(request, service, row, access)
        if response is None:
            raise RegistryError(503, "UNAVAILABLE", "the blob was cached and removed; retry")
        return response
    return _fill_response(request, service, fill, access)


def _cached_blob_response(request, service: ProxyService, row, access: AccessLog):
    """The blob from storage, or None when storage lost it."""
    service.metrics.requests.labels("blob", "hit").inc()
    span = _byte_range(request, row.size)
    head = request.method == "HEAD"
    url = None if head else service.storage.url_for(row.storage_key)
    if url is not None:
        response = Response(status=307, location=url)
        response.headers["Docker-Content-Digest"] = row.digest
        access.write(307, "hit", 0, None)
        return response
    try:
        if head:
            body: Iterable[bytes] = []
            if service.storage.size(row.storage_key) is None:
                return None
        elif span is None:
            stream = service.storage.open(row.storage_key)
            file_wrapper = request.environ.get("wsgi.file_wrapper")
            body = file_wrapper(stream, CHUNK_SIZE) if file_wrapper else _chunks(stream)
        else:
            stream = service.storage.open_range(row.storage_key, span[0], span[1] - 1)
            body = _chunks(stream)
    except BlobNotFound:
        return None
    response = Response(status=206 if span else 200)
    _blob_headers(response, row.digest, row.content_type)
    length = row.size if span is None else span[1] - span[0]
    if span is not None:
        response.headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{row.size}"
    response.app_iter = body
    response.content_length = length
    sent = 0 if head else length
    service.metrics.bytes_served.labels("cache").inc(sent)
    access.write(response.status_int, "hit", sent, None)
    return response


def _chunks(stream) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(CHUNK_SIZE):
            yield chunk


def _fill_response(request, service: ProxyService, fill: Fill, access: AccessLog) -> Response:
    if request.range is not None:
        # A whole body holds back its last bytes until the digest checks out; a range has no
        # such last byte, so it is cut only from a verified blob (and its size is known then).
        try:
            fill.wait_verified()
        except FillError as error:
            raise error.registry_error(fill.upstream_status) from error
    span = _byte_range(request, fill.size)
    response = Response(status=206 if span else 200)
    _blob_headers(response, fill.digest, fill.content_type)
    if span is None:
        chunks = fill.read()
        length = fill.size
    else:
        chunks = fill.read(span[0], span[1])
        response.headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{fill.size}"
        length = span[1] - span[0]
    # The server sends headers with the first chunk: a fill that fails before then (a small
    # blob, usually) still gets a proper error response instead of the server's bare 500.
    try:
        first = next(chunks, None)
    except FillError as error:
        raise error.registry_error(fill.upstream_status) from error
    service.metrics.requests.labels("blob", "miss").inc()

    def finished(body: CountedBody) -> None:
        service.metrics.bytes_served.labels("upstream").inc(body.sent)
        result = "error" if body.failed else "miss"
        access.write(response.status_int, result, body.sent, fill.upstream_status)

    body = itertools.chain([first] if first else [], chunks)
    response.app_iter = CountedBody(body, finished, close=chunks.close)
    # Set after app_iter, whose setter forgets the length.
    response.content_length = length
    return response


@view_config(
    route_name="depproxy.metrics", request_method="GET", permission=NO_PERMISSION_REQUIRED
)
def metrics_view(request: Request) -> Response:
    check_metrics_access(request, request.registry["depproxy.settings"])
    metrics = _service(request).metrics
    response = Response(body=generate_latest(metrics.registry))
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response
