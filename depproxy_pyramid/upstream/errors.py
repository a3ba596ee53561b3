"""What can go wrong upstream, typed so the HTTP layer maps each onto a registry error."""

from __future__ import annotations


class UpstreamError(Exception):
    """Base of all upstream failures; ``status`` is the upstream HTTP status behind it, if any."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class UpstreamUnavailable(UpstreamError):
    """Upstream unreachable, timed out, answered 5xx or something we cannot use."""


class UpstreamUnreachable(UpstreamUnavailable):
    """No connection to upstream: refused, reset, unresolvable, or not accepted in time."""


class UpstreamTimeout(UpstreamUnavailable):
    """Upstream accepted the connection but did not answer within the read timeout."""


class UpstreamInvalid(UpstreamUnavailable):
    """Upstream answered with something we will not use (a redirect to an internal address,
    a non-manifest, ...). `message` names no host, port or URL, so a client may see it; the
    particulars are in `detail`, for the server log only."""

    def __init__(self, message: str, *, detail: str = "", status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.detail = detail


class UpstreamRateLimited(UpstreamError):
    """Upstream answered 429; ``retry_after`` is in seconds when the upstream said."""

    def __init__(
        self, message: str, *, status: int | None = 429, retry_after: int | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class UpstreamNotFound(UpstreamError):
    """The repository, manifest or blob does not exist upstream, or we may not see it."""


class UpstreamNotAcceptable(UpstreamNotFound):
    """Upstream answered with a manifest type the pull did not ask for (it ignored the Accept it
    was sent, or converted to a type we never serve): for that pull, there is no manifest.
    `media_type` is what upstream answered with."""

    def __init__(self, message: str, *, media_type: str, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.media_type = media_type


class UpstreamAuthFailed(UpstreamError):
    """The upstream's token endpoint (or a Basic-auth registry) rejected our credentials."""


class UpstreamRefused(UpstreamError):
    """We refuse to contact upstream for this name: unconfigured host or unsafe name."""


class UpstreamBadDigest(UpstreamError):
    """Upstream content does not match the digest it was requested or advertised by."""
