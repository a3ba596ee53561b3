"""Registry errors: every failure a client sees is one of these, rendered as registry JSON."""

from __future__ import annotations

from typing import Any


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


def unsupported(message: str) -> RegistryError:
    return RegistryError(405, "UNSUPPORTED", message)
