"""The JSON API (`/api/v4/groups/:id/dependency_proxy/...`): who may call what, its answers,
pagination and errors, standalone and inside a host portal."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import webtest
from pyramid.config import Configurator
from pyramid.response import Response
from sqlalchemy import select

from depproxy_pyramid.credentials import Keyring
from depproxy_pyramid.models import (
    AuditEvent,
    CachedBlob,
    CachedManifest,
    CachedTag,
    CacheStatus,
    Group,
    Membership,
    Role,
    User,
    Visibility,
)
from depproxy_pyramid.models.accounts import UpstreamCredential
from tests.conftest import app_settings, basic, migrate
from tests.world import PASSWORD, add_personal_access_token, build_world, fresh_sign_in_limits

API = "/api/v4/groups"
CREDENTIALS = "upstream_credentials"
DOCKER_HUB = f"{CREDENTIALS}/registry-1.docker.io"
GROUPS = ("pub", "priv", "priv/nested", "off")
# identity -> for each of GROUPS, "<view><administer>" with Y/N: what the API lets it read
# (settings, TTL policy, cache summary and listings) and change (settings, TTL policy,
# upstream credentials, purge).
ROLES = {
    "guest": ("YN", "YN", "YN", "YN"),
    "reporter": ("YN", "YN", "YN", "YN"),
    "developer": ("YN", "YN", "YN", "YN"),
    "maintainer": ("YN", "YN", "YN", "YN"),
    "owner": ("YY", "YY", "YY", "YY"),
    "elder": ("YN", "YY", "YY", "NN"),  # owner of the parent group "priv" only
    "stranger": ("YN", "NN", "NN", "NN"),  # public groups are visible to every account
    "admin": ("YY", "YY", "YY", "YY"),  # an instance admin, member of nothing
}
SCOPES = ("api", "read_registry")
# Credentials that sign no one in to the API: 401 on every call.
REJECTED = ("no token", "invalid token", "revoked token", "expired token", "inactive user's "
            "token", "password")  # fmt: skip
IDENTITIES = [f"{who}:{scope}" for who in ROLES for scope in SCOPES] + list(REJECTED)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    ok: int
    changes: bool  # needs ADMINISTER; reads need VIEW
    body: Any = None


def calls_for(group: str) -> list[Call]:
    enabled = group != "off"  # what each group has: a permitted change then changes nothing
    return [
        Call("GET", "/cache", 200, False),
        Call("GET", "/settings", 200, False),
        Call("GET", "/image_ttl_policy", 200, False),
        Call("GET", "/manifests", 200, False),
        Call("GET", "/blobs", 200, False),
        Call("PUT", "/settings", 200, True, {"enabled": enabled}),
        Call("PUT", "/image_ttl_policy", 200, True, {"enabled": False, "ttl": 90}),
        Call("GET", "/upstream_credentials", 200, True),
        Call(
            "PUT",
            "/upstream_credentials/registry-1.docker.io",
            200,
            True,
            {"username": "bot", "password": "upstream-password"},
        ),
        Call("DELETE", "/upstream_credentials/registry-1.docker.io", 204, True),
        Call("DELETE", "/cache", 202, True),
    ]


@pytest.fixture(scope="module")
def world(database):
    return build_world(database)


@pytest.fixture(scope="module")
def tokens(database, world) -> dict[str, str]:
    """identity -> the personal access token it presents ("" for none)."""
    found = {"no token": "", "invalid token": "dpat-" + "x" * 43}
    for who in ROLES:
        for scope in SCOPES:
            found[f"{who}:{scope}"] = add_personal_access_token(database, who, scope)[0][1]
    found["revoked token"] = world.credentials["revoked_token"][1]
    found["expired token"] = world.credentials["expired_token"][1]
    found["inactive user's token"] = add_personal_access_token(database, "inactive", "api")[0][1]
    return found


@pytest.fixture(scope="module")
def group_ids(database, world) -> dict[str, int]:
    manager, session = database.session()
    with manager:
        return {path: id_ for path, id_ in session.execute(select(Group.path, Group.id))}


@pytest.fixture(autouse=True)
def _sign_in_limits(app):
    fresh_sign_in_limits(app)


def headers_for(tokens: dict[str, str], identity: str) -> dict[str, str]:
    if identity == "password":
        return basic("owner", PASSWORD)
    token = tokens[identity]
    return {"PRIVATE-TOKEN": token} if token else {}


def call(
    testapp: webtest.TestApp, method: str, path: str, headers: dict[str, str], body: Any = None
) -> webtest.TestResponse:
    response = testapp.request(
        path,
        method=method,
        headers=headers,
        body=json.dumps(body).encode() if body is not None else b"",
        content_type="application/json" if body is not None else None,
        expect_errors=True,
    )
    if response.status_int >= 400:
        assert_api_error(response, response.status_int)
    return response


def assert_api_error(response, status: int, code: str | None = None) -> dict:
    """GitLab's `message` and the registry's `errors`, as JSON, whatever the host's pages."""
    assert response.status_int == status, response.body[:500]
    assert response.content_type == "application/json", response.body[:200]
    assert response.json["message"].startswith(str(status))
    (error,) = response.json["errors"]
    assert set(error) == {"code", "message", "detail"} and error["message"]
    assert "Docker-Distribution-Api-Version" not in response.headers
    if code is not None:
        assert error["code"] == code
    return error


