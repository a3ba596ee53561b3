"""Who may pull from and administer which group, checked through /jwt/auth and the resources."""

from __future__ import annotations

import jwt
import pytest
from pyramid.request import Request
from pyramid.scripting import prepare

from depproxy_pyramid.names import Repository
from depproxy_pyramid.permissions import Permission
from depproxy_pyramid.resources import RepositoryResource, Root
from tests.conftest import JWT_SECRET, basic
from tests.world import build_world

GROUPS = ("pub", "priv", "priv/nested", "off")
REJECTED = (
    "anonymous",
    "wrong_password",
    "inactive",
    "revoked_token",
    "expired_token",
    "revoked_deploy_token",
    "expired_deploy_token",
)
# identity -> for each of GROUPS, "<pull><administer>" with Y/N
EXPECTED = {
    "stranger": ("YN", "NN", "NN", "NN"),
    "guest": ("YN", "YN", "YN", "NN"),
    "reporter": ("YN", "YN", "YN", "NN"),
    "developer": ("YN", "YN", "YN", "NN"),
    "maintainer": ("YN", "YN", "YN", "NN"),
    "owner": ("YY", "YY", "YY", "NY"),
    "elder": ("YN", "YY", "YY", "NN"),  # owner of the parent group "priv" only
    "deploy_token": ("YN", "YN", "YN", "NN"),  # a deploy token of "priv"
    "admin": ("YY", "YY", "YY", "NY"),
    "owner_read_token": ("YN", "YN", "YN", "NN"),  # read_registry cannot administer
    "owner_api_token": ("YY", "YY", "YY", "NY"),
    **{name: ("NN",) * 4 for name in REJECTED},
}
CASES = [
    (identity, group, expected[0] == "Y", expected[1] == "Y")
    for identity, row in EXPECTED.items()
    for group, expected in zip(GROUPS, row, strict=True)
]


def repository(group: str) -> Repository:
    return Repository(group, "library/alpine")


@pytest.fixture(scope="module")
def world(database):
    return build_world(database)


def headers_for(world, identity: str) -> dict[str, str]:
    if identity == "anonymous":
        return {}
    return basic(*world.credentials[identity])


@pytest.mark.parametrize(("identity", "group", "pull", "administer"), CASES)
def test_token_endpoint(testapp, world, identity, group, pull, administer):
    name = repository(group).name
    response = testapp.get(
        "/jwt/auth",
        params={"service": "dependency_proxy", "scope": f"repository:{name}:pull,push"},
        headers=headers_for(world, identity),
        expect_errors=True,
    )
    if identity in REJECTED:
        assert response.status_int == 401
        assert response.json["errors"][0]["code"] == "UNAUTHORIZED"
        assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        return
    assert response.status_int == 200
    claims = jwt.decode(
        response.json["token"], JWT_SECRET, algorithms=["HS256"], audience="dependency_proxy"
    )
    expected = [{"type": "repository", "name": name, "actions": ["pull"]}] if pull else []
    assert claims["access"] == expected
    assert response.json["access_token"] == response.json["token"]
    assert response.json["expires_in"] == 900


@pytest.mark.parametrize(("identity", "group", "pull", "administer"), CASES)
def test_resources(app, world, identity, group, pull, administer):
    request = Request.blank("/jwt/auth", headers=headers_for(world, identity))
    with prepare(registry=app.registry, request=request):
        request.matched_route = app.routes_mapper.get_route("depproxy.jwt_auth")
        with request.tm:
            resource = Root(request).find(group)
            assert (
                bool(
                    request.has_permission(
                        Permission.PULL, RepositoryResource(repository(group), resource)
                    )
                )
                is pull
            )
            assert bool(request.has_permission(Permission.ADMINISTER, resource)) is administer


def test_private_groups_are_invisible_to_non_members(app, world):
    request = Request.blank("/jwt/auth", headers=basic(*world.credentials["stranger"]))
    with prepare(registry=app.registry, request=request):
        request.matched_route = app.routes_mapper.get_route("depproxy.jwt_auth")
        with request.tm:
            root = Root(request)
            assert request.has_permission(Permission.VIEW, root.find("pub"))
            for path in ("priv", "priv/nested", "off"):
                assert not request.has_permission(Permission.VIEW, root.find(path))
            with pytest.raises(KeyError):
                root.find("does-not-exist")


def test_one_request_grants_several_scopes(testapp, world):
    names = [repository(g).name for g in GROUPS]
    response = testapp.get(
        "/jwt/auth",
        params=[
            ("scope", f"repository:{names[0]}:pull repository:{names[1]}:pull"),
            ("scope", f"repository:{names[2]}:pull"),
            ("scope", f"repository:{names[3]}:pull"),
        ],
        headers=basic(*world.credentials["guest"]),
    )
    claims = jwt.decode(
        response.json["token"], JWT_SECRET, algorithms=["HS256"], audience="dependency_proxy"
    )
    assert [entry["name"] for entry in claims["access"]] == names[:3]
