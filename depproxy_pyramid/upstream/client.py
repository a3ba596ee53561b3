"""The pull half of the OCI distribution API against one upstream registry."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

import requests

from ..names import DIGEST_RE, IMAGE_SEGMENT_RE, TAG_RE
from .challenge import parse_challenges
from .errors import (
    UpstreamAuthFailed,
    UpstreamBadDigest,
    UpstreamNotAcceptable,
    UpstreamRefused,
    UpstreamUnavailable,
)
from .listing import (
    MAX_REFERRERS_PAGES,
    MAX_REFERRERS_SIZE,
    MAX_TAG_LIST_SIZE,
    NOT_AN_INDEX,
    TagPage,
    next_link_query,
    referrer_descriptors,
    tag_page,
)
from .tokens import Credentials, RealmPolicy, TokenCache
from .transport import (
    AddressGuard,
    BlobResponse,
    Transport,
    UpstreamInvalid,
    content_length,
    content_type_of,
    raise_for_status,
    read_capped,
)

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

# The four current manifest formats, in the order we list them when asking upstream. Never
# "*/*": registries negotiate on Accept, and anything broader lets them answer with legacy
# schema1 (whose signed bytes do not hash to the digest the registry reports).
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)
MANIFEST_MEDIA_TYPES = frozenset(MANIFEST_TYPES)
# Docker's schema 1, which registries still convert to for clients that accept neither the
# manifest list nor schema 2 they hold. We never serve it.
_SCHEMA1_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
NOT_A_MANIFEST = "upstream sent something that is not a manifest"


@dataclass(frozen=True)
class ManifestAccept:
    """The manifest types a pull accepts (some of the four), and `header`, the Accept that asks
    upstream for exactly them. The order is fixed, so one set always makes one header: it is
    what a tag's cached answer is keyed by."""

    media_types: frozenset[str]
    header: str

    @classmethod
    def of(cls, media_types: Iterable[str]) -> ManifestAccept:
        chosen = frozenset(media_types)
        if not chosen or not chosen <= MANIFEST_MEDIA_TYPES:
            raise ValueError(f"not a set of manifest media types: {sorted(chosen)}")
        return cls(chosen, ", ".join(t for t in MANIFEST_TYPES if t in chosen))


# What docker, containerd and podman accept. Registries answer them with the richest form (an
# index for a multi-arch image), which is what a digest in an index or list refers to.
ALL_MANIFESTS = ManifestAccept.of(MANIFEST_TYPES)
MANIFEST_ACCEPT = ALL_MANIFESTS.header

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
# Some registries omit Content-Type or send a generic one; then the manifest's own mediaType
# field is the only source of truth.
_GENERIC_CONTENT_TYPES = frozenset(
    {"", "application/json", "text/plain", "application/octet-stream"}
)
_DIGEST = re.compile(r"(sha256|sha512):([a-f0-9]+)")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class ManifestRef:
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Manifest:
    content: bytes = field(repr=False)
    media_type: str
    digest: str

    @property
    def size(self) -> int:
        return len(self.content)


@dataclass(frozen=True)
class BlobRef:
    size: int
    media_type: str | None


def _check_name(name: str) -> None:
    if not all(IMAGE_SEGMENT_RE.match(segment) for segment in name.split("/")):
        raise UpstreamRefused(f"refusing unsafe repository name {name!r}")


def _check_digest(digest: str) -> tuple[str, str]:
    if DIGEST_RE.match(digest) is None:
        raise UpstreamRefused(f"refusing unsupported or malformed digest {digest!r}")
    algorithm, _, hex_digest = digest.partition(":")
    return algorithm, hex_digest


def _is_digest(reference: str) -> bool:
    if ":" in reference:
        _check_digest(reference)
        return True
    if TAG_RE.match(reference) is None:
        raise UpstreamRefused(f"refusing malformed tag {reference!r}")
    return False


def _manifest_label(name: str, reference: str) -> str:
    return f"manifest {name}{'@' if ':' in reference else ':'}{reference}"