def expected_status(identity: str, group: str, step: Call) -> int:
    if identity in REJECTED:
        return 401
    who, scope = identity.split(":")
    if scope != "api":
        return 403
    if group not in GROUPS:
        return 404
    view, administer = (flag == "Y" for flag in ROLES[who][GROUPS.index(group)])
    if not view:
        return 404  # as for a group that does not exist
    if step.changes and not administer:
        return 403
    return step.ok


def group_ref(group: str, group_ids: dict[str, int]) -> str:
    """How a client names the group: a path, an encoded nested path, or a numeric id."""
    return {
        "priv/nested": "priv%2Fnested",
        "off": str(group_ids["off"]),
        "missing id": "999999",
    }.get(group, group)


@pytest.mark.parametrize("identity", IDENTITIES)
def test_permission_matrix(app, testapp, tokens, group_ids, identity):
    actual, expected = {}, {}
    for group in (*GROUPS, "no-such-group", "missing id"):
        for step in calls_for(group):
            # Every refused token counts against the client's sign-in limit.
            fresh_sign_in_limits(app)
            path = f"{API}/{group_ref(group, group_ids)}/dependency_proxy{step.path}"
            response = call(testapp, step.method, path, headers_for(tokens, identity), step.body)
            actual[(group, step.method, step.path)] = response.status_int
            expected[(group, step.method, step.path)] = expected_status(identity, group, step)
    assert actual == expected


def test_the_refusals_say_why(testapp, tokens):
    path = f"{API}/priv/dependency_proxy/settings"
    missing = assert_api_error(testapp.get(path, expect_errors=True), 401, "UNAUTHORIZED")
    assert "PRIVATE-TOKEN" in missing["message"]
    bad = testapp.get(path, headers={"PRIVATE-TOKEN": "nope"}, expect_errors=True)
    assert_api_error(bad, 401, "UNAUTHORIZED")
    assert bad.headers["WWW-Authenticate"] == (
        'Bearer realm="dependency_proxy_api",error="invalid_token"'
    )
    scope = testapp.get(path, headers=headers_for(tokens, "owner:read_registry"), status=403)
    assert assert_api_error(scope, 403, "DENIED")["detail"] == {"scope": "api"}
    assert 'error="insufficient_scope"' in scope.headers["WWW-Authenticate"]
    unseen = testapp.get(path, headers=headers_for(tokens, "stranger:api"), status=404)
    assert unseen.json["message"] == "404 Group Not Found"
    missing_group = testapp.get(
        f"{API}/no-such-group/dependency_proxy/settings",
        headers=headers_for(tokens, "stranger:api"),
        status=404,
    )
    assert missing_group.json == unseen.json
    role = testapp.put_json(
        path, {"enabled": True}, headers=headers_for(tokens, "maintainer:api"), status=403
    )
    assert role.json["message"] == "403 Forbidden"
    assert "owner" in assert_api_error(role, 403, "DENIED")["message"]


