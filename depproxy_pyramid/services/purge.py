"""Purging a group's cache: it stops serving at once; `depproxy-admin cleanup` destroys later.

Lookups take only rows in the `default` status, so marking a group's rows
`pending_destruction` ends their service when the transaction commits: in the process that
purged once it calls `ProxyService.forget_group`, in the others within
`depproxy.lookup_cache_seconds`. Tags and kept listings are deleted outright: they hold no
object, and a tag left pointing at a purged manifest would only be refetched anyway. A pull
after the purge fetches from upstream again and its commit makes the row `default` once more.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from ..models import CachedBlob, CachedListing, CachedManifest, CachedTag, CacheStatus


@dataclass(frozen=True)
class PurgeCounts:
    """How many of the group's cached manifests and blobs the purge marked."""

    manifests: int
    blobs: int


def purge_group(session: Session, group_id: int) -> PurgeCounts:
    """Mark the group's cached manifests and blobs for destruction, in `session`'s transaction."""
    counts = []
    for model in (CachedManifest, CachedBlob):
        result = session.execute(
            update(model)
            .where(model.group_id == group_id, model.status == CacheStatus.DEFAULT)
            .values(status=CacheStatus.PENDING_DESTRUCTION)
        )
        counts.append(result.rowcount)
    for model in (CachedTag, CachedListing):
        session.execute(delete(model).where(model.group_id == group_id))
    return PurgeCounts(*counts)
