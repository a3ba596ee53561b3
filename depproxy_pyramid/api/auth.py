"""Who is asking on the JSON API: a personal access token, and nothing else.

GitLab's clients send it as `PRIVATE-TOKEN: <token>` or `Authorization: Bearer <token>`. On
these paths a Bearer value is always a personal access token, never a registry JWT, and
passwords, deploy tokens and host session cookies sign no one in. Every attempt counts against
the client address's sign-in limit (`throttle`), as a wrong password on `/jwt/auth` does: a
token has no user name to count against.

This module imports nothing of `security`, which calls it.
"""

from __future__ import annotations

import re

from pyramid.request import Request

from ..accounts import Account, IAccountSource, IPersonalAccessTokenSource, valid_account
from ..throttle import SIGN_IN_REFUSAL, SignInRefused, sign_in_guard

# The add-on's API paths: only the dependency proxy's part of GitLab's API, so a host with an
# `/api/v4` of its own keeps the rest. `:id` is a number or a group path, whose slashes arrive
# decoded (`acme%2Fplatform` is `acme/platform` here).
API_PATHS = r"^/api/v4/groups/[^/]+(/[^/]+)*/dependency_proxy(/|$)"
_API_PATHS_RE = re.compile(API_PATHS)
# Tokens the add-on issues are 48 characters; anything this long is no token.
MAX_TOKEN = 256


def is_api_path(request: Request) -> bool:
    # The raw WSGI value, as `security.is_addon_path`: it must not fail on a malformed path.
    return _API_PATHS_RE.match(request.environ.get("PATH_INFO", "")) is not None


def presented_token(request: Request) -> str | None:
    """The token in `PRIVATE-TOKEN` (first) or `Authorization: Bearer`; None when neither
    header holds one, "" when one holds something that cannot be a token."""
    value = request.headers.get("PRIVATE-TOKEN")
    if value is None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return "" if scheme else None
    value = value.strip()
    if not value or len(value) > MAX_TOKEN or not value.isascii() or not value.isprintable():
        return ""
    return value


def api_account(request: Request) -> Account | None:
    """The account whose live personal access token the request presents, or None.

    A refusal by the sign-in limits is left on the request, as `security.sign_in` leaves it,
    for the API's error view to answer with a 429.
    """
    token = presented_token(request)
    if token is None:
        return None
    guard = sign_in_guard(request)
    try:
        guard.check(request, None)
    except SignInRefused as refusal:
        request.environ[SIGN_IN_REFUSAL] = refusal
        return None
    source = request.registry.getUtility(IAccountSource)
    account = None
    if token and IPersonalAccessTokenSource.providedBy(source):
        account = valid_account(source.authenticate_token(request, token))
    guard.settle(request, succeeded=account is not None)
    return account