@pytest.mark.parametrize(
    "ref",
    ["2147483647", "2147483648", "9" * 5000, "0", "Priv", "dependency_proxy", "a%2F..", "x" * 300],
)
def test_a_group_reference_that_names_nothing_is_a_404(testapp, tokens, ref):
    response = testapp.get(
        f"{API}/{ref}/dependency_proxy/settings",
        headers=headers_for(tokens, "owner:api"),
        expect_errors=True,
    )
    assert assert_api_error(response, 404)["code"] == "NAME_UNKNOWN"


@pytest.mark.parametrize("ref", ["priv%2F", "%2Fpriv", "priv%2F%2Fnested"])
def test_a_path_with_an_empty_segment_is_no_api_path(testapp, tokens, ref):
    """Nothing of the API answers it: were a route to match a path the API's policy does not
    judge, a host without a policy would let anyone call it."""
    response = testapp.put(
        f"{API}/{ref}/dependency_proxy/settings",
        b'{"enabled": false}',
        headers={**headers_for(tokens, "owner:api"), "Content-Type": "application/json"},
        expect_errors=True,
    )
    assert response.status_int == 404
    assert "message" not in (response.json if response.content_type == "application/json" else {})


def test_a_bearer_token_is_a_personal_access_token_never_a_registry_token(testapp, tokens):
    path = f"{API}/priv/dependency_proxy/settings"
    bearer = {"Authorization": f"Bearer {tokens['owner:api']}"}
    assert testapp.get(path, headers=bearer).json == {"enabled": True}
    jwt = testapp.get(
        "/jwt/auth",
        params={"scope": "repository:priv/dependency_proxy/containers/alpine:pull"},
        headers=basic("owner", PASSWORD),
    ).json["token"]
    refused = testapp.get(path, headers={"Authorization": f"Bearer {jwt}"}, status=401)
    assert_api_error(refused, 401, "UNAUTHORIZED")
    # And the API's token opens no registry path.
    assert testapp.get("/v2/", headers=bearer, status=401)


def _fresh_group(database, path: str, *, blobs: int = 0, manifests: int = 0) -> int:
    """A private group owned by "owner", holding `blobs` cached blobs of sizes 1..n bytes and
    `manifests` tagged manifests."""
    manager, session = database.session()
    with manager:
        owner = session.scalar(select(User).where(User.username == "owner"))
        group = Group(path=path, name=path, visibility=Visibility.PRIVATE)
        session.add(group)
        session.add(Membership(group=group, user=owner, role=Role.OWNER))
        session.flush()
        for n in range(1, blobs + 1):
            session.add(
                CachedBlob(
                    group_id=group.id,
                    digest=f"sha256:{n:064x}",
                    size=n,
                    content_type="application/octet-stream",
                    storage_key=f"{path}/b{n}",
                )
            )
        for n in range(1, manifests + 1):
            digest = f"sha256:{n:064x}"
            session.add(
                CachedManifest(
                    group_id=group.id,
                    image=f"library/image{n}",
                    digest=digest,
                    size=100 + n,
                    content_type="application/vnd.oci.image.manifest.v1+json",
                    storage_key=f"{path}/m{n}",
                )
            )
            session.add(
                CachedTag(group_id=group.id, image=f"library/image{n}", tag="1.0", digest=digest)
            )
        return group.id


def _audit(database, path: str) -> list[tuple[str, str, dict]]:
    manager, session = database.session()
    with manager:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.group_path == path).order_by(AuditEvent.id)
        ).all()
        return [(e.actor, e.action, json.loads(e.detail)) for e in events]


