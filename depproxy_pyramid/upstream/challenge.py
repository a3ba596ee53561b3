"""`WWW-Authenticate` parsing (RFC 7235), as registries actually send it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_QUOTED_PAIR = re.compile(r"\\(.)")
# Bare values should be tokens, but some registries send unquoted realm URLs.
_BARE = re.compile(r'[^\s,"]*')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-cased
    params: Mapping[str, str]  # keys lower-cased


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (possibly several challenges joined by commas)."""
    challenges: list[Challenge] = []
    params: dict[str, str] = {}  # parameters before any scheme belong to nothing: dropped
    pos, end = 0, len(header)
    while pos < end:
        if header[pos] in " \t,":
            pos += 1
            continue
        match = _TOKEN.match(header, pos)
        if match is None:
            # token68 leftovers and other junk carry nothing we use
            pos += 1
            continue
        name, pos = match.group(), _skip_space(header, match.end())
        if pos < end and header[pos] == "=":
            pos = _skip_space(header, pos + 1)
            quoted = _QUOTED.match(header, pos)
            if quoted is not None:
                value, pos = _QUOTED_PAIR.sub(r"\1", quoted.group(1)), quoted.end()
            else:
                bare = _BARE.match(header, pos)
                assert bare is not None  # the pattern matches the empty string
                value, pos = bare.group(), bare.end()
            params[name.lower()] = value
        else:
            params = {}
            challenges.append(Challenge(name.lower(), params))
    return challenges


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    return pos
