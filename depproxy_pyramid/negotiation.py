"""Which manifest types a client accepts, from its `Accept` header (RFC 9110, 12.5.1).

Only acceptance matters, not preference: registries choose by which types are listed, so
q-values decide only whether a type is acceptable at all (`q=0` refuses it). A type's q-value
is that of the most specific range naming it (`application/vnd.oci.image.index.v1+json` over
`application/*` over `*/*`). A malformed element is skipped on its own: WebOb's parser treats a
whole header with one bad element as absent, which would hand a schema-2-only client an index.
Media type parameters other than q are ignored, as registries ignore them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

from .errors import RegistryError
from .upstream.client import ALL_MANIFESTS, MANIFEST_TYPES, ManifestAccept

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
# Clients send a handful of distinct headers; this keeps parsing off the path of a cached pull.
_PARSED_HEADERS = 256


def _media_ranges(header: str) -> Iterator[tuple[str, float]]:
    """(media range, q-value) of each well-formed element, the range in lower case."""
    for element in header.split(","):
        media_range, *parameters = element.split(";")
        media_range = media_range.strip().lower()
        kind, slash, subtype = media_range.partition("/")
        if not (slash and _TOKEN.fullmatch(kind) and _TOKEN.fullmatch(subtype)):
            continue
        if kind == "*" and subtype != "*":
            continue
        quality: float | None = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                quality = float(value) if _QVALUE.fullmatch(value) else None
                # What follows q are accept-extensions, not media type parameters.
                break
        if quality is not None:
            yield media_range, quality


def _quality(media_type: str, ranges: list[tuple[str, float]]) -> float:
    """The q-value of the most specific range matching `media_type` (the highest among equally
    specific ones); 0 when none matches."""
    specificity = {media_type: 2, media_type.partition("/")[0] + "/*": 1, "*/*": 0}
    best = (-1, 0.0)
    for media_range, quality in ranges:
        rank = specificity.get(media_range)
        if rank is not None:
            best = max(best, (rank, quality))
    return best[1]


@functools.lru_cache(maxsize=_PARSED_HEADERS)
def accepted_manifests(header: str | None) -> ManifestAccept:
    """The manifest types a pull with this `Accept` header accepts. No header, or an empty one,
    accepts all four; a header accepting none of them is answered 404 MANIFEST_UNKNOWN, since
    no manifest we can serve would do."""
    if header is None or not header.strip():
        return ALL_MANIFESTS
    ranges = list(_media_ranges(header))
    accepted = [t for t in MANIFEST_TYPES if _quality(t, ranges) > 0]
    if not accepted:
        raise RegistryError(
            404,
            "MANIFEST_UNKNOWN",
            "the request's Accept header lists none of the manifest types the dependency proxy "
            f"serves: {', '.join(MANIFEST_TYPES)}",
            {"accept": header[:300]},
            {"Vary": "Accept"},
        )
    return ManifestAccept.of(accepted)