def test_settings_and_ttl_policy_change_and_are_audited(testapp, database, tokens, request):
    path = f"api-settings-{request.node.callspec.id}".lower()
    _fresh_group(database, path)
    owner = headers_for(tokens, "owner:api")
    base = f"{API}/{path}/dependency_proxy"
    assert testapp.get(f"{base}/settings", headers=owner).json == {"enabled": True}
    assert testapp.get(f"{base}/image_ttl_policy", headers=owner).json == {
        "enabled": False,
        "ttl": 90,
    }
    changed = testapp.put_json(f"{base}/settings", {"enabled": False}, headers=owner)
    assert changed.json == {"enabled": False}
    assert testapp.put_json(f"{base}/image_ttl_policy", {"ttl": 7}, headers=owner).json == {
        "enabled": False,
        "ttl": 7,
    }
    assert testapp.put_json(f"{base}/image_ttl_policy", {"enabled": True}, headers=owner).json == {
        "enabled": True,
        "ttl": 7,
    }
    assert testapp.get(f"{base}/settings", headers=owner).json == {"enabled": False}
    assert _audit(database, path) == [
        ("user:owner", "proxy.settings", {"enabled": [True, False]}),
        ("user:owner", "proxy.ttl_policy", {"ttl_days": [90, 7]}),
        ("user:owner", "proxy.ttl_policy", {"enabled": [False, True]}),
    ]


def test_disabling_stops_pulls_at_once_even_with_a_token_in_hand(
    testapp, database, tokens, request
):
    path = f"api-disable-{request.node.callspec.id}".lower()
    _fresh_group(database, path)
    name = f"{path}/dependency_proxy/containers/library/alpine"
    registry_token = testapp.get(
        "/jwt/auth", params={"scope": f"repository:{name}:pull"}, headers=basic("owner", PASSWORD)
    ).json["token"]
    owner = headers_for(tokens, "owner:api")
    testapp.put_json(f"{API}/{path}/dependency_proxy/settings", {"enabled": False}, headers=owner)
    refused = testapp.get(
        f"/v2/{name}/manifests/latest",
        headers={"Authorization": f"Bearer {registry_token}"},
        status=403,
    )
    assert refused.json["errors"][0]["code"] == "DENIED"
    assert "disabled" in refused.json["errors"][0]["message"]


