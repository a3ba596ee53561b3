"""Tag lists and referrers: what a client asks of them, and the answers the proxy gives.

The fetching, keeping and stale-on-error is `ProxyService.tag_list` and
`ProxyService.referrers`; this module holds what is pure: query grammar, paging, filtering.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from webob.multidict import MultiDict

from ..errors import RegistryError
from ..names import is_tag
from ..requestlog import Result
from ..upstream.listing import TagPage

# The largest page a client may ask for: at most about 1.3 MiB of JSON.
MAX_PAGE_SIZE = 10_000
# RFC 6838's type/subtype, which an artifactType is.
MEDIA_TYPE_RE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)


def _bad_query(message: str, parameter: str, value: str) -> RegistryError:
    return RegistryError(400, "UNSUPPORTED", message, {parameter: value[:200]})


def _single(params: MultiDict, name: str) -> str | None:
    values = params.getall(name)
    if len(values) > 1:
        raise _bad_query(f"{name} is given more than once", name, ",".join(values))
    return values[0] if values else None


@dataclass(frozen=True)
class TagQuery:
    """A tag list page a client asks for: at most `n` tags, those after `last`."""

    n: int | None = None
    last: str | None = None

    @classmethod
    def of(cls, params: MultiDict) -> TagQuery:
        """The query of a request's parameters; 400 UNSUPPORTED for a bad one."""
        n, last = _single(params, "n"), _single(params, "last")
        if n is not None and (not re.fullmatch(r"[0-9]{1,6}", n) or int(n) > MAX_PAGE_SIZE):
            raise _bad_query(f"n must be a whole number from 0 to {MAX_PAGE_SIZE}", "n", n)
        if last is not None and not is_tag(last):
            raise _bad_query("last must be a tag", "last", last)
        return cls(int(n) if n is not None else None, last)

    @property
    def encoded(self) -> str:
        """`n=..&last=..`, each only when given."""
        return urlencode([(k, v) for k, v in (("n", self.n), ("last", self.last)) if v is not None])


def client_page(page: TagPage, query: TagQuery) -> tuple[list[str], TagQuery | None]:
    """The page a client asked for out of upstream's answer, and the query of the next one.

    The result set is sorted lexically (the spec's order). An upstream that ignored `n` and
    `last` (distribution 2.x does) sent everything: the proxy then cuts the page itself.
    """
    tags = sorted(tag for tag in page.tags if query.last is None or tag > query.last)
    if query.n is not None and len(tags) > query.n:
        tags = tags[: query.n]
        return tags, TagQuery(query.n, tags[-1]) if tags else None
    if page.next_last is not None:
        # The client's n, not upstream's: the next request comes to this proxy.
        return tags, TagQuery(query.n, page.next_last)
    return tags, None


def tag_list_content(tags: list[str], following: TagQuery | None) -> dict[str, Any]:
    """What is kept and served of a tag list page (the client's repository name is added
    when it is served: it is not upstream's)."""
    return {
        "tags": tags,
        "next": None if following is None else {"n": following.n, "last": following.last},
    }


def next_query(content: dict[str, Any]) -> TagQuery | None:
    following = content["next"]
    return None if following is None else TagQuery(following["n"], following["last"])


def artifact_type_of(params: MultiDict) -> str | None:
    """The `artifactType` filter of a referrers request; 400 UNSUPPORTED for a bad one."""
    artifact_type = _single(params, "artifactType")
    if artifact_type is not None and not MEDIA_TYPE_RE.fullmatch(artifact_type):
        raise _bad_query("artifactType must be a media type", "artifactType", artifact_type)
    return artifact_type


def referrers_tag(digest: str) -> str:
    """The tag an OCI 1.1 client keeps a subject's referrers under on a registry without the
    referrers API: `<algorithm>-<hex digest, cut to 64 characters>`."""
    algorithm, _, hex_digest = digest.partition(":")
    return f"{algorithm}-{hex_digest[:64]}"


def of_artifact_type(descriptors: Iterable[dict], artifact_type: str | None) -> list[dict]:
    return [
        d for d in descriptors if artifact_type is None or d.get("artifactType") == artifact_type
    ]


@dataclass(frozen=True)
class Listing:
    """A tag list page or a subject's referrers (`content`), and where it came from."""

    content: dict[str, Any]
    result: Result
    upstream_status: int | None = None
