"""The registry pull API: manifests and blobs of proxied images."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from prometheus_client import CONTENT_TYPE_LATEST
from pyramid.request import Request
from pyramid.response import Response
from pyramid.security import NO_PERMISSION_REQUIRED
from pyramid.view import view_config
from webob.byterange import Range

from ..errors import RegistryError, method_not_allowed
from ..names import Repository, is_digest, is_tag, parse_repository
from ..negotiation import accepted_manifests
from ..permissions import Permission
from ..requestlog import RequestRecord, Result
from ..resources import RepositoryResource, Root
from ..security import check_metrics_access
from ..services.fills import CHUNK_SIZE, FillError
from ..services.proxy import (
    BlobAnswer,
    FilledBlob,
    GroupUpstream,
    OffloadedBlob,
    ProxyService,
    RedirectedBlob,
    ServedManifest,
)

PULL_METHODS = ("GET", "HEAD")


class RegistryTarget(RepositoryResource):
    """A manifest or blob of a proxied image."""

    def __init__(self, repository, group, kind: str, reference: str) -> None:
        super().__init__(repository, group)
        self.kind = kind
        self.reference = reference


class UnmirroredTarget(RegistryTarget):
    """A name of a registry the mirror group does not mirror (containerd's `?ns=`).

    Refused with 404 only once the caller may pull from the mirror group: callers who may not
    get the group's usual refusal, and learn nothing of which registries are configured.
    """

    def __init__(self, repository, group, kind: str, reference: str, namespace: str) -> None:
        super().__init__(repository, group, kind, reference)
        self.namespace = namespace


class TagListTarget(RegistryTarget):
    """An image's tag list (`views.listing`)."""


class ReferrersTarget(RegistryTarget):
    """The referrers of one of an image's manifests (`views.listing`)."""


def _target_class(segments: tuple[str, ...]) -> type[RegistryTarget] | None:
    """What `/v2/<name>/<kind>/<reference>` asks for; None for no endpoint of ours."""
    if len(segments) < 3:
        return None
    if segments[-2] in ("manifests", "blobs"):
        return RegistryTarget
    if segments[-2] == "referrers":
        return ReferrersTarget
    if segments[-2:] == ("tags", "list"):
        return TagListTarget
    return None


READ_ONLY = "the dependency proxy is a read-only registry: pushing is not supported"


def registry_factory(request: Request) -> RegistryTarget:
    """The manifest, blob, tag list or referrers a `/v2/<name>/<kind>/<reference>` path names.

    The path is judged before the method, as distribution's router does: a reference that
    cannot exist is a 404 whatever the method, and only a resource that could exist answers a
    push with 405.
    """
    segments = request.matchdict["subpath"]
    if segments[-2:] == ("blobs", "uploads") or segments[-3:-1] == ("blobs", "uploads"):
        raise method_not_allowed((), READ_ONLY)
    target = _target_class(segments)
    if target is None:
        raise RegistryError(
            404,
            "UNSUPPORTED",
            "no such endpoint: the dependency proxy serves manifests, blobs, tag lists and "
            "referrers",
            {"path": request.path[:300]},
        )
    settings = request.registry["depproxy.settings"]
    repository = parse_repository("/".join(segments[:-2]), settings.mirror_group)
    namespace = request.GET.get("ns") if repository.mirror_name is not None else None
    mirrored = repository if namespace is None else _in_namespace(request, repository, namespace)
    kind, reference = segments[-2], segments[-1]
    if kind == "manifests" and not (is_tag(reference) or is_digest(reference)):
        raise RegistryError(
            404,
            "MANIFEST_UNKNOWN",
            "no such manifest: not a tag or digest",
            {"reference": reference[:200]},
        )
    if kind == "blobs" and not is_digest(reference):
        raise RegistryError(
            404, "BLOB_UNKNOWN", "no such blob: not a digest", {"digest": reference[:200]}
        )
    if kind == "referrers" and not is_digest(reference):
        # The referrers API's one refusal: it never answers 404.
        raise RegistryError(
            400, "DIGEST_INVALID", "the subject is not a digest", {"digest": reference[:200]}
        )
    if request.method not in PULL_METHODS:
        raise method_not_allowed(PULL_METHODS, READ_ONLY)
    try:
        group = Root(request).find(repository.group_path)
    except KeyError:
        group = None
    if mirrored is None:
        assert namespace is not None
        return UnmirroredTarget(repository, group, kind, reference, namespace)
    return target(mirrored, group, kind, reference)


def single_byte_range(request: Request) -> Range | None:
    """The request's byte range when it asks for one; several are answered with the whole
    blob (RFC 9110 lets a server ignore Range), never with only the first of them."""
    if "," in request.headers.get("Range", ""):
        return None
    return request.range


def _in_namespace(request: Request, repository: Repository, namespace: str) -> Repository | None:
    """The mirror's image for a name of registry `namespace` (containerd's `?ns=`); None when
    that registry is not one the proxy pulls from.

    The mirror group mirrors docker.io, whatever the default upstream's URL: Docker's
    `registry-mirrors` exist for it alone. The default upstream's own host name means it too;
    an extra upstream's host sends the image there, as that host's prefix on a group path would.
    """
    upstreams = _service(request).upstreams
    registry = upstreams.registry_host(namespace)
    docker_io = namespace.lower() == "docker.io"
    if registry == upstreams.default_host or (registry is None and docker_io):
        return repository
    if registry is None:
        return None
    return replace(repository, image=f"{registry}/{repository.image}")


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
    kind = "manifest" if context.kind == "manifests" else "blob"
    image = context.repository.image
    with recorded(request, context, kind) as record:
        if kind == "manifest":
            accept = accepted_manifests(request.headers.get("Accept"))
            manifest = service.manifest(upstream, image, context.reference, accept)
            return manifest_response(manifest, record)
        answer = service.blob(
            upstream,
            image,
            context.reference,
            head=request.method == "HEAD",
            byte_range=single_byte_range(request),
        )
        return blob_response(request, answer, record)


@contextmanager
def recorded(request: Request, context: RegistryTarget, kind: str) -> Iterator[RequestRecord]:
    """The request's record, started once it is authorized; a registry error raised inside is
    recorded as the request's failure."""
    repository = context.repository
    record = RequestRecord.start(
        request,
        _service(request).metrics,
        kind,
        {
            "group": repository.group_path,
            "image": repository.image,
            "kind": context.kind,
            "reference": context.reference,
        },
    )
    release_request_connection(request)
    try:
        yield record
    except RegistryError as error:
        detail = error.detail if isinstance(error.detail, dict) else {}
        record.failed(detail.get("upstream_status"))
        raise


# More particular than the registry view's context: Pyramid picks this view for these targets.
@view_config(
    route_name="depproxy.registry",
    context=UnmirroredTarget,
    request_method=PULL_METHODS,
    permission=Permission.PULL,
)
def unmirrored_view(context: UnmirroredTarget, request: Request) -> Response:
    raise RegistryError(
        404,
        "NAME_UNKNOWN",
        "this registry mirrors docker.io and the configured upstreams only",
        {"name": context.repository.name, "ns": context.namespace[:100]},
    )


def manifest_response(manifest: ServedManifest, record: RequestRecord) -> Response:
    record.result = manifest.result
    record.upstream_status = manifest.upstream_status
    response = Response(body=manifest.content, charset=None)
    response.content_type = manifest.media_type
    response.headers["Docker-Content-Digest"] = manifest.digest
    response.headers["ETag"] = f'"{manifest.digest}"'
    # Which manifest a tag names, and whether a digest's is served at all, depends on Accept:
    # a cache in front (a CDN, nginx's proxy_cache) must not give one client's answer to
    # another that accepts other types.
    response.vary = ("Accept",)
    response.conditional_response = True
    return response


def blob_response(request: Request, answer: BlobAnswer, record: RequestRecord) -> Response:
    if isinstance(answer, RedirectedBlob):
        record.result = Result.HIT
        response = Response(status=307, location=answer.url)
        response.headers["Docker-Content-Digest"] = answer.digest
        return response
    if isinstance(answer, OffloadedBlob):
        record.result = Result.HIT
        # What the front-end server is about to send; its own log has what the client took.
        record.offloaded(206 if answer.partial else 200, answer.length)
        response = Response(status=200)
        response.content_type = answer.content_type
        response.headers["Docker-Content-Digest"] = answer.digest
        response.headers["ETag"] = f'"{answer.digest}"'
        # No Accept-Ranges: nginx passes the app's on and adds its own, which would make two.
        response.headers["X-Accel-Redirect"] = answer.uri
        return response
    if isinstance(answer, FilledBlob):
        return _fill_response(answer, record)
    record.result = answer.result
    response = _blob_response_head(answer.digest, answer.content_type, answer.size, answer.span)
    if answer.file is not None:
        response.app_iter = record.file_body(
            answer.file, answer.length, request.environ.get("wsgi.file_wrapper"), CHUNK_SIZE
        )
    response.content_length = answer.length
    return response


def _blob_response_head(
    digest: str, content_type: str, size: int | None, span: tuple[int, int] | None
) -> Response:
    response = Response(status=206 if span else 200)
    response.content_type = content_type
    response.headers["Docker-Content-Digest"] = digest
    response.headers["ETag"] = f'"{digest}"'
    response.headers["Accept-Ranges"] = "bytes"
    if span is not None:
        response.headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
    response.app_iter = []
    return response


def _fill_response(answer: FilledBlob, record: RequestRecord) -> Response:
    fill, span = answer.fill, answer.span
    record.result = Result.MISS
    record.upstream_status = fill.upstream_status
    with fill.closed_on_error():
        response = _blob_response_head(fill.digest, fill.content_type, fill.size, span)
        chunks = fill.read() if span is None else fill.read(span[0], span[1])
        length = fill.size if span is None else span[1] - span[0]
        # The server sends headers with the first chunk: a fill that fails before then (a small
        # blob, usually) still gets a proper error response instead of the server's bare 500.
        try:
            first = next(chunks, None)
        except FillError as error:
            raise error.registry_error(fill.upstream_status) from error
    body = itertools.chain([first] if first else [], chunks)
    # Closing the stream gives its upstream slot back, however the body ends.
    response.app_iter = record.iterated_body(body, close=fill.close)
    # Set after app_iter, whose setter forgets the length.
    response.content_length = length
    return response


@view_config(route_name="depproxy.metrics", request_method="GET", permission=NO_PERMISSION_REQUIRED)
def metrics_view(request: Request) -> Response:
    check_metrics_access(request, request.registry["depproxy.settings"])
    response = Response(body=_service(request).metrics.exposition())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response
