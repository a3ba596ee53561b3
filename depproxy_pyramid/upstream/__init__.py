"""The upstream registries the proxy pulls from (OCI distribution API, Docker token auth).

- `challenge`: parsing `WWW-Authenticate`.
- `tokens`: the token flow and its cache, per credentials.
- `transport`: one HTTP session per upstream: timeouts, retries, redirects.
- `client`: manifests and blobs of one upstream, with typed errors (`errors`).
- `routing`: which configured upstream an image name goes to.
- `gate`: the budget of requests waiting on upstream, and a circuit breaker per registry.
"""

from .challenge import Challenge, parse_challenges
from .client import (
    ALL_MANIFESTS,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_ACCEPT,
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    BlobRef,
    Manifest,
    ManifestAccept,
    ManifestRef,
    UpstreamClient,
)
from .errors import (
    UpstreamAuthFailed,
    UpstreamBadDigest,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotAcceptable,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from .routing import UpstreamRegistry
from .tokens import Credentials
from .transport import BlobResponse

__all__ = [
    "ALL_MANIFESTS",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_ACCEPT",
    "MANIFEST_TYPES",
    "MAX_MANIFEST_SIZE",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BlobRef",
    "BlobResponse",
    "Challenge",
    "Credentials",
    "Manifest",
    "ManifestAccept",
    "ManifestRef",
    "UpstreamAuthFailed",
    "UpstreamBadDigest",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamInvalid",
    "UpstreamNotAcceptable",
    "UpstreamNotFound",
    "UpstreamRateLimited",
    "UpstreamRefused",
    "UpstreamRegistry",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UpstreamUnreachable",
    "parse_challenges",
]
