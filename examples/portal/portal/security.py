"""The portal's sign-in: a session cookie and ACLs, as in Pyramid's wiki2 tutorial.

This policy judges the portal's own pages only. On the add-on's URLs (`/v2/...`, `/jwt/auth`)
the add-on's policy answers instead, so the portal's session cookie never opens the registry:
registry clients sign in with HTTP Basic, which reaches `portal.accounts.PortalAccounts`.
"""

from __future__ import annotations

from pyramid.authentication import SessionAuthenticationHelper
from pyramid.authorization import ACLAllowed, ACLDenied, ACLHelper, Allow, Authenticated, Everyone
from pyramid.config import Configurator
from pyramid.request import Request, RequestLocalCache
from pyramid.session import SignedCookieSessionFactory

from .models import PortalUser


class Root:
    """The root of every portal page; the add-on's routes bring their own."""

    __acl__ = [
        (Allow, "role:admin", "portal:admin"),
        (Allow, Authenticated, "portal:write"),
    ]

    def __init__(self, request: Request) -> None:
        self.request = request


def signed_in_user(request: Request) -> PortalUser | None:
    """Whoever the portal's session says is signed in, whichever policy is asking."""
    userid = SessionAuthenticationHelper().authenticated_userid(request)
    if not isinstance(userid, int):
        return None
    return request.dbsession.get(PortalUser, userid)


class PortalSecurityPolicy:
    def __init__(self) -> None:
        self.helper = SessionAuthenticationHelper()
        self.acl = ACLHelper()
        self.identity_cache = RequestLocalCache(signed_in_user)

    def identity(self, request: Request) -> PortalUser | None:
        return self.identity_cache.get_or_create(request)

    def authenticated_userid(self, request: Request) -> int | None:
        user = self.identity(request)
        return user.id if user is not None else None

    def effective_principals(self, request: Request) -> list[str]:
        user = self.identity(request)
        if user is None:
            return [Everyone]
        return [Everyone, Authenticated, f"user:{user.id}", f"role:{user.role}"]

    def permits(self, request: Request, context: object, permission: str) -> ACLAllowed | ACLDenied:
        return self.acl.permits(context, self.effective_principals(request), permission)

    def remember(self, request: Request, userid: int, **kw) -> list:
        return self.helper.remember(request, userid, **kw)

    def forget(self, request: Request, **kw) -> list:
        self.identity_cache.clear(request)
        return self.helper.forget(request, **kw)


def includeme(config: Configurator) -> None:
    secret = config.get_settings().get("portal.session_secret", "").strip()
    if len(secret) < 32:
        raise ValueError("setting 'portal.session_secret': at least 32 random characters")
    # Over plain HTTP in development; behind TLS, add `secure=True`.
    config.set_session_factory(SignedCookieSessionFactory(secret, httponly=True, samesite="Lax"))
    config.set_security_policy(PortalSecurityPolicy())
