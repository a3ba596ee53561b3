"""Who may pull from and administer which group, checked through /jwt/auth and the resources."""

from __future__ import annotations

import time

import jwt
import pytest
from pyramid.request import Request
from pyramid.scripting import prepare

from depproxy_pyramid.names import Repository
from depproxy_pyramid.permissions import Permission
from depproxy_pyramid.resources import RepositoryResource, Root
from tests.conftest import JWT_SECRET, basic
from tests.world import (
    add_personal_access_token,
    build_world,
    deploy_token_id,
    end_personal_access_token,
    fresh_sign_in_limits,
)

GROUPS = ("pub", "priv", "priv/nested", "off")
REJECTED = (
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
    # Deploy tokens pull within their own group's hierarchy only, not from other public groups.
    "deploy_token": ("NN", "YN", "YN", "NN"),  # a deploy token of "priv"
    "pub_deploy_token": ("YN", "NN", "NN", "NN"),
    "admin": ("YY", "YY", "YY", "NY"),
    "owner_read_token": ("YN", "YN", "YN", "NN"),  # read_registry cannot administer
    "owner_api_token": ("YY", "YY", "YY", "NY"),
    # No credentials: a token, as Docker Hub gives, that grants nothing here.
    "anonymous": ("NN",) * 4,
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


@pytest.fixture(autouse=True)
def _sign_in_limits(app):
    # Each test signs in a few times at most; together they would reach the limits.
    fresh_sign_in_limits(app)


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


VISIBLE = {  # which private groups each identity may see; "pub" is visible to everyone
    "stranger": set(),
    "elder": {"priv", "priv/nested"},
    "deploy_token": {"priv", "priv/nested"},
    "pub_deploy_token": set(),
    "owner_read_token": {"priv", "priv/nested", "off"},
    **{
        role: {"priv", "priv/nested", "off"}
        for role in ("guest", "reporter", "developer", "maintainer", "owner", "admin")
    },
}
DENIED_PULLS = [
    (identity, group) for identity, group, pull, _ in CASES if not pull and identity in VISIBLE
]


@pytest.mark.parametrize(("identity", "group"), DENIED_PULLS)
def test_registry_refuses_what_the_token_endpoint_refused(testapp, world, identity, group):
    name = repository(group).name
    token = testapp.get(
        "/jwt/auth",
        params={"scope": f"repository:{name}:pull"},
        headers=headers_for(world, identity),
    ).json["token"]
    response = testapp.get(
        f"/v2/{name}/manifests/latest",
        headers={"Authorization": f"Bearer {token}"},
        expect_errors=True,
    )
    error = response.json["errors"][0]
    if group != "pub" and group not in VISIBLE[identity]:
        assert (response.status_int, error["code"]) == (404, "NAME_UNKNOWN")
    elif group == "off":
        assert (response.status_int, error["code"]) == (403, "DENIED")
        assert "disabled" in error["message"]
    elif (identity, group) == ("deploy_token", "pub"):
        # Visible to everyone, but the token endpoint granted this token nothing there.
        assert (response.status_int, error["code"]) == (401, "UNAUTHORIZED")
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    else:
        pytest.fail(f"{identity} was refused pull on visible, enabled group {group}")


@pytest.mark.parametrize("group", GROUPS)
def test_registry_without_a_token_challenges_with_the_scope(testapp, group):
    name = repository(group).name
    response = testapp.get(f"/v2/{name}/blobs/sha256:{'a' * 64}", expect_errors=True)
    assert response.status_int == 401
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="http://registry.test/jwt/auth",service="dependency_proxy",'
        f'scope="repository:{name}:pull"'
    )


