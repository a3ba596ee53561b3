"""The caching algorithm: freshness, revalidation, stale-on-error, verify-then-commit.

The service keeps its own short transactions (a fresh session each), apart from the request's
pyramid_tm transaction: a blob fill finishes after the request's transaction has ended, and a
concurrent insert of the same cache row must not poison the request.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..credentials import decrypt_secret
from ..errors import RegistryError
from ..metrics import Metrics
from ..models import CachedBlob, CachedManifest, CachedTag, CacheStatus, ProxySettings
from ..settings import Settings
from ..storage import BlobNotFound, Storage
from ..upstream import (
    BlobRef,
    Credentials,
    UpstreamAuthFailed,
    UpstreamBadDigest,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamRegistry,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .fills import BlobFills, Fill

log = logging.getLogger(__name__)

# read_at only needs day-level precision for TTL cleanup; touching it at most hourly keeps hits
# from taking a write lock on every request.
READ_AT_GRANULARITY = timedelta(hours=1)


@dataclass(frozen=True)
class ServedManifest:
    content: bytes
    media_type: str
    digest: str
    # hit: from cache, fresh or confirmed upstream; miss: fetched now; stale: upstream failed
    result: str
    upstream_status: int | None = None


@dataclass(frozen=True)
class GroupUpstream:
    """Everything about a group the proxy needs, detached from the request's session."""

    group_id: int
    credentials: Credentials | None


