"""Tag lists and OCI 1.1 referrers of proxied images, allowed to whoever may pull the image.

`registry_factory` gives these paths their own targets, so these views, registered for them,
are found before `registry_view`.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from pyramid.request import Request
from pyramid.response import Response
from pyramid.view import view_config

from ..permissions import Permission
from ..requestlog import RequestRecord
from ..services.listing import (
    Listing,
    TagQuery,
    artifact_type_of,
    next_query,
    of_artifact_type,
)
from ..services.proxy import GroupUpstream, ProxyService
from ..upstream import OCI_INDEX
from .registry import (
    PULL_METHODS,
    ReferrersTarget,
    TagListTarget,
    recorded,
)


def _json_response(
    listing: Listing, record: RequestRecord, body: dict, media_type: str
) -> Response:
    record.result = listing.result
    record.upstream_status = listing.upstream_status
    response = Response(body=json.dumps(body).encode(), charset=None)
    response.content_type = media_type
    return response


@view_config(
    route_name="depproxy.registry",
    context=TagListTarget,
    request_method=PULL_METHODS,
    permission=Permission.PULL,
)
def tag_list_view(context: TagListTarget, request: Request) -> Response:
    """`{"name", "tags"}` with the client's own repository name, and a `Link` to the next
    page (on this proxy) when there is one."""
    service: ProxyService = request.registry["depproxy.proxy"]
    name = context.repository.name
    with recorded(request, context, context.kind) as record:
        query = TagQuery.of(request.GET)
        listing = service.tag_list(
            GroupUpstream(context.group.group.id), context.repository.image, query
        )
    body = {"name": name, "tags": listing.content["tags"]}
    response = _json_response(listing, record, body, "application/json")
    following = next_query(listing.content)
    if following is not None:
        response.headers["Link"] = f'</v2/{quote(name)}/tags/list?{following.encoded}>; rel="next"'
    return response


@view_config(
    route_name="depproxy.registry",
    context=ReferrersTarget,
    request_method=PULL_METHODS,
    permission=Permission.PULL,
)
def referrers_view(context: ReferrersTarget, request: Request) -> Response:
    """An OCI image index of the subject's referrers, filtered by `artifactType` when asked
    (and then saying so in `OCI-Filters-Applied`); an empty one when there are none."""
    service: ProxyService = request.registry["depproxy.proxy"]
    with recorded(request, context, context.kind) as record:
        artifact_type = artifact_type_of(request.GET)
        listing = service.referrers(
            GroupUpstream(context.group.group.id), context.repository.image, context.reference
        )
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": of_artifact_type(listing.content["manifests"], artifact_type),
    }
    response = _json_response(listing, record, body, OCI_INDEX)
    if artifact_type is not None:
        response.headers["OCI-Filters-Applied"] = "artifactType"
    return response
