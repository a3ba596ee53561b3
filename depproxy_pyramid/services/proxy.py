"""The caching algorithm: freshness, revalidation, stale-on-error, verify-then-commit.

The service keeps its own short transactions (a fresh session each), apart from the request's
pyramid_tm transaction: a blob fill finishes after the request's transaction has ended, and a
concurrent insert of the same cache row must not poison the request.

A hit asks the database as little as it can: a manifest by digest never changes, so its bytes
stay in memory (a few MiB, least recently used out first), and like a cached blob's row are
looked up again only after `depproxy.lookup_cache_seconds` (a purge elsewhere is seen within
that time); read_at is written in batches (`ReadTimes`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from webob.byterange import Range

from ..caching import MISSING, BoundedCache
from ..credentials import Keyring
from ..errors import RegistryError
from ..metrics import Metrics
from ..models import (
    CachedBlob,
    CachedListing,
    CachedManifest,
    CachedTag,
    CacheStatus,
    Group,
    ListingKind,
)
from ..models.accounts import UpstreamCredential
from ..requestlog import Result
from ..settings import Settings
from ..storage import BlobNotFound, Storage
from ..storage.filesystem import accel_redirect_uri
from ..upstream import (
    ALL_MANIFESTS,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    BlobRef,
    Credentials,
    Manifest,
    ManifestAccept,
    UpstreamAuthFailed,
    UpstreamBadDigest,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotAcceptable,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamRegistry,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..upstream.client import UpstreamClient
from ..upstream.gate import CircuitBreaker, Slot, UpstreamBusy, UpstreamGate, UpstreamHeldBack
from ..upstream.listing import referrer_descriptors
from .fills import BlobFills, BlobTooLarge, Fill, FillError, FillLimits, FillStream
from .leases import HeldLease, Leases
from .listing import (
    Listing,
    TagQuery,
    client_page,
    referrers_tag,
    tag_list_content,
)
from .read_times import ReadTimes

log = logging.getLogger(__name__)

# Manifests are a few KiB: this keeps the thousand or so most recently pulled.
MANIFEST_MEMORY_BYTES = 8 * 1024**2
BLOB_ROWS_KEPT = 4096


@dataclass(frozen=True)
class ServedManifest:
    content: bytes
    media_type: str
    digest: str
    result: Result
    upstream_status: int | None = None


@dataclass(frozen=True)
class StoredBlob:
    """A cached blob: `file` is open at the first byte to send (None for a HEAD), and `span`
    is the half-open byte range asked for (None for the whole blob)."""

    digest: str
    content_type: str
    size: int
    span: tuple[int, int] | None
    file: BinaryIO | None
    result: Result = Result.HIT

    @property
    def length(self) -> int:
        return self.size if self.span is None else self.span[1] - self.span[0]


@dataclass(frozen=True)
class RedirectedBlob:
    """A cached blob that storage serves itself, at `url`."""

    digest: str
    url: str


@dataclass(frozen=True)
class OffloadedBlob:
    """A cached blob that the front-end server sends from storage itself, found at `uri`
    (nginx's `X-Accel-Redirect`); it cuts the range too."""

    digest: str
    content_type: str
    length: int
    partial: bool
    uri: str


@dataclass(frozen=True)
class FilledBlob:
    """A blob streaming from upstream through `fill`, which the response body must close;
    `span` as for `StoredBlob`."""

    fill: FillStream
    span: tuple[int, int] | None


BlobAnswer = StoredBlob | RedirectedBlob | OffloadedBlob | FilledBlob


def byte_span(byte_range: Range | None, size: int | None) -> tuple[int, int] | None:
    """The satisfiable single range asked for, None for the whole blob; 416 otherwise."""
    if byte_range is None or size is None:
        return None
    span = byte_range.range_for_length(size)
    if span is None:
        raise RegistryError(
            416,
            # The spec's list has no code of its own for this: the range lies past the size.
            "SIZE_INVALID",
            "requested range not satisfiable",
            {"size": size},
            {"Content-Range": f"bytes */{size}"},
        )
    return span


@dataclass(frozen=True)
class KeptManifest:
    """A cached manifest's row id and verified bytes, kept in memory by digest."""

    row_id: int
    digest: str
    content: bytes
    content_type: str


@dataclass(frozen=True)
class BlobRecord:
    """A cached blob's row, detached from its session so requests can share it."""

    id: int
    group_id: int
    digest: str
    size: int
    content_type: str
    storage_key: str


@dataclass(frozen=True)
class StoredCredential:
    username: str
    password_encrypted: str = field(repr=False)


@dataclass(frozen=True)
class GroupUpstream:
    """The group a request pulls for. Its path and upstream credentials are looked up only when
    the request goes upstream, in a transaction of the service's own: a hit never needs them."""

    group_id: int


def _stored(rows: Iterable[UpstreamCredential]) -> Mapping[str, StoredCredential]:
    return {r.registry_host: StoredCredential(r.username, r.password_encrypted) for r in rows}


def _digest_matches(digest: str, content: bytes) -> bool:
    algorithm, _, expected = digest.partition(":")
    try:
        return hashlib.new(algorithm, content).hexdigest() == expected
    except ValueError:
        return False


def _manifest_label(image: str, reference: str, accept: ManifestAccept) -> str:
    """How a client's error names the manifest: with the types asked for, unless all four."""
    label = f"{image}@{reference}" if ":" in reference else f"{image}:{reference}"
    return label if accept == ALL_MANIFESTS else f"{label} (as {accept.header})"


def manifest_lease_key(group_id: int, image: str, reference: str, accept: ManifestAccept) -> str:
    """The lease on fetching a group's manifest: hashed, since an image name and an Accept
    header together may be longer than the key column."""
    name = json.dumps([group_id, image, reference, accept.header])
    return f"manifest:{hashlib.sha256(name.encode()).hexdigest()}"


def image_size(manifest: Manifest) -> int | None:
    """The bytes pulling an image moves (its manifest, config and layers); None for an index,
    or for sizes that are not plain non-negative integers (upstream's word, not verified)."""
    if manifest.media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
        return None
    try:
        body = json.loads(manifest.content)
        descriptors = [body["config"], *body["layers"]]
        sizes = [descriptor["size"] for descriptor in descriptors]
    except (ValueError, KeyError, TypeError):
        return None
    if not all(type(size) is int and size >= 0 for size in sizes):
        return None
    return manifest.size + sum(sizes)


def storage_key(kind: str, digest: str) -> str:
    """Where an object's bytes are stored: by digest alone, so that every group that pulls it
    shares one copy (each through a row of its own)."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{kind}/{algorithm}/{hexdigest}"


def upstream_error(error: UpstreamError, unknown_code: str, what: str) -> RegistryError:
    """The registry error a client sees when upstream failed and nothing is cached.

    Its message never repeats the upstream error's own, which can name upstream hosts, ports,
    addresses and redirect targets: those go to the server log, at WARNING.
    """
    if isinstance(error, UpstreamHeldBack):
        # Written to be shown, and not logged per request: the breaker logs when it opens, and
        # the access log and the metrics count the refusals.
        return RegistryError(
            503, "UNAVAILABLE", error.message, None, {"Retry-After": str(error.retry_after)}
        )
    detail = {"upstream_status": error.status} if error.status else None
    particulars = getattr(error, "detail", "")
    log.log(
        logging.INFO if isinstance(error, UpstreamNotFound) else logging.WARNING,
        "upstream failed for %s: %s: %s%s",
        what,
        type(error).__name__,
        error.message,
        f" ({particulars})" if particulars else "",
    )
    if isinstance(error, UpstreamNotAcceptable):
        return RegistryError(
            404,
            unknown_code,
            f"{what} is not available upstream as a type the request's Accept header lists: "
            f"upstream answered with {error.media_type}",
            detail,
            {"Vary": "Accept"},
        )
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
            429, "TOOMANYREQUESTS", "the upstream registry is rate limiting", detail, headers
        )
    if isinstance(error, UpstreamRefused):
        # Names only what the client asked for: an unconfigured registry, an unsafe name.
        return RegistryError(400, "NAME_INVALID", error.message)
    if isinstance(error, UpstreamAuthFailed):
        return RegistryError(
            502,
            "UNKNOWN",
            "upstream authentication failed: the configured credentials were rejected or "
            "missing, or upstream asked for them somewhere they may not go (details in the "
            "server log)",
            detail,
        )
    if isinstance(error, UpstreamBadDigest):
        return RegistryError(502, "UNKNOWN", "upstream sent content that does not match its digest")
    if isinstance(error, UpstreamInvalid):
        reason = error.message  # written to be shown: names no host
    elif isinstance(error, UpstreamTimeout):
        reason = "upstream timed out"
    elif error.status:
        reason = f"upstream answered {error.status}"
    else:
        reason = "upstream could not be reached"
    status = 504 if isinstance(error, UpstreamTimeout) else 503 if error.status == 503 else 502
    return RegistryError(
        status, "UNAVAILABLE", f"the upstream registry is unavailable: {reason}", detail
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
        self.fills = BlobFills(
            storage, functools.partial(storage_key, "blobs"), self._commit_blob
        )
        self.leases = Leases(session_factory)
        self.gate = UpstreamGate(
            settings.upstream_max_in_flight,
            upstreams.registries,
            on_change=lambda registry, state: metrics.upstream_circuit.labels(registry).set(state),
            on_in_flight_change=metrics.upstream_in_flight.inc,
        )
        # Each revalidation holds a slot of the budget: no more can be running than slots.
        self._revalidations = ThreadPoolExecutor(
            settings.upstream_max_in_flight, thread_name_prefix="revalidate"
        )
        self.read_times = ReadTimes(session_factory)
        # Bytes never change, but a purge in another process ends the row they came from: they
        # are looked up again after as long as any other row.
        self._kept_manifests: BoundedCache[tuple[int, str, str], KeptManifest] = BoundedCache(
            MANIFEST_MEMORY_BYTES,
            ttl=settings.lookup_cache_seconds,
            size_of=lambda kept: len(kept.content),
        )
        self._blob_rows: BoundedCache[tuple[int, str], BlobRecord] = BoundedCache(
            BLOB_ROWS_KEPT, ttl=settings.lookup_cache_seconds
        )
        self._fetch_locks: weakref.WeakValueDictionary[str, _KeyLock] = (
            weakref.WeakValueDictionary()
        )
        self._fetch_locks_guard = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self.session_factory() as session, session.begin():
            yield session

    @functools.cached_property
    def keyring(self) -> Keyring:
        return Keyring(self.settings.encryption_keys)

    def _credentials(self, group: GroupUpstream, registry: str) -> Credentials | None:
        """Who this group pulls from `registry` as: its own credentials for that registry, else
        the instance-wide ones if it may use them, else nobody (anonymous)."""
        with self._transaction() as session:
            row = session.get(Group, group.group_id)
            if row is None:
                raise RegistryError(404, "NAME_UNKNOWN", "the group no longer exists")
            path, stored = row.path, _stored(row.upstream_credentials)
        own = stored.get(registry)
        if own is None:
            return self.upstreams.instance_credentials_for(registry, path)
        password = self.keyring.decrypt(own.password_encrypted)
        if password is None:
            # Never another identity instead: that would change what the group can pull.
            log.error(
                "the upstream credentials of group %s for %s do not decrypt with any key in "
                "depproxy.encryption.keys: run `depproxy-admin CONFIG_URI rotate-keys` with the "
                "key they were encrypted under listed, or `depproxy-admin CONFIG_URI proxy "
                "credentials %s --registry %s` to set them again",
                path,
                registry,
                path,
                registry,
            )
            # The registry host stays in the log: the default upstream's may be internal.
            raise RegistryError(
                500,
                "UNKNOWN",
                f"the upstream credentials of group {path!r} cannot be decrypted with the "
                "configured depproxy.encryption.keys: an operator must run `depproxy-admin "
                "CONFIG_URI rotate-keys` with the key they were encrypted under listed, or set "
                "the group's upstream credentials again (details in the server log)",
                {"group": path},
            )
        return Credentials(own.username, password)

    # Manifests

    def manifest(
        self,
        group: GroupUpstream,
        image: str,
        reference: str,
        accept: ManifestAccept = ALL_MANIFESTS,
    ) -> ServedManifest:
        """The manifest for a tag or digest, of a type in `accept`, or 404 MANIFEST_UNKNOWN.

        A tag is asked for, cached and revalidated with `accept`: registries answer a tag by
        what the client accepts (a platform manifest to a client that takes no manifest list).
        A digest names the same bytes whatever the Accept, so it is fetched with all four types
        and kept for every client, but served only to one that accepts its type.
        """
        if ":" not in reference:
            return self._manifest(group, image, reference, accept)
        served = self._manifest(group, image, reference, ALL_MANIFESTS)
        if served.media_type not in accept.media_types:
            raise RegistryError(
                404,
                "MANIFEST_UNKNOWN",
                f"{image}@{reference} is a manifest of type {served.media_type}, which the "
                "request's Accept header does not list",
                {"media_type": served.media_type},
                {"Vary": "Accept"},
            )
        return served

    def _manifest(
        self, group: GroupUpstream, image: str, reference: str, accept: ManifestAccept
    ) -> ServedManifest:
        found = self._lookup_manifest(group.group_id, image, reference, accept)
        if found is not None:
            tag, kept = found
            fresh = tag is None or (
                datetime.now(UTC) - tag.revalidated_at
                < timedelta(seconds=self.settings.freshness_seconds)
            )
            if fresh:
                return ServedManifest(kept.content, kept.content_type, kept.digest, Result.HIT)
            try:
                slot = self.gate.slot(self._registry(image))
            except UpstreamBusy as error:
                self.metrics.upstream_errors.labels("manifest", type(error).__name__).inc()
                return self._stale(image, reference, kept, error)
            return self._revalidate_by_deadline(slot, group, image, reference, accept, kept)
        # Concurrent misses of one manifest, here (the lock) and on other processes (the lease),
        # make one upstream GET, which Docker Hub counts. The ones waiting for it wait on
        # upstream too, so each holds a slot.
        lease_key = manifest_lease_key(group.group_id, image, reference, accept)
        with (
            self._slot(
                self._registry(image),
                "manifest",
                _manifest_label(image, reference, accept),
                "MANIFEST_UNKNOWN",
            ),
            self._fetch_lock(lease_key),
        ):
            while True:
                found = self._lookup_manifest(group.group_id, image, reference, accept)
                if found is None:
                    lease = self.leases.try_acquire(lease_key)
                    if lease is not None:
                        try:
                            # Looked up again: another process may have stored it and let go of
                            # the lease between the first look and this one's taking it.
                            found = self._lookup_manifest(group.group_id, image, reference, accept)
                            if found is None:
                                return self._fetch_manifest(
                                    group, image, reference, accept, result=Result.MISS
                                )
                        finally:
                            lease.release()
                if found is not None:
                    _, kept = found
                    return ServedManifest(kept.content, kept.content_type, kept.digest, Result.HIT)
                # Another process is fetching it: what it stores is this request's answer.
                self.leases.wait_until_free(lease_key)

    def _slot(self, registry: str, kind: str, what: str, unknown_code: str) -> Slot:
        """A slot of the upstream budget, or the registry error telling the client to retry."""
        try:
            return self.gate.slot(registry)
        except UpstreamBusy as error:
            self.metrics.upstream_errors.labels(kind, type(error).__name__).inc()
            raise upstream_error(error, unknown_code, what) from error

    def _registry(self, image: str) -> str:
        """The registry host `image` is pulled from; 400 for a name no registry serves."""
        try:
            client, _ = self.upstreams.resolve(image)
        except UpstreamRefused as error:
            raise upstream_error(error, "NAME_UNKNOWN", image) from error
        return self.upstreams.registry_of(client)

    def _breaker(self, client: UpstreamClient) -> CircuitBreaker:
        return self.gate.breaker(self.upstreams.registry_of(client))

    @contextmanager
    def _fetch_lock(self, key: str) -> Iterator[None]:
        """This process's lock on fetching `key` (a lease key): its requests queue here, so
        one at a time asks the database for the lease."""
        with self._fetch_locks_guard:
            holder = self._fetch_locks.get(key)
            if holder is None:
                holder = self._fetch_locks[key] = _KeyLock()
        # This frame keeps `holder` alive, and so its dictionary entry, while it is held.
        with holder.lock:
            yield

    def _lookup_manifest(
        self, group_id: int, image: str, reference: str, accept: ManifestAccept
    ) -> tuple[CachedTag | None, KeptManifest] | None:
        """The cached manifest for a tag (its answer to `accept`) or digest, with the tag row
        (None for a digest)."""
        tag = None
        if ":" not in reference:
            with self._transaction() as session:
                tag = session.scalar(
                    select(CachedTag).where(
                        CachedTag.group_id == group_id,
                        CachedTag.image == image,
                        CachedTag.tag == reference,
                        CachedTag.accept == accept.header,
                    )
                )
            if tag is None:
                return None
        key = (group_id, image, tag.digest if tag is not None else reference)
        kept = self._kept_manifests.get(key)
        if kept is MISSING:
            kept = self._load_manifest(*key)
            if kept is None:
                return None
            self._kept_manifests.put(key, kept)
        assert isinstance(kept, KeptManifest)
        self.read_times.touch(CachedManifest, kept.row_id)
        return tag, kept

    def _load_manifest(self, group_id: int, image: str, digest: str) -> KeptManifest | None:
        """The manifest from its row and storage; None (refetch it) when storage lost or
        spoiled it."""
        with self._transaction() as session:
            cached = session.scalar(
                select(CachedManifest).where(
                    CachedManifest.group_id == group_id,
                    CachedManifest.image == image,
                    CachedManifest.digest == digest,
                    CachedManifest.status == CacheStatus.DEFAULT,
                )
            )
        if cached is None:
            return None
        try:
            with self.storage.open(cached.storage_key) as stream:
                content = stream.read(cached.size + 1)
        except BlobNotFound:
            log.warning("manifest %s is recorded but missing from storage", digest)
            return None
        if len(content) != cached.size or not _digest_matches(digest, content):
            log.warning("manifest %s in storage does not match its digest; refetching", digest)
            return None
        return KeptManifest(cached.id, digest, content, cached.content_type)

    def _revalidate_by_deadline(
        self,
        slot: Slot,
        group: GroupUpstream,
        image: str,
        tag: str,
        accept: ManifestAccept,
        kept: KeptManifest,
    ) -> ServedManifest:
        """The tag revalidated with upstream, or its cached copy when upstream has not answered
        within `depproxy.upstream.revalidate_timeout`.

        A revalidation past the deadline goes on in the background, under the usual read
        timeout, holding its slot, and updates the tag for the next pull: a slow upstream costs
        a pull no more than the deadline, and counts as hanging only when it really does.
        """

        def revalidate() -> ServedManifest:
            with slot:
                return self._revalidate(group, image, tag, accept, kept)

        future = self._revalidations.submit(revalidate)
        try:
            return future.result(timeout=self.settings.upstream_revalidate_timeout)
        except FutureTimeout:
            log.info(
                "serving %s:%s (%s) from the cache: upstream has not answered its revalidation "
                "within %ss; it goes on in the background",
                image,
                tag,
                kept.digest,
                self.settings.upstream_revalidate_timeout,
            )
            return ServedManifest(kept.content, kept.content_type, kept.digest, Result.STALE)

    def _revalidate(
        self,
        group: GroupUpstream,
        image: str,
        tag: str,
        accept: ManifestAccept,
        cached: KeptManifest,
    ) -> ServedManifest:
        client, name, credentials = self._resolve(group, image)
        try:
            with self._breaker(client).call():
                current = client.head_manifest(name, tag, credentials=credentials, accept=accept)
        except (UpstreamUnavailable, UpstreamRateLimited) as error:
            self.metrics.upstream_errors.labels("manifest", type(error).__name__).inc()
            return self._stale(image, tag, cached, error)
        except UpstreamError as error:
            self.metrics.upstream_errors.labels("manifest", type(error).__name__).inc()
            what = _manifest_label(image, tag, accept)
            raise upstream_error(error, "MANIFEST_UNKNOWN", what) from error
        if current.digest == cached.digest:
            with self._transaction() as session:
                session.execute(
                    CachedTag.__table__.update()
                    .where(
                        CachedTag.group_id == group.group_id,
                        CachedTag.image == image,
                        CachedTag.tag == tag,
                        CachedTag.accept == accept.header,
                    )
                    .values(revalidated_at=datetime.now(UTC))
                )
            return ServedManifest(
                cached.content, cached.content_type, cached.digest, Result.HIT, 200
            )
        return self._fetch_manifest(group, image, tag, accept, result=Result.MISS, stale=cached)

    def _stale(
        self, image: str, reference: str, kept: KeptManifest, error: UpstreamError
    ) -> ServedManifest:
        """The cached copy of a tag, served because upstream failed or was not asked."""
        # Held back, upstream was not asked: the breaker logged once when it opened.
        level = logging.INFO if isinstance(error, UpstreamHeldBack) else logging.WARNING
        log.log(
            level,
            "serving stale %s:%s (%s) because upstream failed: %s%s",
            image,
            reference,
            kept.digest,
            error.message,
            # Whatever upstream sent instead (a non-manifest, say) is neither kept nor served.
            f" ({error.detail})" if isinstance(error, UpstreamInvalid) else "",
        )
        return ServedManifest(
            kept.content, kept.content_type, kept.digest, Result.STALE, error.status
        )

    def _resolve(
        self, group: GroupUpstream, image: str
    ) -> tuple[UpstreamClient, str, Credentials | None]:
        """The upstream of `image`, its name there, and the credentials `group` pulls it with."""
        try:
            client, name = self.upstreams.resolve(image)
        except UpstreamRefused as error:
            raise upstream_error(error, "NAME_UNKNOWN", image) from error
        return client, name, self._credentials(group, self.upstreams.registry_of(client))

    def _fetch_manifest(
        self,
        group: GroupUpstream,
        image: str,
        reference: str,
        accept: ManifestAccept,
        *,
        result: Result,
        stale: KeptManifest | None = None,
    ) -> ServedManifest:
        client, name, credentials = self._resolve(group, image)
        try:
            with self._breaker(client).call():
                manifest = client.get_manifest(
                    name, reference, credentials=credentials, accept=accept
                )
        except UpstreamError as error:
            self.metrics.upstream_errors.labels("manifest", type(error).__name__).inc()
            if stale is not None and isinstance(error, UpstreamUnavailable | UpstreamRateLimited):
                return self._stale(image, reference, stale, error)
            what = _manifest_label(image, reference, accept)
            raise upstream_error(error, "MANIFEST_UNKNOWN", what) from error
        self._store_manifest(group.group_id, image, reference, accept, manifest)
        return ServedManifest(manifest.content, manifest.media_type, manifest.digest, result, 200)

    def _store_manifest(
        self,
        group_id: int,
        image: str,
        reference: str,
        accept: ManifestAccept,
        manifest: Manifest,
    ) -> None:
        key = storage_key("manifests", manifest.digest)
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
                "image_size": image_size(manifest),
                "status": CacheStatus.DEFAULT,
                "read_at": now,
            },
        )
        if ":" not in reference:
            self._record(
                CachedTag,
                {"group_id": group_id, "image": image, "tag": reference, "accept": accept.header},
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

    def blob(
        self, group: GroupUpstream, image: str, digest: str, *, head: bool, byte_range: Range | None
    ) -> BlobAnswer:
        """The blob from the cache, or from upstream (through a fill) when it is not cached or
        storage lost it. A HEAD of an uncached blob asks upstream without fetching it."""
        row = self.cached_blob(group.group_id, digest)
        if row is not None:
            answer = self._stored_blob(row, head, byte_range)
            if answer is not None:
                return answer
            self.forget_blob(row)
        if head:
            ref = self.head_blob_upstream(group, image, digest)
            content_type = ref.media_type or "application/octet-stream"
            return StoredBlob(digest, content_type, ref.size, None, None, Result.MISS)
        stream = self.blob_fill(group, image, digest)
        if stream is None:
            # Another request's fill committed it between our lookup and our join.
            row = self.cached_blob(group.group_id, digest)
            answer = row and self._stored_blob(row, head, byte_range)
            if answer is None:
                raise RegistryError(503, "UNAVAILABLE", "the blob was cached and removed; retry")
            return answer
        with stream.closed_on_error():
            if byte_range is not None:
                # A whole body holds back its last bytes until the digest checks out; a range
                # has no such last byte, so it is cut only from a verified blob (its size known
                # then).
                try:
                    stream.wait_verified()
                except FillError as error:
                    raise error.registry_error(stream.upstream_status) from error
            return FilledBlob(stream, byte_span(byte_range, stream.size))

    def _stored_blob(
        self, row: BlobRecord, head: bool, byte_range: Range | None
    ) -> StoredBlob | RedirectedBlob | OffloadedBlob | None:
        """The cached blob's answer, or None when storage lost it."""
        if head:
            if self.storage.size(row.storage_key) is None:
                return None
            return StoredBlob(row.digest, row.content_type, row.size, None, None)
        span = byte_span(byte_range, row.size)
        url = self.storage.url_for(row.storage_key)
        if url is not None:
            return RedirectedBlob(row.digest, url)
        accel_prefix = self.settings.storage_accel_redirect
        if accel_prefix is not None:
            if self.storage.size(row.storage_key) is None:
                return None
            length = row.size if span is None else span[1] - span[0]
            uri = accel_redirect_uri(accel_prefix, row.storage_key)
            return OffloadedBlob(row.digest, row.content_type, length, span is not None, uri)
        try:
            file = self.storage.open(row.storage_key)
            if span is not None:
                if getattr(file, "seekable", lambda: False)():
                    file.seek(span[0])
                else:
                    file.close()
                    file = self.storage.open_range(row.storage_key, span[0], span[1] - 1)
        except BlobNotFound:
            return None
        return StoredBlob(row.digest, row.content_type, row.size, span, file)

    def cached_blob(self, group_id: int, digest: str) -> BlobRecord | None:
        record = self._blob_rows.get((group_id, digest))
        if record is MISSING:
            with self._transaction() as session:
                row = session.scalar(
                    select(CachedBlob).where(
                        CachedBlob.group_id == group_id,
                        CachedBlob.digest == digest,
                        CachedBlob.status == CacheStatus.DEFAULT,
                    )
                )
            if row is None:
                return None
            record = BlobRecord(
                row.id, group_id, row.digest, row.size, row.content_type, row.storage_key
            )
            self._blob_rows.put((group_id, digest), record)
        assert isinstance(record, BlobRecord)
        self.read_times.touch(CachedBlob, record.id)
        return record

    def forget_group(self, group_id: int) -> None:
        """Drop what this process keeps in memory of the group's cache, after a purge."""
        self._kept_manifests.discard_where(lambda key: key[0] == group_id)
        self._blob_rows.discard_where(lambda key: key[0] == group_id)

    def forget_blob(self, row: BlobRecord) -> None:
        """Drop a row whose object vanished from storage, so the next request refills it."""
        log.warning("blob %s is recorded but missing from storage; refetching", row.digest)
        self._blob_rows.discard((row.group_id, row.digest))
        with self._transaction() as session:
            session.execute(CachedBlob.__table__.delete().where(CachedBlob.id == row.id))

    def head_blob_upstream(self, group: GroupUpstream, image: str, digest: str) -> BlobRef:
        client, name, credentials = self._resolve(group, image)
        try:
            with self.gate.call(self.upstreams.registry_of(client)):
                ref = client.head_blob(name, digest, credentials=credentials)
        except UpstreamError as error:
            self.metrics.upstream_errors.labels("blob", type(error).__name__).inc()
            raise upstream_error(error, "BLOB_UNKNOWN", digest) from error
        if ref.size > self.settings.blob_max_size:
            log.warning("blob %s declared %d bytes upstream: over the limit", digest, ref.size)
            raise BlobTooLarge.over(self.settings.blob_max_size).registry_error()
        return ref

    def blob_fill(self, group: GroupUpstream, image: str, digest: str) -> FillStream | None:
        """A read of the fill serving this blob (joined or started), or None when it is now
        cached. The stream holds a slot of the upstream budget until it is closed."""
        client, name, credentials = self._resolve(group, image)
        breaker = self._breaker(client)

        def open_upstream():
            with breaker.call():
                self.metrics.upstream_fetches.inc()
                return client.open_blob(name, digest, credentials=credentials)

        try:
            # Refused here rather than by a fill of its own, which would log its failure.
            breaker.check()
        except UpstreamHeldBack as error:
            self.metrics.upstream_errors.labels("blob", type(error).__name__).inc()
            raise upstream_error(error, "BLOB_UNKNOWN", digest) from error
        slot = self._slot(self.upstreams.registry_of(client), "blob", digest, "BLOB_UNKNOWN")
        try:
            fill = self._joined_or_started_fill(group, image, digest, open_upstream)
            if fill is not None:
                self._wait_started(fill, digest)
        except BaseException:
            slot.release()
            raise
        if fill is None:
            slot.release()
            return None
        return FillStream(fill, slot.release)

    def _joined_or_started_fill(
        self, group: GroupUpstream, image: str, digest: str, open_upstream
    ) -> Fill | None:
        """The fill of this process to read the blob from, or None when the group has it now.

        One request per process and group at a time looks: the others queue behind it and
        then find the fill it started, or the blob cached. While another process (or another
        group here) holds the lease, the one looking waits for it to end: the object is then
        stored, and this group's row one upstream HEAD away.
        """
        lease_key = f"blob:{digest}"
        with self._fetch_lock(f"{lease_key}:{group.group_id}"):
            while True:
                fill = self.fills.running(group.group_id, digest)
                if fill is not None:
                    return fill
                if self.cached_blob(group.group_id, digest) is not None:
                    return None
                lease = self.leases.try_acquire(lease_key)
                if lease is not None:
                    # Looked at again with the lease held: another process may have stored the
                    # blob and let go of the lease just before this one took it. Another
                    # group's object is looked for only here: linking it costs an upstream HEAD.
                    try:
                        linked = self._cached_or_linked(group, image, digest)
                    except BaseException:
                        lease.release()
                        raise
                    if linked:
                        lease.release()
                        return None
                    return self._start_fill(group, digest, open_upstream, lease)
                self.leases.wait_until_free(lease_key)

    def _cached_or_linked(self, group: GroupUpstream, image: str, digest: str) -> bool:
        """Whether the group has the blob now, its row found or made for an object another
        group stored.

        Bytes are shared, access is not: the group's own upstream must confirm (HEAD, nothing
        transferred) that this group may pull the blob before it gets a row.
        """
        if self.cached_blob(group.group_id, digest) is not None:
            return True
        key = storage_key("blobs", digest)
        with self._transaction() as session:
            stored = session.execute(
                select(CachedBlob.size, CachedBlob.content_type)
                .where(CachedBlob.storage_key == key, CachedBlob.status == CacheStatus.DEFAULT)
                .limit(1)
            ).first()
        if stored is None or self.storage.size(key) != stored.size:
            return False
        self.head_blob_upstream(group, image, digest)
        self._record(
            CachedBlob,
            {"group_id": group.group_id, "digest": digest},
            {
                "size": stored.size,
                "content_type": stored.content_type,
                "storage_key": key,
                "status": CacheStatus.DEFAULT,
                "read_at": datetime.now(UTC),
            },
        )
        return True

    def _start_fill(
        self, group: GroupUpstream, digest: str, open_upstream, lease: HeldLease
    ) -> Fill | None:
        """A fill started under `lease`, which it releases when it ends; or the one already
        running, or None when the blob has been cached since."""
        return self.fills.join_or_start(
            group.group_id,
            digest,
            lambda: self.cached_blob(group.group_id, digest) is not None,
            open_upstream,
            FillLimits(self.settings.blob_max_size, self.settings.spool_max_disk_share),
            on_end=lease.release,
        )

    def _wait_started(self, fill: Fill, digest: str) -> None:
        """Return once upstream answered the fill; raise its failure as a registry error."""
        try:
            fill.wait_started()
        except UpstreamError as error:
            self.metrics.upstream_errors.labels("blob", type(error).__name__).inc()
            raise upstream_error(error, "BLOB_UNKNOWN", digest) from error
        except FillError as error:
            raise error.registry_error(fill.upstream_status) from error
        except Exception as error:
            # The fill logged it; its text (a spool path, say) is not the client's business.
            raise RegistryError(
                502, "UNKNOWN", "fetching the blob failed; the details are in the server log"
            ) from error

    def _commit_blob(self, group_id: int, fill: Fill) -> None:
        assert fill.size is not None
        self._record(
            CachedBlob,
            {"group_id": group_id, "digest": fill.digest},
            {
                "size": fill.size,
                "content_type": fill.content_type,
                "storage_key": fill.storage_key,
                "status": CacheStatus.DEFAULT,
                "read_at": datetime.now(UTC),
            },
        )

    # Tag lists and referrers

    def tag_list(self, group: GroupUpstream, image: str, query: TagQuery) -> Listing:
        """A page of the image's tags, from upstream, or as it last answered when it fails."""

        def fetch(client: UpstreamClient, name: str, credentials: Credentials | None) -> dict:
            page = client.list_tags(name, query.n, query.last, credentials=credentials)
            return tag_list_content(*client_page(page, query))

        what = f"the tag list of {image}" + (f"?{query.encoded}" if query.encoded else "")
        return self._listing(group, image, ListingKind.TAGS, query.encoded, what, fetch)

    def referrers(self, group: GroupUpstream, image: str, digest: str) -> Listing:
        """The descriptors of the manifests whose subject is `digest`, all artifact types:
        upstream's referrers API, else the subject's referrers tag, else none."""

        def fetch(client: UpstreamClient, name: str, credentials: Credentials | None) -> dict:
            return {"manifests": list(client.get_referrers(name, digest, credentials=credentials))}

        return self._listing(
            group,
            image,
            ListingKind.REFERRERS,
            digest,
            f"the referrers of {image}@{digest}",
            fetch,
            without_api=lambda: self._referrers_from_tag(group, image, digest),
        )

    def _referrers_from_tag(self, group: GroupUpstream, image: str, digest: str) -> dict:
        """What the subject's referrers tag lists: an OCI 1.1 client that pushes an artifact
        to a registry without the referrers API keeps its descriptor in this index. The tag is
        pulled like any other, so it is cached like any other."""
        try:
            manifest = self.manifest(group, image, referrers_tag(digest))
        except RegistryError as error:
            if error.code == "MANIFEST_UNKNOWN":
                return {"manifests": []}
            raise
        if manifest.media_type != OCI_INDEX:
            log.info("the referrers tag of %s@%s is no image index: no referrers", image, digest)
            return {"manifests": []}
        return {"manifests": list(referrer_descriptors(manifest.content, OCI_INDEX))}

    def _listing(
        self,
        group: GroupUpstream,
        image: str,
        kind: ListingKind,
        query: str,
        what: str,
        fetch: Callable[[UpstreamClient, str, Credentials | None], dict],
        without_api: Callable[[], dict] | None = None,
    ) -> Listing:
        """Upstream's answer, kept; the kept one when upstream fails (unavailable, timing out,
        429, its breaker open or the budget full) or when it was fetched within
        `depproxy.manifest.freshness_seconds`, as a tag is. `without_api` answers when
        upstream answers 404."""
        keys = {"group_id": group.group_id, "image": image, "kind": kind, "query": query}
        with self._transaction() as session:
            kept = session.scalar(select(CachedListing).filter_by(**keys))
        now = datetime.now(UTC)
        if kept is not None and now - kept.fetched_at < timedelta(
            seconds=self.settings.freshness_seconds
        ):
            return Listing(json.loads(kept.content), Result.HIT)
        upstream_status: int | None = 200
        try:
            try:
                with self.gate.slot(self._registry(image)):
                    client, name, credentials = self._resolve(group, image)
                    with self._breaker(client).call():
                        content = fetch(client, name, credentials)
            except UpstreamNotFound as error:
                if without_api is None:
                    raise
                upstream_status = error.status
                try:
                    content = without_api()
                except RegistryError as failure:
                    # The fallback failed upstream in turn (its error already as a client sees
                    # it): the kept answer still beats none, as for the API's own failure.
                    if kept is None or not (failure.status >= 500 or failure.status == 429):
                        raise
                    log.warning(
                        "serving %s as kept at %s because upstream failed: %s",
                        what,
                        kept.fetched_at.isoformat(timespec="seconds"),
                        failure.message,
                    )
                    return Listing(json.loads(kept.content), Result.STALE, failure.status)
        except (UpstreamUnavailable, UpstreamRateLimited) as error:
            self.metrics.upstream_errors.labels(kind, type(error).__name__).inc()
            if kept is None:
                raise upstream_error(error, "NAME_UNKNOWN", what) from error
            log.log(
                logging.INFO if isinstance(error, UpstreamHeldBack) else logging.WARNING,
                "serving %s as kept at %s because upstream failed: %s%s",
                what,
                kept.fetched_at.isoformat(timespec="seconds"),
                error.message,
                f" ({error.detail})" if isinstance(error, UpstreamInvalid) else "",
            )
            return Listing(json.loads(kept.content), Result.STALE, error.status)
        except UpstreamError as error:
            self.metrics.upstream_errors.labels(kind, type(error).__name__).inc()
            raise upstream_error(error, "NAME_UNKNOWN", what) from error
        self._record(CachedListing, keys, {"content": json.dumps(content), "fetched_at": now})
        return Listing(content, Result.MISS, upstream_status)
