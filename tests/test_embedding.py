"""How the add-on composes with a host: policies, the account source, routes and error views.

The four host shapes end to end are in test_hosts.py; these are the edge cases of the wiring.
"""

from __future__ import annotations

import jwt
import pytest
import webtest
from pyramid.authorization import ACLHelper, Allow, Authenticated, Everyone
from pyramid.config import Configurator
from pyramid.interfaces import ISecurityPolicy
from pyramid.response import Response
from sqlalchemy import select
from zope.interface import implementer

from depproxy_pyramid.accounts import Account, IAccountSource
from depproxy_pyramid.models import Group, Role
from depproxy_pyramid.resources import GroupInfo, GroupResource
from depproxy_pyramid.security import HostAndAddonPolicy
from tests.conftest import JWT_SECRET, app_settings, basic
from tests.world import PASSWORD, build_world

PRIVATE = "priv/dependency_proxy/containers/library/alpine"


@pytest.fixture(scope="module")
def world(database):
    return build_world(database)


class HeaderPolicy:
    """A host policy: the `X-Host-User` header names the user; `role:admin` for "root"."""

    def identity(self, request):
        name = request.headers.get("X-Host-User")
        return {"name": name} if name else None

    def authenticated_userid(self, request):
        identity = self.identity(request)
        return identity["name"] if identity else None

    def permits(self, request, context, permission):
        principals = [Everyone]
        if self.identity(request):
            principals += [Authenticated, "role:admin", "admin", "depproxy:admin"]
        return ACLHelper().permits(context, principals, permission)

    def remember(self, request, userid, **kw):
        return [("X-Remembered", userid)]

    def forget(self, request, **kw):
        return []


class Secret:
    __acl__ = [(Allow, "role:admin", "read")]

    def __init__(self, request) -> None:
        pass


def _host(database, tmp_path, arrange) -> webtest.TestApp:
    with Configurator(settings=app_settings(database.url, tmp_path / "storage")) as config:
        config.add_route("secret", "/secret", factory=Secret)
        config.add_view(
            lambda request: Response(
                f"secret for {request.identity['name'] if request.identity else 'nobody'}"
            ),
            route_name="secret",
            permission="read",
        )
        config.add_route("remember", "/remember")
        config.add_view(
            lambda request: Response(headers=request.registry.getUtility(ISecurityPolicy).remember(
                request, "someone"
            )),
            route_name="remember",
        )  # fmt: skip
        arrange(config)
    return webtest.TestApp(config.make_wsgi_app())


def _assert_a_member_pulls(app: webtest.TestApp) -> None:
    token = app.get(
        "/jwt/auth",
        params={"scope": f"repository:{PRIVATE}:pull"},
        headers=basic("guest", PASSWORD),
    ).json["token"]
    assert _access_of(token) == [PRIVATE]
    assert app.get("/v2/", headers={"Authorization": f"Bearer {token}"}).status_int == 200


def _policy_before_include(config: Configurator, include) -> None:
    config.set_security_policy(HeaderPolicy())
    include(config)


def _policy_after_include(config: Configurator, include) -> None:
    include(config)
    config.set_security_policy(HeaderPolicy())


def _policy_in_a_later_commit(config: Configurator, include) -> None:
    include(config)
    config.commit()
    config.set_security_policy(HeaderPolicy())


def _with_addon(config: Configurator) -> None:
    config.include("depproxy_pyramid")


def _without_addon(config: Configurator) -> None:
    pass


def _host_answers(app: webtest.TestApp) -> list:
    answers = []
    for path, headers in (
        ("/secret", {"X-Host-User": "root"}),
        ("/secret", {}),
        ("/remember", {}),
    ):
        response = app.get(path, headers=headers, expect_errors=True)
        answers.append(
            (path, response.status_int, response.text, response.headers.get("X-Remembered"))
        )
    return answers


@pytest.mark.parametrize(
    "arrange", [_policy_before_include, _policy_after_include, _policy_in_a_later_commit]
)
def test_each_side_keeps_its_own_policy_whenever_the_host_sets_one(
    database, world, tmp_path, arrange
):
    bare = _host(database, tmp_path, lambda config: arrange(config, _without_addon))
    app = _host(database, tmp_path, lambda config: arrange(config, _with_addon))
    assert isinstance(app.app.registry.getUtility(ISecurityPolicy), HostAndAddonPolicy)
    assert _host_answers(app) == _host_answers(bare)
    assert ("/secret", 200, "secret for root", None) in _host_answers(app)

    # The host's user, with `role:admin` and even a forged `depproxy:admin`, is nobody here.
    host_user = {"X-Host-User": "root"}
    assert app.get(f"/v2/{PRIVATE}/manifests/latest", headers=host_user, status=401)
    # At the token endpoint they are a caller without credentials, whose token grants nothing.
    anonymous = app.get(
        "/jwt/auth", params={"scope": f"repository:{PRIVATE}:pull"}, headers=host_user
    )
    assert _access(anonymous) == []
    assert app.get(
        f"/v2/{PRIVATE}/manifests/latest",
        headers={**host_user, "Authorization": f"Bearer {anonymous.json['token']}"},
        status=401,
    ).headers["WWW-Authenticate"].endswith(',error="insufficient_scope"')
    _assert_a_member_pulls(app)


