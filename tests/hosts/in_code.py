"""A host configured in code (no ini file) that sets its policy before including the add-on,
signs its API users in with HTTP Basic on every URL, brings them to the registry through its
own account source, keeps the add-on's tables in a database of their own
(`depproxy.sqlalchemy.url`), and has a tween that redirects `/path/` to `/path`.

Run as a server: `python -m tests.hosts.in_code PORT SETTINGS_JSON`.
"""

from __future__ import annotations

import json
import sys

from pyramid.authentication import extract_http_basic_credentials
from pyramid.authorization import ACLHelper, Allow, Authenticated, Everyone
from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPMovedPermanently
from pyramid.interfaces import ISecurityPolicy
from pyramid.response import Response
from pyramid.router import Router
from zope.interface import implementer

from depproxy_pyramid.accounts import Account, IAccountSource
from depproxy_pyramid.models import Role
from depproxy_pyramid.server import serve

# name -> (password, host role, {registry group path: Role})
USERS = {
    "carol": ("carol-password-1", "admin", {}),
    "dave": ("dave-password-1", "staff", {"acme": Role.DEVELOPER}),
}


class BasicPolicy:
    """The host's own: Basic credentials everywhere, principals `role:<role>`."""

    realm = "in-code host"

    def identity(self, request):
        credentials = extract_http_basic_credentials(request)
        if credentials is None:
            return None
        user = USERS.get(credentials.username)
        if user is None or user[0] != credentials.password:
            return None
        return {"name": credentials.username, "role": user[1]}

    def authenticated_userid(self, request):
        identity = self.identity(request)
        return identity["name"] if identity else None

    def permits(self, request, context, permission):
        identity = self.identity(request)
        principals = [Everyone]
        if identity is not None:
            principals += [Authenticated, f"role:{identity['role']}"]
        return ACLHelper().permits(context, principals, permission)

    def remember(self, request, userid, **kw):
        return []

    def forget(self, request, **kw):
        return []


@implementer(IAccountSource)
class HostAccounts:
    def authenticate(self, request, username, password):
        user = USERS.get(username)
        if user is None or user[0] != password:
            return None
        return Account(id=username, name=username)

    def account(self, request, account_id):
        return Account(id=account_id, name=account_id) if account_id in USERS else None

    def memberships(self, request, account):
        return USERS[account.id][2]


class Root:
    __acl__ = [(Allow, "role:admin", "secret")]

    def __init__(self, request) -> None:
        pass


def trailing_slash_tween(handler, registry):
    def tween(request):
        if request.path_info != "/" and request.path_info.endswith("/"):
            return HTTPMovedPermanently(location=request.path_url.rstrip("/"))
        return handler(request)

    return tween


def whoami(request):
    policy = request.registry.getUtility(ISecurityPolicy)
    identity = request.identity
    # Reads an attribute of its own policy, as host code does.
    return Response(f"{identity['name'] if identity else 'nobody'} at {policy.realm}")


def secret(request):
    return Response("the secret")


def make_app(settings: dict, with_addon: bool) -> Router:
    with Configurator(
        settings=settings, security_policy=BasicPolicy(), root_factory=Root
    ) as config:
        config.add_tween("tests.hosts.in_code.trailing_slash_tween")
        if with_addon:
            config.include("depproxy_pyramid")
            config.set_dependency_proxy_accounts(HostAccounts())
        config.add_route("whoami", "/whoami")
        config.add_route("secret", "/secret")
        config.add_view(whoami, route_name="whoami")
        config.add_view(secret, route_name="secret", permission="secret")
    return config.make_wsgi_app()


if __name__ == "__main__":
    port, settings = sys.argv[1], json.loads(sys.argv[2])
    serve(make_app(settings, with_addon=True), {}, listen=f"127.0.0.1:{port}", threads="8")