def manifest_media_type(content_type: str, content: bytes) -> str:
    """The media type of what upstream sent as a manifest; UpstreamInvalid unless it is one.

    A manifest is a JSON object with `schemaVersion` 2 in one of the four formats we ask for;
    its `mediaType`, when present, must agree with the Content-Type. A generic Content-Type
    leaves the body's own `mediaType` as the only word on the format.
    """
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise UpstreamInvalid(NOT_A_MANIFEST, detail=f"{content_type or 'untyped'} non-JSON body")
    version = body.get("schemaVersion")
    if type(version) is not int or version != 2:
        raise UpstreamInvalid(NOT_A_MANIFEST, detail=f"schemaVersion {version!r}")
    embedded = body.get("mediaType")
    media_type = embedded if content_type in _GENERIC_CONTENT_TYPES else content_type
    if not isinstance(media_type, str) or media_type not in MANIFEST_MEDIA_TYPES:
        detail = f"media type {str(media_type)[:100]!r}"
        raise UpstreamInvalid(NOT_A_MANIFEST, detail=detail)
    if "mediaType" in body and embedded != media_type:
        raise UpstreamInvalid(
            NOT_A_MANIFEST,
            detail=f"Content-Type {media_type} but mediaType {str(embedded)[:100]!r}",
        )
    return media_type


def check_acceptable(media_type: str, accept: ManifestAccept, what: str) -> None:
    """UpstreamNotAcceptable when upstream answered with a manifest type that was not asked for:
    one of the four outside `accept`, or schema 1. Anything else is left to the caller."""
    if media_type in _SCHEMA1_MEDIA_TYPES or (
        media_type in MANIFEST_MEDIA_TYPES and media_type not in accept.media_types
    ):
        raise UpstreamNotAcceptable(
            f"upstream answered {what} with {media_type}, which was not asked for",
            media_type=media_type,
        )