def storage_key(group_id: int, kind: str, digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"{group_id}/{kind}/{algorithm}/{hexdigest}"


def upstream_error(error: UpstreamError, unknown_code: str, what: str) -> RegistryError:
    """The registry error a client sees when upstream failed and nothing is cached."""
    detail = {"upstream_status": error.status} if error.status else None
    if isinstance(error, UpstreamNotFound):
        return RegistryError(
            404,
            unknown_code,
            f"{what} was not found upstream, or the upstream denied access (for a private "
            "image, set the group's upstream credentials)",
            detail,
        )
    if isinstance(error, UpstreamRateLimited):
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else {}
        return RegistryError(
            429,
            "TOOMANYREQUESTS",
            f"the upstream registry is rate limiting: {error.message}",
            detail,
            headers,
        )
    if isinstance(error, UpstreamRefused):
        return RegistryError(400, "NAME_INVALID", error.message)
    if isinstance(error, UpstreamAuthFailed):
        return RegistryError(
            502,
            "UNKNOWN",
            f"the upstream registry rejected the configured credentials: {error.message}",
            detail,
        )
    if isinstance(error, UpstreamBadDigest):
        return RegistryError(502, "UNKNOWN", f"upstream sent corrupt content: {error.message}")
    status = 504 if isinstance(error, UpstreamTimeout) else 503 if error.status == 503 else 502
    return RegistryError(
        status, "UNAVAILABLE", f"the upstream registry is unavailable: {error.message}", detail
    )


class _KeyLock:
    """A lock that can live in a WeakValueDictionary, so idle keys cost nothing."""

    __slots__ = ("lock", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()


class ProxyService:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        upstreams: UpstreamRegistry,
        session_factory: sessionmaker[Session],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.upstreams = upstreams
        self.session_factory = session_factory
        self.metrics = metrics
        self.fills = BlobFills(storage.spool_dir, self._commit_blob)
        self._manifest_locks: weakref.WeakValueDictionary[tuple[int, str, str], _KeyLock] = (
            weakref.WeakValueDictionary()
        )
        self._manifest_locks_guard = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self.session_factory() as session, session.begin():
            yield session

    def group_upstream(self, group_id: int, settings: ProxySettings | None) -> GroupUpstream:
        credentials = None
        if settings is not None and settings.upstream_username:
            password = decrypt_secret(
                self.settings.jwt_secret, settings.upstream_password_encrypted or ""
            )
            if password is None:
                log.error(
                    "upstream credentials of group %s cannot be decrypted with the current "
                    "depproxy.jwt.secret; pulling anonymously",
                    group_id,
                )
            else:
                credentials = Credentials(settings.upstream_username, password)
        return GroupUpstream(group_id, credentials)

    # Manifests

    def manifest(self, group: GroupUpstream, image: str, reference: str) -> ServedManifest:
        found = self._lookup_manifest(group.group_id, image, reference)
        if found is not None:
            tag, cached, content = found
            fresh = tag is None or (
                datetime.now(UTC) - tag.revalidated_at
                < timedelta(seconds=self.settings.freshness_seconds)
            )
            if fresh:
                return ServedManifest(content, cached.content_type, cached.digest, "hit")
            return self._revalidate(group, image, reference, cached, content)
        # Concurrent misses of one manifest make one upstream GET, which Docker Hub counts.
        with self._manifest_fetch_lock((group.group_id, image, reference)):
            found = self._lookup_manifest(group.group_id, image, reference)
            if found is not None:
                _, cached, content = found
                return ServedManifest(content, cached.content_type, cached.digest, "hit")
            return self._fetch_manifest(group, image, reference, result="miss")

    @contextmanager
    def _manifest_fetch_lock(self, key: tuple[int, str, str]) -> Iterator[None]:
        with self._manifest_locks_guard:
            holder = self._manifest_locks.get(key)
            if holder is None:
                holder = self._manifest_locks[key] = _KeyLock()
        # This frame keeps `holder` alive, and so its dictionary entry, while it is held.
        with holder.lock:
            yield

    def _lookup_manifest(
        self, group_id: int, image: str, reference: str
    ) -> tuple[CachedTag | None, CachedManifest, bytes] | None:
        """The cached manifest for a tag or digest, with the tag row and its bytes."""
        with self._transaction() as session:
            tag = None
            if ":" in reference:
                cached = self._cached_manifest(session, group_id, image, reference)
            else:
                tag = session.scalar(
                    select(CachedTag).where(
                        CachedTag.group_id == group_id,
                        CachedTag.image == image,
                        CachedTag.tag == reference,
                    )
                )
                cached = tag and self._cached_manifest(session, group_id, image, tag.digest)
            if cached is None:
                return None
            content = self._read_manifest(cached)
            if content is None:
                return None
            self._touch(cached, datetime.now(UTC))
            return tag, cached, content

    def _cached_manifest(
        self, session: Session, group_id: int, image: str, digest: str
    ) -> CachedManifest | None:
        return session.scalar(
            select(CachedManifest).where(
                CachedManifest.group_id == group_id,
                CachedManifest.image == image,
                CachedManifest.digest == digest,
                CachedManifest.status == CacheStatus.DEFAULT,
            )
        )

    def _read_manifest(self, cached: CachedManifest) -> bytes | None:
        try:
            with self.storage.open(cached.storage_key) as stream:
                content = stream.read(cached.size + 1)
        except BlobNotFound:
            log.warning("manifest %s is recorded but missing from storage", cached.digest)
            return None
        if len(content) != cached.size:
            log.warning("manifest %s in storage has the wrong size; refetching", cached.digest)
            return None
        return content

    def _touch(self, row: CachedManifest | CachedBlob, now: datetime) -> None:
        if now - row.read_at > READ_AT_GRANULARITY:
            row.read_at = now

    def _revalidate(
        self,
        group: GroupUpstream,
        image: str,
        tag: str,
        cached: CachedManifest,
        content: bytes,
    ) -> ServedManifest:
        client, name = self._resolve(image)
        try:
            current = client.head_manifest(
                name,
                tag,
                credentials=group.credentials,
                read_timeout=self.settings.upstream_revalidate_timeout,
            )
        except (UpstreamUnavailable, UpstreamRateLimited) as error:
            self.metrics.upstream_errors.labels("manifest", type(error).__name__).inc()
            log.warning(
                "serving stale %s:%s (%s) because upstream failed: %s",
                image,
                tag,
                cached.digest,
                error.message,
            )
            return ServedManifest(
                content, cached.content_type, cached.digest, "stale", error.status
            )
        except UpstreamError as error:
            self.metrics.upstream_errors.labels("manifest", type(error).__name__).inc()
            raise upstream_error(error, "MANIFEST_UNKNOWN", f"{image}:{tag}") from error
        if current.digest == cached.digest:
            with self._transaction() as session:
                session.execute(
                    CachedTag.__table__.update()
                    .where(
                        CachedTag.group_id == group.group_id,
                        CachedTag.image == image,
                        CachedTag.tag == tag,
                    )
                    .values(revalidated_at=datetime.now(UTC))
                )
            return ServedManifest(content, cached.content_type, cached.digest, "hit", 200)
        return self._fetch_manifest(group, image, tag, result="miss", stale=(cached, content))

    def _resolve(self, image: str):
        try:
            return self.upstreams.resolve(image)
        except UpstreamRefused as error:
            raise upstream_error(error, "NAME_UNKNOWN", image) from error

    def _fetch_manifest(
        self,
        group: GroupUpstream,
        image: str,
        reference: str,
        *,
        result: str,
        stale: tuple[CachedManifest, bytes] | None = None,
    ) -> ServedManifest:
        client, name = self._resolve(image)
        try:
            manifest = client.get_manifest(name, reference, credentials=group.credentials)
        except UpstreamError as error:
            self.metrics.upstream_errors.labels("manifest", type(error).__name__).inc()
            if stale is not None and isinstance(error, UpstreamUnavailable | UpstreamRateLimited):
                cached, content = stale
                return ServedManifest(content, cached.content_type, cached.digest, "stale")
            raise upstream_error(error, "MANIFEST_UNKNOWN", f"{image}:{reference}") from error
        self._store_manifest(group.group_id, image, reference, manifest)
        return ServedManifest(manifest.content, manifest.media_type, manifest.digest, result, 200)

    def _store_manifest(self, group_id: int, image: str, reference: str, manifest) -> None:
        key = storage_key(group_id, "manifests", manifest.digest)
        fd, path = tempfile.mkstemp(dir=self.storage.spool_dir, prefix="manifest-")
        with os.fdopen(fd, "wb") as spool:
            spool.write(manifest.content)
        self.storage.put_file(key, path)
        now = datetime.now(UTC)
        self._record(
            CachedManifest,
            {"group_id": group_id, "image": image, "digest": manifest.digest},
            {
                "size": manifest.size,
                "content_type": manifest.media_type,
                "storage_key": key,
                "status": CacheStatus.DEFAULT,
                "read_at": now,
            },
        )
        if ":" not in reference:
            self._record(
                CachedTag,
                {"group_id": group_id, "image": image, "tag": reference},
                {"digest": manifest.digest, "revalidated_at": now},
            )

    def _record(self, model: type, keys: dict, values: dict) -> None:
        """Insert or update one cache row in a transaction of its own."""
        for attempt in range(2):
            try:
                with self._transaction() as session:
                    row = session.scalar(select(model).filter_by(**keys))
                    if row is None:
                        session.add(model(**keys, **values))
                    else:
                        for name, value in values.items():
                            setattr(row, name, value)
                return
            except IntegrityError:
                # Another request inserted the same row first; the retry updates it.
                if attempt:
                    raise

    # Blobs

    def cached_blob(self, group_id: int, digest: str) -> CachedBlob | None:
        with self._transaction() as session:
            row = session.scalar(
                select(CachedBlob).where(
                    CachedBlob.group_id == group_id,
                    CachedBlob.digest == digest,
                    CachedBlob.status == CacheStatus.DEFAULT,
                )
            )
            if row is not None:
                self._touch(row, datetime.now(UTC))
            return row

    def forget_blob(self, row: CachedBlob) -> None:
        """Drop a row whose object vanished from storage, so the next request refills it."""
        log.warning("blob %s is recorded but missing from storage; refetching", row.digest)
        with self._transaction() as session:
            session.execute(CachedBlob.__table__.delete().where(CachedBlob.id == row.id))

    def head_blob_upstream(self, group: GroupUpstream, image: str, digest: str) -> BlobRef:
        client, name = self._resolve(image)
        try:
            return client.head_blob(name, digest, credentials=group.credentials)
        except UpstreamError as error:
            self.metrics.upstream_errors.labels("blob", type(error).__name__).inc()
            raise upstream_error(error, "BLOB_UNKNOWN", digest) from error

    def blob_fill(self, group: GroupUpstream, image: str, digest: str) -> Fill | None:
        """The fill serving this blob (joined or started), or None when it is now cached."""
        client, name = self._resolve(image)

        def open_upstream():
            self.metrics.upstream_fetches.inc()
            return client.open_blob(name, digest, credentials=group.credentials)

        fill = self.fills.join_or_start(
            group.group_id,
            digest,
            lambda: self.cached_blob(group.group_id, digest) is not None,
            open_upstream,
        )
        if fill is None:
            return None
        try:
            fill.wait_started()
        except UpstreamError as error:
            self.metrics.upstream_errors.labels("blob", type(error).__name__).inc()
            raise upstream_error(error, "BLOB_UNKNOWN", digest) from error
        except Exception as error:
            raise RegistryError(502, "UNKNOWN", f"fetching the blob failed: {error}") from error
        return fill

    def _commit_blob(self, group_id: int, fill: Fill) -> None:
        key = storage_key(group_id, "blobs", fill.digest)
        self.storage.put_file(key, fill.spool_path)
        assert fill.size is not None
        self._record(
            CachedBlob,
            {"group_id": group_id, "digest": fill.digest},
            {
                "size": fill.size,
                "content_type": fill.content_type,
                "storage_key": key,
                "status": CacheStatus.DEFAULT,
                "read_at": datetime.now(UTC),
            },
        )
