"""`key=value` log lines whose values cannot break the line or forge another field."""

from __future__ import annotations

from collections.abc import Mapping

MAX_FIELD_LENGTH = 300


def log_value(value: object) -> str:
    """`value` in printable ASCII without spaces or `=`: backslash escapes (`\\n`, `\\x1b`,
    `\\x20`, `\\x3d`, `\\u2028`) for everything else, `-` for None, long values cut short."""
    if value is None:
        return "-"
    text = str(value)
    if len(text) > MAX_FIELD_LENGTH:
        text = text[:MAX_FIELD_LENGTH] + "..."
    escaped = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return escaped.replace(" ", "\\x20").replace("=", "\\x3d")


def log_line(fields: Mapping[str, object]) -> str:
    return " ".join(f"{key}={log_value(value)}" for key, value in fields.items())


def raw_path(environ: Mapping[str, object]) -> str:
    """The request path as the client sent it, undecodable bytes kept as surrogates."""
    path = str(environ.get("PATH_INFO", ""))
    try:
        return path.encode("latin-1").decode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return path