class UpstreamClient:
    """Pull-only client for one upstream registry, safe to share between threads.

    It has no credentials of its own: each call names the ones it pulls with (None is
    anonymous), and `realms` decides which token realms may receive them.
    """

    def __init__(
        self,
        base_url: str,
        *,
        realms: RealmPolicy | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        user_agent: str = "depproxy-pyramid",
        guard: AddressGuard | None = None,
    ) -> None:
        """`guard` says where redirects may lead; by default public addresses and this
        upstream itself."""
        parts = urlsplit(base_url)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.username is not None
            or parts.query
        ):
            # No URL in the message: userinfo would leak a password into logs.
            raise ValueError("upstream base URL must be http(s), without userinfo or query")
        self.base_url = base_url.rstrip("/")
        self.host = parts.netloc.lower()
        self.transport = Transport(
            self.base_url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            user_agent=user_agent,
            guard=guard,
        )
        self.tokens = TokenCache(self.transport, self.host, realms or RealmPolicy(self.base_url))
        self._basic_upstream = False

    def close(self) -> None:
        self.transport.close()

    # -- public API --------------------------------------------------------------------------

    def head_manifest(
        self,
        name: str,
        reference: str,
        credentials: Credentials | None = None,
        accept: ManifestAccept = ALL_MANIFESTS,
    ) -> ManifestRef:
        """The digest, type and size of the manifest upstream has for `accept`."""
        _check_name(name)
        by_digest = _is_digest(reference)
        what = _manifest_label(name, reference)
        resp = self._registry_request(
            "HEAD", name, f"manifests/{reference}", credentials, {"Accept": accept.header}
        )
        resp.close()
        raise_for_status(resp, what)
        digest = resp.headers.get("Docker-Content-Digest", "").strip()
        media_type = content_type_of(resp)
        size = content_length(resp)
        check_acceptable(media_type, accept, what)
        if media_type not in _GENERIC_CONTENT_TYPES | MANIFEST_MEDIA_TYPES:
            raise UpstreamInvalid(
                NOT_A_MANIFEST, detail=f"HEAD of {_manifest_label(name, reference)}: {media_type}"
            )
        if (
            _DIGEST.fullmatch(digest) is None
            or media_type in _GENERIC_CONTENT_TYPES
            or size is None
        ):
            manifest = self.get_manifest(name, reference, credentials, accept)
            return ManifestRef(manifest.digest, manifest.media_type, manifest.size)
        if by_digest and digest != reference:
            raise UpstreamBadDigest(
                f"upstream reports digest {digest} for manifest {name}@{reference}"
            )
        return ManifestRef(digest, media_type, size)

    def get_manifest(
        self,
        name: str,
        reference: str,
        credentials: Credentials | None = None,
        accept: ManifestAccept = ALL_MANIFESTS,
    ) -> Manifest:
        """The manifest upstream has for `accept`; UpstreamNotAcceptable if it answers with
        another type."""
        _check_name(name)
        by_digest = _is_digest(reference)
        what = _manifest_label(name, reference)
        resp = self._registry_request(
            "GET", name, f"manifests/{reference}", credentials, {"Accept": accept.header}
        )
        raise_for_status(resp, what)
        try:
            check_acceptable(content_type_of(resp), accept, what)
        except UpstreamNotAcceptable:
            resp.close()
            raise
        try:
            content = read_capped(resp, MAX_MANIFEST_SIZE, what)
        finally:
            resp.close()
        if by_digest:
            algorithm, expected = _check_digest(reference)
            if hashlib.new(algorithm, content).hexdigest() != expected:
                raise UpstreamBadDigest(f"upstream content for {name}@{reference} does not match")
            digest = reference
        else:
            digest = "sha256:" + hashlib.sha256(content).hexdigest()
            advertised = resp.headers.get("Docker-Content-Digest")
            if advertised and advertised.startswith("sha256:") and advertised != digest:
                log.warning(
                    "upstream %s advertised %s for %s but the bytes hash to %s; using the latter",
                    self.host,
                    advertised,
                    what,
                    digest,
                )
        try:
            media_type = manifest_media_type(content_type_of(resp), content)
        except UpstreamInvalid as error:
            error.detail = f"{what}: {error.detail}"
            raise
        # A generic Content-Type left the body to say which type it is.
        check_acceptable(media_type, accept, what)
        return Manifest(content, media_type, digest)

    def head_blob(self, name: str, digest: str, credentials: Credentials | None = None) -> BlobRef:
        _check_name(name)
        _check_digest(digest)
        resp = self._registry_request("HEAD", name, f"blobs/{digest}", credentials, {})
        resp.close()
        raise_for_status(resp, f"blob {name}@{digest}")
        advertised = resp.headers.get("Docker-Content-Digest")
        if advertised and advertised != digest:
            raise UpstreamBadDigest(f"upstream reports digest {advertised} for blob {digest}")
        size = content_length(resp)
        if size is None:
            raise UpstreamUnavailable(f"upstream gave no Content-Length for blob {digest}")
        return BlobRef(size, content_type_of(resp) or None)

    def open_blob(
        self,
        name: str,
        digest: str,
        credentials: Credentials | None = None,
        byte_range: tuple[int, int | None] | None = None,
    ) -> BlobResponse:
        """Start streaming a blob; ``byte_range`` is (first, last-or-None), both inclusive.

        The status is 200 or 206; a 200 to a range request means the upstream ignored the
        range and the body starts at byte 0.
        """
        _check_name(name)
        _check_digest(digest)
        headers: dict[str, str] = {}
        if byte_range is not None:
            first, last = byte_range
            if first < 0 or (last is not None and last < first):
                raise ValueError(f"invalid byte range {byte_range!r}")
            headers["Range"] = f"bytes={first}-{'' if last is None else last}"
        what = f"blob {name}@{digest}"
        resp = self._registry_request("GET", name, f"blobs/{digest}", credentials, headers)
        raise_for_status(resp, what)
        if resp.status_code == 200:
            return BlobResponse(resp, content_length(resp))
        content_range = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if resp.status_code != 206 or byte_range is None or content_range is None:
            resp.close()
            raise UpstreamUnavailable(f"unexpected {resp.status_code} answer for {what}")
        if int(content_range.group(1)) != byte_range[0]:
            resp.close()
            raise UpstreamUnavailable(f"upstream returned the wrong range for {what}")
        total = content_range.group(3)
        return BlobResponse(resp, None if total == "*" else int(total))

    def list_tags(
        self,
        name: str,
        n: int | None = None,
        last: str | None = None,
        credentials: Credentials | None = None,
    ) -> TagPage:
        """A page of the repository's tags, `n` long after `last`, as far as upstream pages."""
        _check_name(name)
        if last is not None and TAG_RE.fullmatch(last) is None:
            raise UpstreamRefused(f"refusing malformed tag {last!r}")
        query = urlencode(
            [(key, value) for key, value in (("n", n), ("last", last)) if value is not None]
        )
        what = f"tag list of {name}"
        resp = self._registry_request(
            "GET",
            name,
            f"tags/list?{query}" if query else "tags/list",
            credentials,
            {"Accept": "application/json"},
        )
        raise_for_status(resp, what)
        try:
            content = read_capped(resp, MAX_TAG_LIST_SIZE, what)
        finally:
            resp.close()
        try:
            return tag_page(content, resp.headers.get("Link", ""))
        except UpstreamInvalid as error:
            error.detail = f"{what}: {error.detail}"
            raise

    def get_referrers(
        self, name: str, digest: str, credentials: Credentials | None = None
    ) -> tuple[dict, ...]:
        """The descriptors of the manifests whose subject is `digest`, from upstream's
        referrers API, every page of it; UpstreamNotFound when upstream has none (distribution
        2.x)."""
        _check_name(name)
        _check_digest(digest)
        what = f"referrers of {name}@{digest}"
        descriptors: list[dict] = []
        path, budget = f"referrers/{digest}", MAX_REFERRERS_SIZE
        for _ in range(MAX_REFERRERS_PAGES):
            resp = self._registry_request("GET", name, path, credentials, {"Accept": OCI_INDEX})
            raise_for_status(resp, what)
            try:
                content = read_capped(resp, budget, what)
            finally:
                resp.close()
            budget -= len(content)
            content_type = content_type_of(resp)
            try:
                if content_type not in _GENERIC_CONTENT_TYPES | {OCI_INDEX}:
                    detail = f"Content-Type {content_type[:100]!r}"
                    raise UpstreamInvalid(NOT_AN_INDEX, detail=detail)
                descriptors.extend(referrer_descriptors(content, OCI_INDEX))
            except UpstreamInvalid as error:
                error.detail = f"{what}: {error.detail}"
                raise
            next_query = next_link_query(resp.headers.get("Link", ""))
            if next_query is None:
                return tuple(descriptors)
            path = f"referrers/{digest}?{urlencode(parse_qsl(next_query))}"
        raise UpstreamInvalid(NOT_AN_INDEX, detail=f"{what}: more than {MAX_REFERRERS_PAGES} pages")

    # -- HTTP ----------------------------------------------------------------------------------

    def _registry_request(
        self,
        method: str,
        name: str,
        path: str,
        creds: Credentials | None,
        headers: Mapping[str, str],
    ) -> requests.Response:
        """Send to ``/v2/<name>/<path>``, handling auth challenges and redirects.

        The caller must close the returned response and check its status.
        """
        url = f"{self.base_url}/v2/{name}/{path}"
        authorization = self._cached_authorization(name, creds)
        resp = self.transport.send(method, url, {**headers, **authorization})
        if resp.status_code == 401:
            resp.close()
            authorization = self._authorize(name, creds, resp, authorization)
            resp = self.transport.send(method, url, {**headers, **authorization})
            if resp.status_code == 401 and authorization["Authorization"].startswith("Basic "):
                resp.close()
                raise UpstreamAuthFailed(
                    f"upstream {self.host} rejected the configured credentials", status=401
                )
        return self.transport.follow_redirects(method, resp, headers, authorization)

    # -- authentication ----------------------------------------------------------------------

    def _cached_authorization(self, name: str, creds: Credentials | None) -> dict[str, str]:
        """Authorization to send up front, saving the 401 round trip when we already know it."""
        if self._basic_upstream and creds is not None:
            return {"Authorization": creds.basic_authorization()}
        return self.tokens.cached(name, creds)

    def _authorize(
        self,
        name: str,
        creds: Credentials | None,
        resp: requests.Response,
        sent: Mapping[str, str],
    ) -> dict[str, str]:
        """Answer a 401 challenge with fresh Authorization for one retry."""
        challenges = {
            c.scheme: c for c in parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        }
        bearer, basic = challenges.get("bearer"), challenges.get("basic")
        if bearer is not None:
            rejected = sent.get("Authorization", "").removeprefix("Bearer ")
            return {"Authorization": f"Bearer {self.tokens.token(name, creds, bearer, rejected)}"}
        if basic is not None:
            if creds is None:
                raise UpstreamAuthFailed(
                    f"upstream {self.host} requires credentials and none are configured",
                    status=401,
                )
            if sent:
                raise UpstreamAuthFailed(
                    f"upstream {self.host} rejected the configured credentials", status=401
                )
            self._basic_upstream = True
            return {"Authorization": creds.basic_authorization()}
        raise UpstreamUnavailable(
            f"upstream {self.host} answered 401 without a usable challenge", status=401
        )
