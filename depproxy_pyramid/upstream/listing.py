"""What upstream says when asked for a tag list or a subject's referrers, checked before use.

Neither answer is passed on as upstream sent it: the proxy keeps only the fields it knows, in
the shapes the OCI distribution spec gives them, and writes its own JSON from them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..names import DIGEST_RE, TAG_RE
from .errors import UpstreamInvalid

# 100,000 tags of 20 characters are 2.4 MiB of JSON: room for any repository in use.
MAX_TAG_LIST_SIZE = 16 * 1024**2
# A referrers answer is an image index, bounded as manifests are (all its pages together).
MAX_REFERRERS_SIZE = 4 * 1024**2
# Registries page referrers in the hundreds; past this many pages, upstream is going round.
MAX_REFERRERS_PAGES = 20

NOT_A_TAG_LIST = "upstream sent something that is not a tag list"
NOT_AN_INDEX = "upstream sent something that is not a referrers index"

_NEXT_LINK = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?', re.IGNORECASE)


@dataclass(frozen=True)
class TagPage:
    """One answer to a tag list request; `next_last` is the `last` of the page upstream says
    follows (its `Link` header), when it says one does."""

    tags: tuple[str, ...]
    next_last: str | None = None


def _json_object(content: bytes, message: str) -> dict[str, Any]:
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise UpstreamInvalid(message, detail="not a JSON object")
    return body


def tag_page(content: bytes, link: str) -> TagPage:
    """The tags of an upstream tag list answer and the next page its `Link` names."""
    tags = _json_object(content, NOT_A_TAG_LIST).get("tags", ())
    # Some registries answer `null` for a repository without tags.
    if tags is None:
        tags = []
    if not isinstance(tags, list):
        raise UpstreamInvalid(NOT_A_TAG_LIST, detail=f"tags is a {type(tags).__name__}")
    for tag in tags:
        if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
            raise UpstreamInvalid(NOT_A_TAG_LIST, detail=f"invalid tag {str(tag)[:140]!r}")
    return TagPage(tuple(tags), _next_last(link))


def next_link_query(link: str) -> str | None:
    """The query of the `rel="next"` URL in a `Link` header; None without one.

    Only the query is used: the next page is asked of the same upstream and path, wherever the
    link points.
    """
    match = _NEXT_LINK.search(link)
    return None if match is None else urlsplit(match.group(1)).query


def _next_last(link: str) -> str | None:
    """`last` of the `rel="next"` URL in a `Link` header; None without one."""
    next_query = next_link_query(link)
    if next_query is None:
        return None
    last = parse_qs(next_query).get("last", [None])[-1]
    if last is None or not TAG_RE.fullmatch(last):
        raise UpstreamInvalid(NOT_A_TAG_LIST, detail=f"unusable Link {link[:300]!r}")
    return last


def _descriptor(entry: object) -> dict[str, Any]:
    """The fields of a referrer's descriptor the spec names, each checked."""
    if not isinstance(entry, dict):
        raise UpstreamInvalid(NOT_AN_INDEX, detail="a descriptor is not an object")
    media_type, digest, size = entry.get("mediaType"), entry.get("digest"), entry.get("size")
    if (
        not isinstance(media_type, str)
        or not media_type
        or len(media_type) > 255
        or not isinstance(digest, str)
        or not DIGEST_RE.fullmatch(digest)
        or type(size) is not int
        or size < 0
    ):
        raise UpstreamInvalid(NOT_AN_INDEX, detail=f"invalid descriptor {str(entry)[:300]}")
    descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    artifact_type = entry.get("artifactType")
    if artifact_type is not None:
        if not isinstance(artifact_type, str) or len(artifact_type) > 255:
            raise UpstreamInvalid(NOT_AN_INDEX, detail=f"invalid artifactType in {digest}")
        descriptor["artifactType"] = artifact_type
    annotations = entry.get("annotations")
    if annotations is not None:
        if not isinstance(annotations, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in annotations.items()
        ):
            raise UpstreamInvalid(NOT_AN_INDEX, detail=f"invalid annotations in {digest}")
        descriptor["annotations"] = annotations
    return descriptor


def referrer_descriptors(content: bytes, index_type: str) -> tuple[dict, ...]:
    """The descriptors an image index lists: a referrers answer, or a referrers tag's index.

    `index_type` is an OCI image index's media type; the index's own `mediaType`, when
    present, must be that.
    """
    body = _json_object(content, NOT_AN_INDEX)
    declared = body.get("mediaType")
    if declared is not None and declared != index_type:
        raise UpstreamInvalid(NOT_AN_INDEX, detail=f"media type {str(declared)[:100]!r}")
    manifests = body.get("manifests")
    if not isinstance(manifests, list):
        raise UpstreamInvalid(NOT_AN_INDEX, detail="no manifests list")
    return tuple(_descriptor(entry) for entry in manifests)
