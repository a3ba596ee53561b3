"""Who is looking at the add-on's HTML pages: a session, and nothing else.

A registry bearer token or HTTP Basic credentials never sign anyone in to a page: a page
request is judged by its session alone, so a token stolen from a CI job cannot drive the
forms, and a browser never replays Basic credentials at them.

The session is the host's own when it brings a sign-in (`IAccountSource.signed_in_account`),
else the add-on's sign-in form puts an account id in `request.session`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pyramid.authorization import ACLHelper, Authenticated, Everyone
from pyramid.interfaces import IRoutesMapper
from pyramid.request import Request, RequestLocalCache
from pyramid.security import Denied
from zope.interface import implementer

from ..accounts import Account, IAccountSource, valid_account
from ..models import Scope
from ..permissions import Permission
from ..security import Identity, IPagePolicy, account_identity
from ..throttle import sign_in_guard

# Where the add-on's own sign-in keeps the account's id in the session.
SESSION_ACCOUNT = "depproxy.account_id"
MAX_NEXT_PATH = 2000


def _source(request: Request) -> IAccountSource:
    return request.registry.getUtility(IAccountSource)


def offers_own_sign_in(request: Request) -> bool:
    """Whether the pages sign people in themselves: the host brings no sign-in of its own."""
    return getattr(_source(request), "signed_in_account", None) is None


def sign_in_with_password(request: Request, username: str, password: str) -> Account | None:
    """The account these credentials sign in, within the sign-in limits (SignInRefused when
    over them); a failure counts against them.

    Only a password signs in to the pages: a personal access token is refused (it may carry
    fewer scopes than a session would grant), and so is a deploy token (not an account).
    """
    guard = sign_in_guard(request)
    guard.check(request, username)
    account = valid_account(_source(request).authenticate(request, username, password))
    if account is not None and account.personal_access_token_id is not None:
        account = None
    guard.settle(request, succeeded=account is not None)
    return account


def remember_account(request: Request, account: Account) -> None:
    request.session[SESSION_ACCOUNT] = account.id


def forget_account(request: Request) -> None:
    request.session.pop(SESSION_ACCOUNT, None)


def safe_next_path(value: str | None) -> str | None:
    """`value` if it is a path on this site (no scheme, no host, no `//` or `/\\` that a
    browser would take as another host), else None: the sign-in never redirects elsewhere."""
    if not value or len(value) > MAX_NEXT_PATH or not value.isprintable():
        return None
    if not value.startswith("/") or value.startswith(("//", "/\\")) or "\\" in value:
        return None
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return None
    return value


@implementer(IPagePolicy)
class PageSecurityPolicy:
    """The pages' policy: the session's account, its memberships as principals, group ACLs."""

    def __init__(self, route_names: tuple[str, ...]) -> None:
        self.route_names = route_names
        self.helper = ACLHelper()
        self.identity_cache = RequestLocalCache(self._load_identity)

    def judges(self, request: Request) -> bool:
        # By path, as the routes would match it: pyramid_tm may ask who this is before routing.
        try:
            path = request.environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
        except UnicodeError:
            return False
        mapper = request.registry.queryUtility(IRoutesMapper)
        if mapper is None:
            return False
        for name in self.route_names:
            route = mapper.get_route(name)
            if route is not None and route.match(path) is not None:
                return True
        return False

    def _load_identity(self, request: Request) -> Identity | None:
        source = _source(request)
        host_sign_in = getattr(source, "signed_in_account", None)
        if host_sign_in is not None:
            account = valid_account(host_sign_in(request))
        else:
            account_id = request.session.get(SESSION_ACCOUNT)
            account = (
                valid_account(source.account(request, account_id))
                if isinstance(account_id, str)
                else None
            )
        if account is None or account.personal_access_token_id is not None:
            return None
        return account_identity(request, account, via="session")

    def identity(self, request: Request) -> Identity | None:
        return self.identity_cache.get_or_create(request)

    def authenticated_userid(self, request: Request) -> str | None:
        identity = self.identity(request)
        return identity.subject if identity is not None else None

    def effective_principals(self, request: Request) -> list[str]:
        identity = self.identity(request)
        if identity is None:
            return [Everyone]
        return [Everyone, Authenticated, *identity.principals]

    def permits(self, request: Request, context: object, permission: str):
        identity = self.identity(request)
        if (
            identity is not None
            and permission == Permission.ADMINISTER
            and Scope.API.value not in identity.scopes
        ):
            return Denied("the account's sign-in lacks the api scope")
        return self.helper.permits(context, self.effective_principals(request), permission)

    def remember(self, request: Request, userid: str, **kw) -> list:
        return []

    def forget(self, request: Request, **kw) -> list:
        self.identity_cache.clear(request)
        return []