def test_a_host_without_a_policy_keeps_serving_its_views_unchecked(database, world, tmp_path):
    app = _host(database, tmp_path, _with_addon)
    # As Pyramid does without a policy: the permission is not checked, and nobody is known.
    assert app.get("/secret").text == "secret for nobody"
    assert app.get("/remember").headers.get("X-Remembered") is None
    assert app.get(f"/v2/{PRIVATE}/manifests/latest", status=401)


def test_group_acls_name_only_the_addons_principals(database, world):
    manager, session = database.session()
    with manager:
        groups = session.scalars(select(Group)).all()
        assert groups
        for group in groups:
            info = GroupInfo.of(group)
            for action, principal, _ in GroupResource(info, [info], None).__acl__:
                assert principal in (Everyone, Authenticated) or principal.startswith(
                    "depproxy:"
                ), (group.path, action, principal)


@implementer(IAccountSource)
class CarelessAccounts:
    """A host source that returns the wrong things: the add-on must refuse, not crash."""

    def authenticate(self, request, username, password):
        if username == "dict":
            return {"id": "1", "name": "dict"}
        if username == "blank":
            return Account(id="", name="blank")
        return Account(id=username, name=username)

    def account(self, request, account_id):
        return Account(id=account_id, name=account_id)

    def memberships(self, request, account):
        if account.id == "listed":
            return ["priv"]
        return {"priv": "owner", "pub": 50, ("priv",): Role.OWNER, "priv/nested": Role.GUEST}


def test_what_a_careless_account_source_returns_is_refused(database, world, tmp_path):
    def arrange(config: Configurator) -> None:
        _with_addon(config)
        config.set_dependency_proxy_accounts(CarelessAccounts())

    app = _host(database, tmp_path, arrange)
    scope = {"scope": "repository:priv/nested/dependency_proxy/containers/alpine:pull"}
    for username in ("dict", "blank"):
        refused = app.get("/jwt/auth", params=scope, headers=basic(username, "pw"), status=401)
        assert refused.json["errors"][0]["code"] == "UNAUTHORIZED"
    # Only the one well-formed membership counts; the string role does not make an owner.
    granted = app.get("/jwt/auth", params=scope, headers=basic("someone", "pw")).json
    assert granted["token"]
    priv = {"scope": "repository:priv/dependency_proxy/containers/alpine:pull"}
    assert _access(app.get("/jwt/auth", params=priv, headers=basic("someone", "pw"))) == []
    assert _access(app.get("/jwt/auth", params=scope, headers=basic("someone", "pw"))) == [
        "priv/nested/dependency_proxy/containers/alpine"
    ]
    assert _access(app.get("/jwt/auth", params=scope, headers=basic("listed", "pw"))) == []


def _access(response) -> list[str]:
    return _access_of(response.json["token"])


def _access_of(token: str) -> list[str]:
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="dependency_proxy")
    return [entry["name"] for entry in claims["access"]]


def test_an_account_source_must_provide_the_interface(database, tmp_path):
    class Duck:
        def authenticate(self, request, username, password):
            return None

    with Configurator(settings=app_settings(database.url, tmp_path / "storage")) as config:
        config.include("depproxy_pyramid")
        with pytest.raises(TypeError, match="does not provide IAccountSource"):
            config.set_dependency_proxy_accounts(Duck())


def test_the_registry_api_stays_at_the_root_under_a_route_prefix(database, world, tmp_path):
    with Configurator(settings=app_settings(database.url, tmp_path / "storage")) as config:
        config.include("depproxy_pyramid", route_prefix="/portal")
        config.add_notfound_view(lambda request: Response("portal 404", status=404))
    app = webtest.TestApp(config.make_wsgi_app())
    assert app.get("/v2/", status=401).json["errors"][0]["code"] == "UNAUTHORIZED"
    assert app.get("/v2", status=401).json["errors"][0]["code"] == "UNAUTHORIZED"
    assert app.get("/portal/v2/", status=404).text == "portal 404"


def test_a_host_default_permission_and_root_factory_do_not_reach_the_addon(
    database, world, tmp_path
):
    def refusing_root(request):
        raise RuntimeError("the host's root factory ran for a registry URL")

    def arrange(config: Configurator) -> None:
        config.set_root_factory(refusing_root)
        config.set_default_permission("portal:view")
        config.set_security_policy(HeaderPolicy())
        _with_addon(config)

    app = _host(database, tmp_path, arrange)
    assert app.get("/v2/", status=401).json["errors"][0]["code"] == "UNAUTHORIZED"
    _assert_a_member_pulls(app)
    assert app.get("/-/metrics").content_type == "text/plain"