@pytest.mark.parametrize(
    ("route", "body", "complaint"),
    [
        ("image_ttl_policy", b'{"ttl": 0}', "1 to 365 days"),
        ("image_ttl_policy", b'{"ttl": 366}', "1 to 365 days"),
        ("image_ttl_policy", b'{"ttl": 10000000000000000000000}', "1 to 365 days"),
        ("image_ttl_policy", b'{"ttl": "7"}', "ttl must be a whole number"),
        ("image_ttl_policy", b'{"ttl": 7.0}', "ttl must be a whole number"),
        ("image_ttl_policy", b'{"ttl": true}', "ttl must be a whole number"),
        ("image_ttl_policy", b'{"enabled": 1}', "enabled must be a boolean"),
        ("settings", b'{"enabled": "false"}', "enabled must be a boolean"),
        ("settings", b'{"enabled": null}', "enabled must be a boolean"),
        ("settings", b'{"enable": false}', "unknown field 'enable'"),
        ("settings", b"{}", "give at least one of enabled"),
        ("settings", b"[]", "not a JSON object"),
        ("settings", b"", "not valid JSON"),
        ("settings", b'{"enabled": fal', "not valid JSON"),
        ("settings", b"\xff\xfe{", "not valid JSON"),
        ("settings", b"[" * 100_000, "larger than"),
        ("settings", b"[" * 30_000 + b"]" * 30_000, "not valid JSON"),
        (f"{CREDENTIALS}/registry-1.docker.io", b'{"username": "bot"}', "both"),
        (f"{CREDENTIALS}/registry-1.docker.io", b'{"username": "", "password": "x"}', "1 to 255"),
        (f"{CREDENTIALS}/other.example", b'{"username": "a", "password": "b"}', "not a configured"),
        (f"{DOCKER_HUB}", b'{"username": "a\\u0000", "password": "b"}', "control characters"),
        (f"{DOCKER_HUB}", b'{"username": "a", "password": "\\ud800"}', "not valid Unicode"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_that_changes_nothing(testapp, database, tokens, route, body, complaint):
    owner = headers_for(tokens, "owner:api")
    response = testapp.put(
        f"{API}/priv/dependency_proxy/{route}",
        body,
        headers={**owner, "Content-Type": "application/json"},
        status=400,
    )
    error = assert_api_error(response, 400, "UNSUPPORTED")
    assert complaint in error["message"]
    assert response.json["message"] == f"400 Bad request - {error['message']}"
    assert testapp.get(f"{API}/priv/dependency_proxy/settings", headers=owner).json == {
        "enabled": True
    }
    assert testapp.get(f"{API}/priv/dependency_proxy/image_ttl_policy", headers=owner).json == {
        "enabled": False,
        "ttl": 90,
    }
    assert testapp.get(f"{API}/priv/dependency_proxy/{CREDENTIALS}", headers=owner).json == []


def test_upstream_credentials_are_write_only(testapp, database, tokens, request):
    path = f"api-credentials-{request.node.callspec.id}".lower()
    _fresh_group(database, path)
    owner = headers_for(tokens, "owner:api")
    base = f"{API}/{path}/dependency_proxy/upstream_credentials"
    put = testapp.put_json(
        f"{base}/Registry-1.Docker.IO", {"username": "bot", "password": "s3cret-pw"}, headers=owner
    )
    assert put.json == {"registry": "registry-1.docker.io", "username": "bot"}
    listed = testapp.get(base, headers=owner)
    assert listed.json == [{"registry": "registry-1.docker.io"}]
    manager, session = database.session()
    with manager:
        stored = session.scalars(
            select(UpstreamCredential).join(Group).where(Group.path == path)
        ).one()
        assert "s3cret-pw" not in stored.password_encrypted
        keys = testapp.app.registry["depproxy.settings"].encryption_keys
        assert Keyring(keys).decrypt(stored.password_encrypted) == "s3cret-pw"
    assert testapp.delete(f"{base}/registry-1.docker.io", headers=owner, status=204).body == b""
    again = testapp.delete(f"{base}/registry-1.docker.io", headers=owner, status=404)
    assert again.json["message"] == "404 Upstream Credentials Not Found"
    audit = _audit(database, path)
    assert [(actor, action) for actor, action, _ in audit] == [
        ("user:owner", "credentials.set"),
        ("user:owner", "credentials.remove"),
    ]
    assert "s3cret-pw" not in json.dumps(audit)


def test_listings_are_paginated_the_gitlab_way(testapp, database, tokens, request):
    path = f"api-pages-{request.node.callspec.id}".lower()
    group_id = _fresh_group(database, path, blobs=45, manifests=3)
    owner = headers_for(tokens, "owner:api")
    base = f"{API}/{group_id}/dependency_proxy"

    second = testapp.get(f"{base}/blobs", params={"page": "2"}, headers=owner)
    assert [blob["size"] for blob in second.json] == list(range(25, 5, -1))  # largest first
    assert second.json[0]["digest"] == f"sha256:{25:064x}"
    assert set(second.json[0]) == {"digest", "media_type", "size", "created_at", "read_at"}
    link = f"http://registry.test{base}/blobs"
    assert {k: v for k, v in second.headers.items() if k.startswith("X-")} == {
        "X-Total": "45",
        "X-Total-Pages": "3",
        "X-Per-Page": "20",
        "X-Page": "2",
        "X-Next-Page": "3",
        "X-Prev-Page": "1",
    }
    assert second.headers["Link"] == ", ".join(
        [
            f'<{link}?page=1&per_page=20>; rel="prev"',
            f'<{link}?page=3&per_page=20>; rel="next"',
            f'<{link}?page=1&per_page=20>; rel="first"',
            f'<{link}?page=3&per_page=20>; rel="last"',
        ]
    )
    last = testapp.get(f"{base}/blobs", params={"page": "3"}, headers=owner)
    assert [blob["size"] for blob in last.json] == [5, 4, 3, 2, 1]
    assert (last.headers["X-Next-Page"], last.headers["X-Prev-Page"]) == ("", "2")
    assert 'rel="next"' not in last.headers["Link"]
    past = testapp.get(f"{base}/blobs", params={"page": "9"}, headers=owner)
    assert past.json == []
    assert (past.headers["X-Next-Page"], past.headers["X-Prev-Page"]) == ("", "")
    capped = testapp.get(f"{base}/blobs", params={"per_page": "500"}, headers=owner)
    assert len(capped.json) == 45 and capped.headers["X-Per-Page"] == "100"
    assert capped.headers["X-Total-Pages"] == "1"

    manifests = testapp.get(f"{base}/manifests", params={"per_page": "2"}, headers=owner)
    assert manifests.headers["X-Total"] == "3" and manifests.headers["X-Total-Pages"] == "2"
    assert len(manifests.json) == 2
    assert set(manifests.json[0]) == {
        "image_name", "tag", "digest", "media_type", "size", "image_size", "read_at"
    }  # fmt: skip
    assert {(m["tag"], m["size"]) for m in manifests.json} <= {("1.0", 100 + n) for n in (1, 2, 3)}

    summary = testapp.get(f"{base}/cache", headers=owner).json
    assert {k: v for k, v in summary.items() if k != "last_read_at"} == {
        "image_count": 3,
        "images_size": 306,
        "blob_count": 45,
        "blobs_size": 45 * 46 // 2,
        "total_size": 306 + 45 * 46 // 2,
    }
    assert summary["last_read_at"].endswith("Z")

    for bad in ({"page": "0"}, {"page": "-1"}, {"page": "abc"}, {"page": "1.5"},
                {"per_page": "0"}, {"per_page": ""}, {"page": "9" * 12}):  # fmt: skip
        refused = testapp.get(f"{base}/blobs", params=bad, headers=owner, status=400)
        assert_api_error(refused, 400, "UNSUPPORTED")


def test_purge_stops_the_cache_and_is_audited(testapp, database, tokens, request):
    path = f"api-purge-{request.node.callspec.id}".lower()
    group_id = _fresh_group(database, path, blobs=2, manifests=1)
    owner = headers_for(tokens, "owner:api")
    base = f"{API}/{path}/dependency_proxy"
    purged = testapp.delete(f"{base}/cache", headers=owner, status=202)
    assert purged.json == {"message": "202 Accepted", "manifests": 1, "blobs": 2}
    assert testapp.get(f"{base}/cache", headers=owner).json["total_size"] == 0
    assert testapp.get(f"{base}/blobs", headers=owner).headers["X-Total"] == "0"
    manager, session = database.session()
    with manager:
        statuses = session.scalars(
            select(CachedBlob.status).where(CachedBlob.group_id == group_id)
        ).all()
        assert statuses == [CacheStatus.PENDING_DESTRUCTION] * 2
    assert _audit(database, path) == [("user:owner", "cache.purge", {"manifests": 1, "blobs": 2})]


@pytest.mark.parametrize("registry", ["%00", "x" * 300, "no.such.registry"])
def test_clearing_credentials_a_group_cannot_have_is_a_404(testapp, tokens, registry):
    response = testapp.delete(
        f"{API}/priv/dependency_proxy/{CREDENTIALS}/{registry}",
        headers=headers_for(tokens, "owner:api"),
        status=404,
    )
    assert response.json["message"] == "404 Upstream Credentials Not Found"


def test_head_answers_as_get_without_a_body(testapp, tokens):
    owner = headers_for(tokens, "owner:api")
    head = testapp.head(f"{API}/priv/dependency_proxy/blobs", headers=owner, status=200)
    assert head.body == b"" and head.headers["X-Total"] == "0"


def test_links_name_a_group_path_encoded(testapp, tokens):
    owner = headers_for(tokens, "owner:api")
    response = testapp.get(f"{API}/priv%2Fnested/dependency_proxy/manifests", headers=owner)
    url = f"http://registry.test{API}/priv%2Fnested/dependency_proxy/manifests"
    assert response.headers["Link"] == (
        f'<{url}?page=1&per_page=20>; rel="first", <{url}?page=1&per_page=20>; rel="last"'
    )


@pytest.mark.parametrize(
    ("method", "route", "allow"),
    [
        ("POST", "cache", "GET, HEAD, DELETE"),
        ("PUT", "cache", "GET, HEAD, DELETE"),
        ("DELETE", "settings", "GET, HEAD, PUT"),
        ("PATCH", "image_ttl_policy", "GET, HEAD, PUT"),
        ("POST", "manifests", "GET, HEAD"),
        ("DELETE", "blobs", "GET, HEAD"),
        ("GET", "upstream_credentials/registry-1.docker.io", "PUT, DELETE"),
    ],
)
def test_other_methods_are_405_with_allow(testapp, tokens, method, route, allow):
    response = testapp.request(
        f"{API}/priv/dependency_proxy/{route}",
        method=method,
        headers=headers_for(tokens, "owner:api"),
        expect_errors=True,
    )
    assert_api_error(response, 405, "UNSUPPORTED")
    assert response.headers["Allow"] == allow


@pytest.mark.parametrize(
    "path",
    [
        f"{API}/priv/dependency_proxy/nothing-here",
        f"{API}/priv/dependency_proxy/",
        f"{API}/priv/dependency_proxy",
        f"{API}/priv/dependency_proxy/cache/extra",
    ],
)
def test_unknown_api_paths_are_json_404s(testapp, tokens, path):
    response = testapp.get(path, headers=headers_for(tokens, "owner:api"), expect_errors=True)
    assert_api_error(response, 404, "UNSUPPORTED")


def test_a_path_that_is_not_utf8_is_a_json_400(testapp, tokens):
    response = testapp.get(
        f"{API}/%FF/dependency_proxy/settings",
        headers=headers_for(tokens, "owner:api"),
        expect_errors=True,
    )
    assert_api_error(response, 400, "UNSUPPORTED")


def test_token_guessing_meets_the_sign_in_limit(testapp, tokens):
    path = f"{API}/priv/dependency_proxy/settings"
    at = {"REMOTE_ADDR": "203.0.113.9"}
    for n in range(10):
        guess = {"PRIVATE-TOKEN": f"dpat-guess-{n}"}
        testapp.get(path, headers=guess, extra_environ=at, status=401)
    refused = testapp.get(
        path, headers={"PRIVATE-TOKEN": "dpat-guess-10"}, extra_environ=at, status=429
    )
    assert assert_api_error(refused, 429, "TOOMANYREQUESTS")["detail"]["retry_after"] > 0
    assert int(refused.headers["Retry-After"]) > 0
    # While the address is over the limit, even a good token waits, as on /jwt/auth.
    owner = headers_for(tokens, "owner:api")
    testapp.get(path, headers=owner, extra_environ=at, status=429)
    assert testapp.get(path, headers=owner, extra_environ={"REMOTE_ADDR": "203.0.113.10"}).json


def test_the_api_is_at_the_root_whatever_the_hosts_prefix(database, world, tokens, tmp_path):
    with Configurator(settings=app_settings(database.url, tmp_path / "storage")) as config:
        config.include("depproxy_pyramid", route_prefix="/registry")
        config.add_notfound_view(lambda request: Response("host 404", status=404))
        config.add_forbidden_view(lambda request: Response("host 403", status=403))
    host = webtest.TestApp(config.make_wsgi_app())
    owner = headers_for(tokens, "owner:api")
    assert host.get(f"{API}/priv/dependency_proxy/settings", headers=owner).json == {
        "enabled": True
    }
    assert_api_error(host.get(f"{API}/priv/dependency_proxy/settings", status=401), 401)
    assert host.get(f"/registry{API}/priv/dependency_proxy/settings", status=404).text == "host 404"
    # Elsewhere under /api/v4 the host's own pages answer.
    assert host.get(f"{API}/priv/projects", status=404).text == "host 404"


def test_a_host_account_source_without_tokens_opens_the_api_to_no_one(tmp_path, tokens):
    from tests.hosts import in_code

    url = f"sqlite:///{tmp_path / 'host.sqlite'}"
    migrate(url)
    settings = app_settings(url, tmp_path / "storage")
    host = webtest.TestApp(in_code.make_app(settings, with_addon=True))
    for headers in (
        {"PRIVATE-TOKEN": tokens["owner:api"]},
        {"Authorization": "Basic Y2Fyb2w6Y2Fyb2wtcGFzc3dvcmQtMQ=="},  # the host's own admin
    ):
        response = host.get(f"{API}/acme/dependency_proxy/settings", headers=headers, status=401)
        assert_api_error(response, 401, "UNAUTHORIZED")