def test_a_token_for_one_repository_does_not_open_another(testapp, world):
    granted = repository("priv").name
    token = testapp.get(
        "/jwt/auth",
        params={"scope": f"repository:{granted}:pull"},
        headers=basic(*world.credentials["guest"]),
    ).json["token"]
    other = "priv/dependency_proxy/containers/other/image"
    response = testapp.get(
        f"/v2/{other}/manifests/latest",
        headers={"Authorization": f"Bearer {token}"},
        expect_errors=True,
    )
    assert response.status_int == 401
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize("identity", ["admin", "stranger"])
def test_registry_answers_unknown_groups_like_invisible_ones(testapp, world, identity):
    name = repository("no-such-group").name
    token = testapp.get("/jwt/auth", headers=headers_for(world, identity)).json["token"]
    response = testapp.get(
        f"/v2/{name}/manifests/latest", headers={"Authorization": f"Bearer {token}"},
        expect_errors=True,
    )
    assert (response.status_int, response.json["errors"][0]["code"]) == (404, "NAME_UNKNOWN")
    assert testapp.get(f"/v2/{name}/manifests/latest", expect_errors=True).status_int == 401


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_deploy_token_cannot_pull_from_another_public_group_even_with_a_grant(
    testapp, database
):
    """The group ACL refuses it, not only the token endpoint: a JWT naming `pub` (as if it had
    been granted) still does not open `pub` to a deploy token of `priv`."""
    name = repository("pub").name
    now = int(time.time())
    claims = {
        "iss": "depproxy-pyramid",
        "aud": "dependency_proxy",
        "sub": f"deploy_token:{deploy_token_id(database, 'deploy_token')}",
        "name": "depproxy+deploy-token-deploy_token",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "access": [{"type": "repository", "name": name, "actions": ["pull"]}],
    }
    token = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    response = testapp.get(f"/v2/{name}/manifests/latest", headers=_bearer(token), status=403)
    assert response.json["errors"][0]["code"] == "DENIED"


@pytest.mark.parametrize("how", ["revoke", "expire"])
def test_a_registry_token_from_a_personal_access_token_ends_with_it(testapp, database, how):
    credentials, token_id = add_personal_access_token(database, "guest", "read_registry")
    name = repository("off").name
    token = testapp.get(
        "/jwt/auth", params={"scope": f"repository:{name}:pull"}, headers=basic(*credentials)
    ).json["token"]
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="dependency_proxy")
    assert claims["pat"] == token_id
    # While the personal access token lives, the registry token signs the guest in: the ping
    # answers, and the disabled group "off" is refused for what it is, not for who asks.
    assert testapp.get("/v2/", headers=_bearer(token)).status_int == 200
    refused = testapp.get(f"/v2/{name}/manifests/latest", headers=_bearer(token), status=403)
    assert refused.json["errors"][0]["code"] == "DENIED"

    end_personal_access_token(database, token_id, how)
    # Who a token stands for is looked up again once depproxy.lookup_cache_seconds are over.
    time.sleep(testapp.app.registry["depproxy.settings"].lookup_cache_seconds + 0.5)

    assert claims["exp"] > time.time() + 60  # the registry token itself is still valid
    ping = testapp.get("/v2/", headers=_bearer(token), status=401)
    assert ping.json["errors"][0]["code"] == "UNAUTHORIZED"
    pull = testapp.get(f"/v2/{name}/manifests/latest", headers=_bearer(token), status=401)
    assert pull.json["errors"][0] == {
        "code": "UNAUTHORIZED",
        "message": "invalid or expired credentials",
        "detail": None,
    }
    assert pull.headers["WWW-Authenticate"] == (
        'Bearer realm="http://registry.test/jwt/auth",service="dependency_proxy",'
        f'scope="repository:{name}:pull"'
    )
    assert testapp.get("/jwt/auth", headers=basic(*credentials), status=401)


def test_a_registry_token_from_a_password_carries_no_personal_access_token(testapp, world):
    token = testapp.get("/jwt/auth", headers=basic(*world.credentials["guest"])).json["token"]
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="dependency_proxy")
    assert "pat" not in claims
    assert testapp.get("/v2/", headers=_bearer(token)).status_int == 200
