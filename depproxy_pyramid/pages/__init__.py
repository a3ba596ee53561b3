"""The add-on's HTML pages: a group's Dependency Proxy, the instance admin overview, sign-in.

Unlike the registry's routes, these honour the host's `route_prefix`. They are judged by their
own policy (`pages.security.PageSecurityPolicy`): a session, never a token or Basic credentials.
Every form carries Pyramid's CSRF token, kept in `request.session`: the host's session when it
has a session factory, else the add-on's signed cookie (`depproxy.session.secret`).
"""

from __future__ import annotations

from collections.abc import Callable

from pyramid.config import Configurator
from pyramid.interfaces import ISession, ISessionFactory
from pyramid.request import Request
from pyramid.session import SignedCookieSessionFactory
from pyramid_jinja2 import add_jinja2_renderer

from ..security import IPagePolicy
from .routes import GROUP_ROUTES, RENDERER, ROUTES
from .security import PageSecurityPolicy
from .views import add_page_error_views

SESSION_COOKIE = "depproxy_session"
# Idle time after which the pages' own session (and with it the sign-in) ends.
SESSION_IDLE_SECONDS = 8 * 3600


def session_factory(secret: str) -> Callable[[Request], ISession]:
    """Signed-cookie sessions, HttpOnly and SameSite=Lax, Secure on HTTPS requests."""
    options = {
        "cookie_name": SESSION_COOKIE,
        "httponly": True,
        "samesite": "Lax",
        "timeout": SESSION_IDLE_SECONDS,
        "salt": "depproxy.session.",
    }
    plain = SignedCookieSessionFactory(secret, secure=False, **options)
    secure = SignedCookieSessionFactory(secret, secure=True, **options)

    def factory(request: Request):
        return (secure if request.scheme == "https" else plain)(request)

    return factory


def includeme(config: Configurator) -> None:
    settings = config.registry["depproxy.settings"]
    add_jinja2_renderer(config, RENDERER, settings_prefix="depproxy.jinja2.")
    for name, pattern in ROUTES.items():
        factory = ".views.group_factory" if name in GROUP_ROUTES else "..resources.root_factory"
        config.add_route(name, pattern, factory=factory)
    config.registry.registerUtility(PageSecurityPolicy(tuple(ROUTES)), IPagePolicy)

    def session_unless_the_host_has_one() -> None:
        # After the host's own `set_session_factory` (order 0): the host's session wins.
        if config.registry.queryUtility(ISessionFactory) is None:
            config.registry.registerUtility(
                session_factory(settings.session_secret), ISessionFactory
            )

    config.action(("depproxy", "session factory"), session_unless_the_host_has_one, order=1)
    config.scan(".views")
    add_page_error_views(config)
