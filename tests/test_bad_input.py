"""Bad input gets a registry JSON error with a 4xx status: never a 500, never a traceback."""

from __future__ import annotations

import base64
import time

import jwt
import pytest

from tests.conftest import JWT_SECRET, basic
from tests.world import build_world

PROXY = "dependency_proxy/containers"


@pytest.fixture(scope="module")
def world(database):
    return build_world(database)


def assert_registry_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_int == status, response.body[:500]
    assert response.content_type == "application/json"
    assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    (error,) = response.json["errors"]
    assert set(error) == {"code", "message", "detail"}
    assert error["message"]
    assert b"Traceback" not in response.body
    if code is not None:
        assert error["code"] == code
    return error


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    "header",
    [
        "Basic",
        "Basic ",
        "Basic !!!not-base64!!!",
        "Basic " + b64(b"no-colon-here"),
        "Basic " + b64(b":password-without-user"),
        "Basic " + b64(b"user:"),
        "Basic " + b64(b"\xff\xfe:\xfd"),
        "Basic " + b64(b"user\x00:pw"),
        "Basic " + b64(b"a" * 5000 + b":b"),
        "Basic a b c",
        "Digest username=owner",
        "Bearer not-a-jwt",
        "Basic " + b64(b"' OR '1'='1:' OR '1'='1"),
        "Basic " + b64(b"owner'; DROP TABLE users; --:x"),
    ],
)
def test_malformed_or_wrong_basic_credentials(testapp, world, header):
    response = testapp.get("/jwt/auth", headers={"Authorization": header}, expect_errors=True)
    assert_registry_error(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


@pytest.mark.parametrize(
    ("scope", "code"),
    [
        ("registry:catalog:*", "UNSUPPORTED"),
        ("repository(plugin):x/dependency_proxy/containers/y:pull", "UNSUPPORTED"),
        ("repository", "UNSUPPORTED"),
        ("repository:pub", "UNSUPPORTED"),
        ("repository:pub/alpine:pull", "NAME_INVALID"),
        (f"repository:../../etc/{PROXY}/passwd:pull", "NAME_INVALID"),
        (f"repository:pub/{PROXY}/../../etc/passwd:pull", "NAME_INVALID"),
        (f"repository:%2e%2e/{PROXY}/alpine:pull", "NAME_INVALID"),
        (f"repository:{'a' * 300}/{PROXY}/alpine:pull", "NAME_INVALID"),
        (f"repository:{'/'.join(['g'] * 25)}/{PROXY}/alpine:pull", "NAME_INVALID"),
        (f"repository:Pub/{PROXY}/alpine:pull", "NAME_INVALID"),
        (f"repository:pub'--/{PROXY}/alpine:pull", "NAME_INVALID"),
        (f"repository:pub/{PROXY}/x'OR'1'='1:pull", "NAME_INVALID"),
        (f"repository:pub/{PROXY}/a/b/c/d/e/f:pull", "NAME_INVALID"),
        (f"repository:pub/{PROXY}/UPPER:pull", "NAME_INVALID"),
        (f"repository:pub/{PROXY}/:pull", "NAME_INVALID"),
        (f"repository:{PROXY}/alpine:pull", "NAME_INVALID"),
    ],
)
def test_bad_scopes(testapp, world, scope, code):
    response = testapp.get(
        "/jwt/auth",
        params={"scope": scope},
        headers=basic(*world.credentials["owner"]),
        expect_errors=True,
    )
    assert_registry_error(response, 400, code)


def test_too_many_scopes(testapp, world):
    scopes = " ".join(f"repository:pub/{PROXY}/img{i}:pull" for i in range(40))
    response = testapp.get(
        "/jwt/auth",
        params={"scope": scopes},
        headers=basic(*world.credentials["owner"]),
        expect_errors=True,
    )
    assert_registry_error(response, 400)


def test_unknown_service(testapp, world):
    response = testapp.get(
        "/jwt/auth",
        params={"service": "other"},
        headers=basic(*world.credentials["owner"]),
        expect_errors=True,
    )
    assert_registry_error(response, 400, "UNSUPPORTED")


def test_unknown_and_invisible_groups_are_not_granted(testapp, world):
    for group in ("no-such-group", "priv", "priv/nested", "priv/missing"):
        response = testapp.get(
            "/jwt/auth",
            params={"scope": f"repository:{group}/{PROXY}/alpine:pull"},
            headers=basic(*world.credentials["stranger"]),
        )
        claims = jwt.decode(
            response.json["token"], JWT_SECRET, algorithms=["HS256"], audience="dependency_proxy"
        )
        assert claims["access"] == []


def _claims(**overrides) -> dict:
    now = int(time.time())
    claims = {
        "iss": "depproxy-pyramid",
        "aud": "dependency_proxy",
        "sub": "account:1",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "access": [],
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _alg_none(claims: dict) -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = jwt.utils.base64url_encode(jwt.api_jws.json.dumps(claims).encode()).decode()
    return f"{header}.{body}."


def _flip_signature(token: str) -> str:
    head, body, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return f"{head}.{body}.{flipped}"


def _admin_sub(world, database) -> str:
    from sqlalchemy import select

    from depproxy_pyramid.models import User

    manager, session = database.session()
    with manager:
        return f"account:{session.scalar(select(User.id).where(User.username == 'admin'))}"


@pytest.mark.parametrize(
    "make_token",
    [
        lambda sub: jwt.encode(_claims(sub=sub), "the-wrong-key-" * 4, algorithm="HS256"),
        lambda sub: _alg_none(_claims(sub=sub)),
        lambda sub: jwt.encode(
            _claims(sub=sub, exp=int(time.time()) - 60), JWT_SECRET, algorithm="HS256"
        ),
        lambda sub: jwt.encode(_claims(sub=sub, aud="other"), JWT_SECRET, algorithm="HS256"),
        lambda sub: jwt.encode(_claims(sub=sub, iss="someone-else"), JWT_SECRET, algorithm="HS256"),
        lambda sub: jwt.encode(_claims(sub=sub, exp=None), JWT_SECRET, algorithm="HS256"),
        lambda sub: jwt.encode(_claims(sub=sub), JWT_SECRET, algorithm="HS512"),
        lambda sub: _flip_signature(jwt.encode(_claims(sub=sub), JWT_SECRET, algorithm="HS256")),
        lambda sub: jwt.encode(_claims(sub="account:999999"), JWT_SECRET, algorithm="HS256"),
        lambda sub: jwt.encode(_claims(sub="account:1' OR 1=1"), JWT_SECRET, algorithm="HS256"),
        lambda sub: jwt.encode(_claims(sub=sub, access="all"), JWT_SECRET, algorithm="HS256"),
        lambda sub: "a.b.c",
        lambda sub: "x" * 10000,
    ],
    ids=[
        "wrong-key",
        "alg-none",
        "expired",
        "other-audience",
        "other-issuer",
        "no-expiry",
        "hs512",
        "tampered-signature",
        "unknown-user",
        "sql-subject",
        "malformed-access",
        "garbage",
        "huge",
    ],
)
def test_tampered_tokens_are_rejected(testapp, world, database, make_token):
    token = make_token(_admin_sub(world, database))
    for method in ("GET", "HEAD"):
        response = testapp.request(
            "/v2/",
            method=method,
            headers={"Authorization": f"Bearer {token}"},
            expect_errors=True,
        )
        assert response.status_int == 401
        assert response.headers["WWW-Authenticate"] == (
            'Bearer realm="http://registry.test/jwt/auth",service="dependency_proxy"'
        )
    assert_registry_error(
        testapp.get("/v2/", headers={"Authorization": f"Bearer {token}"}, expect_errors=True),
        401,
        "UNAUTHORIZED",
    )


def test_the_untampered_claims_open_v2(testapp, world, database):
    """The control for the cases above: each differs from this token in one way only."""
    token = jwt.encode(_claims(sub=_admin_sub(world, database)), JWT_SECRET, algorithm="HS256")
    assert testapp.get("/v2/", headers={"Authorization": f"Bearer {token}"}).status_int == 200


def test_a_genuine_token_opens_v2(testapp, world):
    token = testapp.get("/jwt/auth", headers=basic(*world.credentials["admin"])).json["token"]
    for method in ("GET", "HEAD"):
        response = testapp.request(
            "/v2/", method=method, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_int == 200
        assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_v2_without_credentials_challenges(testapp):
    response = testapp.get("/v2/", expect_errors=True)
    assert_registry_error(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="http://registry.test/jwt/auth",service="dependency_proxy"'
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v2/../../etc/passwd",
        "/v2/%2e%2e/%2e%2e/etc/passwd",
        "/v2/pub/dependency_proxy/containers/..%2f..%2fetc/manifests/latest",
        "/v2/pub'%20OR%201=1/dependency_proxy/containers/alpine/manifests/latest",
        "/v2/" + "a/" * 300 + "dependency_proxy/containers/alpine/manifests/latest",
        "/v2/pub/dependency_proxy/containers/alpine/manifests/" + "x" * 500,
        "/jwt/../v2/",
        "/%00",
    ],
)
def test_hostile_paths(testapp, app_kind, world, path):
    token = testapp.get("/jwt/auth", headers=basic(*world.credentials["admin"])).json["token"]
    for headers in ({}, {"Authorization": f"Bearer {token}"}):
        response = testapp.get(path, headers=headers, expect_errors=True)
        assert 400 <= response.status_int < 500
        if app_kind == "embedded" and not path.startswith("/v2/"):
            # Outside the add-on's paths a host portal answers with its own pages.
            assert (response.status_int, response.text) == (404, "cookiecutter 404")
        else:
            assert response.json["errors"][0]["code"]
