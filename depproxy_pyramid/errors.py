"""Registry errors: every failure a client sees is one of these, rendered as registry JSON.

A 4xx carries a code from the OCI distribution spec's list (`SPEC_CODES`); the spec has none for
a server's own failures, so a 5xx carries distribution's `UNAVAILABLE` or `UNKNOWN`, which
Docker's and containerd's clients know.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SPEC_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)
SERVER_CODES = frozenset({"UNAVAILABLE", "UNKNOWN"})


class RegistryError(Exception):
    """An error answered as `{"errors": [{"code", "message", "detail"}]}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}


def name_invalid(message: str, detail: Any = None) -> RegistryError:
    return RegistryError(400, "NAME_INVALID", message, detail)


def method_not_allowed(allowed: Iterable[str], message: str) -> RegistryError:
    """405, with the `Allow` header RFC 9110 requires (empty: the resource allows nothing)."""
    return RegistryError(405, "UNSUPPORTED", message, headers={"Allow": ", ".join(allowed)})


def code_for_status(status: int) -> str:
    """The spec's code for an error that has no more particular one."""
    if status >= 500:
        return "UNKNOWN"
    return {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}.get(status, "UNSUPPORTED")
