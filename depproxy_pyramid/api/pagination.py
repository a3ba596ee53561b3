"""GitLab's offset pagination: `page` and `per_page` in, `X-*` and `Link` headers out."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from pyramid.request import Request
from pyramid.response import Response

from .errors import bad_request

GROUPS_PATH = "/api/v4/groups/"
DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 100
# Nine digits keep the offset (page × per_page) well inside a 64-bit integer.
_NUMBER_RE = re.compile(r"^[0-9]{1,9}$")


@dataclass(frozen=True)
class Page:
    number: int
    per_page: int

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.per_page


def _positive(request: Request, name: str, default: int) -> int:
    raw = request.GET.get(name)
    if raw is None:
        return default
    if not _NUMBER_RE.match(raw) or int(raw) < 1:
        raise bad_request(f"{name} is a whole number from 1", {"parameter": name})
    return int(raw)


def requested_page(request: Request) -> Page:
    """The page asked for; per_page above 100 is taken as 100, as GitLab does."""
    return Page(
        _positive(request, "page", 1),
        min(_positive(request, "per_page", DEFAULT_PER_PAGE), MAX_PER_PAGE),
    )


def add_page_headers(request: Request, response: Response, page: Page, total: int) -> None:
    last = max(1, math.ceil(total / page.per_page))
    next_page = page.number + 1 if page.number < last else None
    # As GitLab (Kaminari): a page past the last has neither a next nor a previous one.
    prev_page = page.number - 1 if 1 < page.number <= last else None
    response.headers.update(
        {
            "X-Total": str(total),
            "X-Total-Pages": str(last),
            "X-Per-Page": str(page.per_page),
            "X-Page": str(page.number),
            "X-Next-Page": str(next_page or ""),
            "X-Prev-Page": str(prev_page or ""),
        }
    )
    settings = request.registry["depproxy.settings"]
    # The path as GitLab writes it: a group path in `:id` encoded (`acme%2Fweb`), which the
    # WSGI path holds decoded.
    group_ref = request.matchdict["id"]
    rest = request.path_info[len(GROUPS_PATH) + len(group_ref) :]
    base = (settings.external_url or request.application_url) + (
        GROUPS_PATH + quote(group_ref, safe="") + quote(rest)
    )
    others = [(k, v) for k, v in request.GET.items() if k not in ("page", "per_page")]

    def link(number: int, rel: str) -> str:
        query = urlencode([*others, ("page", number), ("per_page", page.per_page)])
        return f'<{base}?{query}>; rel="{rel}"'

    links = []
    if prev_page is not None:
        links.append(link(prev_page, "prev"))
    if next_page is not None:
        links.append(link(next_page, "next"))
    links += [link(1, "first"), link(last, "last")]
    response.headers["Link"] = ", ".join(links)
