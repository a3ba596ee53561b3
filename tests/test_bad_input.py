"""Bad input gets a registry JSON error with a 4xx status: never a 500, never a traceback."""

from __future__ import annotations

import base64
import time

import jwt
import pytest
from pyramid.exceptions import URLDecodeError

from tests.conftest import JWT_SECRET, basic
from tests.world import build_world, fresh_sign_in_limits

PROXY = "dependency_proxy/containers"


@pytest.fixture(scope="module")
def world(database):
    return build_world(database)


@pytest.fixture(autouse=True)
def _sign_in_limits(app):
    # Each test signs in a few times at most; together they would reach the limits.
    fresh_sign_in_limits(app)


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
        "name": "admin",
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
        # Its id given to another account since (SQLite reuses a removed row's id).
        lambda sub: jwt.encode(
            _claims(sub=sub, name="someone-else"), JWT_SECRET, algorithm="HS256"
        ),
        lambda sub: jwt.encode(_claims(sub=sub, name=None), JWT_SECRET, algorithm="HS256"),
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
        "another-subject-name",
        "no-subject-name",
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


UNDECODABLE = ["%c0%80", "%ff", "%e2%82"]  # overlong, never valid, truncated
CONTROL = ["%0d%0a", "%1b[31m", "%00"]
IMAGE = f"pub/{PROXY}/alpine"


def _expected(place: str) -> tuple[int, str]:
    """The one answer each malformed path gets, before any routing or sign-in: a control
    character at the very end would otherwise slip past a route's `$` and serve the tag."""
    return (400, "NAME_INVALID") if place in ("group", "image") else (400, "UNSUPPORTED")


PLACES = {
    "group": "/v2/pu{bad}b/" + PROXY + "/alpine/manifests/latest",
    "image": "/v2/pub/" + PROXY + "/alp{bad}ine/manifests/latest",
    "tag": "/v2/" + IMAGE + "/manifests/latest{bad}",
    "digest": "/v2/" + IMAGE + "/blobs/sha256:{bad}" + "a" * 60,
    "v2-segment": "/v2/{bad}/",
    "v2-suffix": "/v2{bad}",
    "jwt-suffix": "/jwt/auth{bad}",
}


@pytest.mark.parametrize("bad", UNDECODABLE + CONTROL)
@pytest.mark.parametrize("place", PLACES)
def test_malformed_paths_get_a_registry_error(testapp, world, place, bad):
    token = testapp.get(
        "/jwt/auth",
        params={"scope": f"repository:{IMAGE}:pull"},
        headers=basic(*world.credentials["admin"]),
    ).json["token"]
    path = PLACES[place].format(bad=bad)
    for signed_in in (False, True):
        if place == "jwt-suffix":
            headers = basic(*world.credentials["admin"]) if signed_in else {}
        else:
            headers = {"Authorization": f"Bearer {token}"} if signed_in else {}
        response = testapp.get(path, headers=headers, expect_errors=True)
        status, code = _expected(place)
        assert_registry_error(response, status, code)


@pytest.mark.parametrize("bad", UNDECODABLE)
def test_an_undecodable_path_names_what_the_client_sent(testapp, bad):
    response = testapp.get(f"/v2/a{bad}/{PROXY}/alpine/manifests/latest", expect_errors=True)
    error = assert_registry_error(response, 400, "NAME_INVALID")
    assert error["message"] == "invalid repository name: the path is not valid UTF-8"
    assert error["detail"] == {"path": f"/v2/a{bad.upper()}/{PROXY}/alpine/manifests/latest"}


@pytest.mark.parametrize("bad", UNDECODABLE + CONTROL)
@pytest.mark.parametrize("parameter", ["scope", "service"])
def test_malformed_token_requests_get_a_registry_error(testapp, world, parameter, bad):
    values = {"scope": f"repository:pub/{PROXY}/al{bad}pine:pull", "service": f"dep{bad}"}
    response = testapp.get(
        f"/jwt/auth?{parameter}={values[parameter]}",
        headers=basic(*world.credentials["admin"]),
        expect_errors=True,
    )
    if bad in UNDECODABLE:
        error = assert_registry_error(response, 400, "UNSUPPORTED")
        assert error["message"] == "the query string is not valid UTF-8"
    elif parameter == "service":
        assert_registry_error(response, 400, "UNSUPPORTED")
    else:
        # A space splits scopes: CR LF leaves a scope without actions.
        assert_registry_error(response, 400, "UNSUPPORTED" if bad == "%0d%0a" else "NAME_INVALID")


def test_an_undecodable_path_outside_the_addon(testapp, app_kind):
    if app_kind == "embedded":
        # Outside the add-on's paths the host decides; this one has no view for it, so the
        # error reaches the server as it would without the add-on.
        with pytest.raises(URLDecodeError):
            testapp.get("/x%ff")
        return
    response = testapp.get("/x%ff", expect_errors=True)
    assert (response.status_int, response.content_type) == (400, "application/json")
    (error,) = response.json["errors"]
    assert error == {
        "code": "UNSUPPORTED",
        "message": "the path is not valid UTF-8",
        "detail": {"path": "/x%FF"},
    }
