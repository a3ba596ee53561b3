"""The anonymous token flow and the mirror group, through the app (webtest) and its resources.

The world's groups: "pub" (public), "priv" with "priv/nested" (private), "off" (private, proxy
disabled); "guest" is a member of "priv", "stranger" of nothing. The mirror group here is "priv".
The default upstream is a closed local port: a pull that passes authorization ends in 502/503
from there, which tells it apart from every refusal.
"""

from __future__ import annotations

import jwt
import pytest
import webtest
from pyramid.interfaces import ISecurityPolicy
from pyramid.request import Request
from pyramid.scripting import prepare

from depproxy_pyramid import main
from depproxy_pyramid.names import Repository
from depproxy_pyramid.permissions import Permission
from depproxy_pyramid.resources import RepositoryResource, Root
from depproxy_pyramid.settings import ConfigurationError, parse_settings
from depproxy_pyramid.views.registry import registry_factory
from tests.conftest import JWT_SECRET, app_settings, basic
from tests.world import build_world, fresh_sign_in_limits

MIRROR = "priv"
MARKER = "dependency_proxy/containers"
CLOSED_UPSTREAM = "http://127.0.0.1:9"
EXTRA_UPSTREAM = "registry.example.com"


@pytest.fixture(scope="module")
def world(database):
    return build_world(database)


@pytest.fixture(scope="module")
def make_app(database, world, tmp_path_factory):
    apps: dict[tuple, webtest.TestApp] = {}

    def make(**mirror: str) -> webtest.TestApp:
        key = tuple(sorted(mirror.items()))
        if key not in apps:
            settings = app_settings(
                database.url,
                tmp_path_factory.mktemp("storage"),
                **{
                    "depproxy.upstream.url": CLOSED_UPSTREAM,
                    "depproxy.upstream.connect_timeout": "0.5",
                    "depproxy.upstream.registries": EXTRA_UPSTREAM,
                    **mirror,
                },
            )
            apps[key] = webtest.TestApp(main({}, **settings))
        fresh_sign_in_limits(apps[key].app)
        return apps[key]

    return make


@pytest.fixture(scope="module")
def open_mirror(make_app) -> webtest.TestApp:
    return make_app(**{"depproxy.mirror.group": MIRROR, "depproxy.mirror.anonymous": "true"})


@pytest.fixture(scope="module")
def closed_mirror(make_app) -> webtest.TestApp:
    return make_app(**{"depproxy.mirror.group": MIRROR})


@pytest.fixture(scope="module")
def no_mirror(make_app) -> webtest.TestApp:
    return make_app()


def token(app: webtest.TestApp, credentials: tuple[str, str] | None, *names: str) -> str:
    params = [("service", "dependency_proxy")] + [("scope", f"repository:{n}:pull") for n in names]
    headers = basic(*credentials) if credentials else {}
    return app.get("/jwt/auth", params=params, headers=headers).json["token"]


def claims_of(token_: str) -> dict:
    return jwt.decode(token_, JWT_SECRET, algorithms=["HS256"], audience="dependency_proxy")


def granted(token_: str) -> list[str]:
    return [entry["name"] for entry in claims_of(token_)["access"]]


def pull(app: webtest.TestApp, name: str, token_: str | None, **params: str):
    headers = {"Authorization": f"Bearer {token_}"} if token_ else {}
    return app.get(
        f"/v2/{name}/manifests/latest", params=params, headers=headers, expect_errors=True
    )


def in_group(group: str, image: str = "library/alpine") -> str:
    return f"{group}/{MARKER}/{image}"


def assert_passed_authorization(response) -> None:
    # Only the closed upstream answers these: nothing refused the pull.
    assert response.status_int in (502, 503), response.text
    assert response.json["errors"][0]["code"] == "UNAVAILABLE"


def assert_insufficient_scope(response, name: str, message: str = "authentication required"):
    assert response.status_int == 401
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="http://registry.test/jwt/auth",service="dependency_proxy",'
        f'scope="repository:{name}:pull",error="insufficient_scope"'
    )
    assert response.json == {
        "errors": [
            {
                "code": "UNAUTHORIZED",
                "message": message,
                "detail": [{"Type": "repository", "Name": name, "Action": "pull"}],
            }
        ]
    }


# Settings


def test_the_mirror_group_must_be_a_group_path():
    base = {"sqlalchemy.url": "sqlite://", "depproxy.jwt.secret": JWT_SECRET}
    for bad in ("acme/dependency_proxy", "Acme", "acme//web", "a/v2"):
        with pytest.raises(ConfigurationError) as refused:
            parse_settings({**base, "depproxy.mirror.group": bad})
        assert refused.value.key == "depproxy.mirror.group"
    with pytest.raises(ConfigurationError) as refused:
        parse_settings({**base, "depproxy.mirror.anonymous": "true"})
    assert refused.value.key == "depproxy.mirror.anonymous"
    with pytest.raises(ConfigurationError):
        parse_settings({**base, "depproxy.mirror.group": "acme", "depproxy.mirror.anonymous": "?"})
    settings = parse_settings({**base, "depproxy.mirror.group": "acme/mirror"})
    assert (settings.mirror_group, settings.mirror_anonymous) == ("acme/mirror", False)
    assert parse_settings(base).mirror_group is None


# The anonymous token


def test_a_caller_without_credentials_gets_a_token_that_grants_nothing(no_mirror):
    names = [in_group(g) for g in ("pub", "priv", "priv/nested", "off", "missing")]
    response = no_mirror.get(
        "/jwt/auth",
        params=[("service", "dependency_proxy")]
        + [("scope", f"repository:{n}:pull") for n in names],
    )
    assert response.json["expires_in"] == 900
    claims = claims_of(response.json["token"])
    assert (claims["sub"], claims["access"]) == ("anonymous", [])
    assert "mirror" not in claims


def test_wrong_credentials_are_still_refused_never_taken_for_none(no_mirror, world):
    refused = no_mirror.get(
        "/jwt/auth",
        params={"scope": f"repository:{in_group('pub')}:pull"},
        headers=basic("guest", "not the password"),
        status=401,
    )
    assert refused.headers["WWW-Authenticate"] == 'Basic realm="dependency_proxy"'
    for header in ("Basic", "Basic !!!", "Bearer x", "Digest a=b"):
        assert no_mirror.get("/jwt/auth", headers={"Authorization": header}, status=401)


def test_over_the_sign_in_limit_a_caller_gets_429_not_an_anonymous_token(no_mirror, world):
    fresh_sign_in_limits(no_mirror.app)
    for _ in range(no_mirror.app.registry["depproxy.settings"].auth_max_failures):
        no_mirror.get("/jwt/auth", headers=basic("guest", "wrong"), status=401)
    refused = no_mirror.get("/jwt/auth", headers=basic(*world.credentials["guest"]), status=429)
    assert refused.json["errors"][0]["code"] == "TOOMANYREQUESTS"
    # What a caller without credentials gets opens nothing a sign-in would.
    assert granted(token(no_mirror, None, in_group("priv"), in_group("pub"))) == []
    fresh_sign_in_limits(no_mirror.app)


def test_the_anonymous_token_opens_the_v2_ping_as_on_docker_hub(no_mirror):
    anonymous = token(no_mirror, None)
    for method in ("GET", "HEAD"):
        bearer = {"Authorization": f"Bearer {anonymous}"}
        assert no_mirror.request("/v2/", method=method, headers=bearer).status_int == 200
    challenge = no_mirror.get("/v2/", status=401)
    assert challenge.headers["WWW-Authenticate"] == (
        'Bearer realm="http://registry.test/jwt/auth",service="dependency_proxy"'
    )


@pytest.mark.parametrize("group", ["priv", "priv/nested", "pub", "off", "missing"])
def test_an_anonymous_pull_is_answered_alike_for_private_public_disabled_and_missing_groups(
    no_mirror, group
):
    """Docker Hub's answer, which clients explain ("may require 'docker login'"), and nothing
    that tells a private group from one that does not exist."""
    name = in_group(group)
    anonymous = token(no_mirror, None, name)
    assert_insufficient_scope(pull(no_mirror, name, anonymous), name)
    blob = no_mirror.get(
        f"/v2/{name}/blobs/sha256:{'a' * 64}",
        headers={"Authorization": f"Bearer {anonymous}"},
        status=401,
    )
    assert_insufficient_scope(blob, name)


def test_the_anonymous_caller_is_nobody_to_the_host_and_may_do_nothing_else(open_mirror, world):
    anonymous = token(open_mirror, None, "library/alpine")
    request = Request.blank(
        "/v2/library/alpine/manifests/latest", headers={"Authorization": f"Bearer {anonymous}"}
    )
    app = open_mirror.app
    with prepare(registry=app.registry, request=request):
        request.matched_route = app.routes_mapper.get_route("depproxy.registry")
        with request.tm:
            assert request.identity is None
            assert request.authenticated_userid is None
            root = Root(request)
            mirror = root.find(MIRROR)
            assert request.has_permission(
                Permission.PULL,
                RepositoryResource(Repository(MIRROR, "library/alpine", "library/alpine"), mirror),
            )
            for permission in (Permission.VIEW, Permission.ADMINISTER):
                assert not request.has_permission(permission, mirror)
                assert not request.has_permission(permission, root)
            assert not request.has_permission(Permission.VIEW, root.find("priv/nested"))
            policy = app.registry.getUtility(ISecurityPolicy)
            assert "system.Authenticated" not in policy.addon.effective_principals(request)
    assert open_mirror.get("/-/metrics").status_int == 200  # open: no metrics keys are set


# The mirror group's permissions


ANONYMOUS = None
CASES = [
    # (app, who, scope, granted)
    ("open_mirror", ANONYMOUS, "library/alpine", True),
    ("open_mirror", ANONYMOUS, in_group(MIRROR), True),
    ("open_mirror", ANONYMOUS, in_group("priv/nested"), False),
    ("open_mirror", ANONYMOUS, in_group("pub"), False),
    ("open_mirror", "guest", "library/alpine", True),
    ("open_mirror", "stranger", "library/alpine", False),
    ("closed_mirror", ANONYMOUS, "library/alpine", False),
    ("closed_mirror", ANONYMOUS, in_group(MIRROR), False),
    ("closed_mirror", "guest", "library/alpine", True),
    ("closed_mirror", "deploy_token", "library/alpine", True),
    ("closed_mirror", "pub_deploy_token", "library/alpine", False),
    ("closed_mirror", "stranger", "library/alpine", False),
]


@pytest.mark.parametrize(("which", "who", "name", "expected"), CASES)
def test_the_mirror_group_grants_as_its_own_path_does(request, world, which, who, name, expected):
    app = request.getfixturevalue(which)
    credentials = world.credentials[who] if who else None
    given = token(app, credentials, name)
    assert granted(given) == ([name] if expected else [])
    answer = pull(app, name, given)
    if expected:
        assert_passed_authorization(answer)
    elif who is None:
        assert_insufficient_scope(answer, name)
    elif who == "stranger" or who == "pub_deploy_token":
        # A signed-in caller who may not see the private group: as for any private group.
        assert (answer.status_int, answer.json["errors"][0]["code"]) == (404, "NAME_UNKNOWN")


def test_an_anonymous_mirror_of_a_disabled_group_pulls_nothing(make_app, world):
    app = make_app(**{"depproxy.mirror.group": "off", "depproxy.mirror.anonymous": "true"})
    anonymous = token(app, None, "library/alpine")
    assert granted(anonymous) == []
    assert_insufficient_scope(pull(app, "library/alpine", anonymous), "library/alpine")


def test_mirror_tokens_open_only_the_mirror_and_group_tokens_only_their_group(closed_mirror, world):
    guest = world.credentials["guest"]
    mirror_only = token(closed_mirror, guest, "library/alpine")
    assert claims_of(mirror_only)["mirror"] == MIRROR
    for other in (in_group(MIRROR), in_group("priv/nested"), in_group("pub")):
        assert_insufficient_scope(
            pull(closed_mirror, other, mirror_only),
            other,
            "the token does not grant pull on this repository",
        )
    group_only = token(closed_mirror, guest, in_group(MIRROR), in_group("pub"))
    assert "mirror" not in claims_of(group_only)
    assert_insufficient_scope(
        pull(closed_mirror, "library/alpine", group_only),
        "library/alpine",
        "the token does not grant pull on this repository",
    )
    assert_passed_authorization(pull(closed_mirror, in_group(MIRROR), group_only))


def test_a_mirror_token_does_not_follow_the_setting_to_another_group(make_app, world):
    """Granted while "priv" was the mirror, it opens nothing once "pub" is."""
    guest = world.credentials["guest"]
    before = make_app(**{"depproxy.mirror.group": MIRROR})
    after = make_app(**{"depproxy.mirror.group": "pub"})
    old = token(before, guest, "library/alpine")
    assert_insufficient_scope(
        pull(after, "library/alpine", old),
        "library/alpine",
        "the token does not grant pull on this repository",
    )
    fresh = token(after, guest, "library/alpine")
    assert_passed_authorization(pull(after, "library/alpine", fresh))


# Routing


def test_without_a_mirror_group_bare_names_stay_invalid(no_mirror, world):
    for path in ("/v2/library/alpine/manifests/latest", "/v2/alpine/manifests/latest"):
        refused = no_mirror.get(path, status=400)
        assert refused.json["errors"][0]["code"] == "NAME_INVALID"
    scope = no_mirror.get(
        "/jwt/auth", params={"scope": "repository:library/alpine:pull"}, status=400
    )
    assert scope.json["errors"][0]["code"] == "NAME_INVALID"


def target(app: webtest.TestApp, path: str):
    request = Request.blank(path)
    with prepare(registry=app.app.registry, request=request):
        info = app.app.routes_mapper(request)
        request.matchdict = info["match"]
        with request.tm:
            return registry_factory(request)


@pytest.mark.parametrize(
    ("path", "image"),
    [
        ("/v2/library/alpine/manifests/latest", "library/alpine"),
        ("/v2/alpine/manifests/latest", "alpine"),
        ("/v2/library/alpine/manifests/latest?ns=docker.io", "library/alpine"),
        ("/v2/library/alpine/manifests/latest?ns=Docker.IO", "library/alpine"),
        # The default upstream's own host name stands for it too.
        ("/v2/library/alpine/manifests/latest?ns=127.0.0.1:9", "library/alpine"),
        (
            "/v2/owner/app/blobs/sha256:" + "a" * 64 + "?ns=registry.example.com",
            "registry.example.com/owner/app",
        ),
    ],
)
def test_bare_names_go_to_the_mirror_group_and_ns_picks_a_configured_upstream(
    closed_mirror, path, image
):
    found = target(closed_mirror, path)
    assert (found.repository.group_path, found.repository.image) == (MIRROR, image)
    assert found.repository.name == path.split("/", 2)[2].rsplit("/", 2)[0]
    assert found.group is not None and found.group.path == MIRROR


def test_group_paths_are_unchanged_by_the_mirror(closed_mirror):
    found = target(closed_mirror, f"/v2/{in_group('pub')}/manifests/latest?ns=quay.io")
    assert (found.repository.group_path, found.repository.image) == ("pub", "library/alpine")
    assert found.repository.name == in_group("pub")


@pytest.mark.parametrize("ns", ["quay.io", "ghcr.io", "127.0.0.1:5000", "docker.io.evil.com", ""])
def test_an_unconfigured_ns_is_a_clear_404_for_those_who_may_pull_from_the_mirror(
    request, world, ns
):
    """Never an upstream request; and callers who may not pull learn nothing of which
    registries are configured: they get the mirror group's usual refusal."""
    open_mirror, closed_mirror = (
        request.getfixturevalue(f) for f in ("open_mirror", "closed_mirror")
    )
    name = "library/alpine"
    unmirrored = {"name": name, "ns": ns}
    for app, credentials in ((open_mirror, None), (closed_mirror, world.credentials["guest"])):
        refused = pull(app, name, token(app, credentials, name), ns=ns)
        assert (refused.status_int, refused.json["errors"][0]["detail"]) == (404, unmirrored)
        assert refused.json["errors"][0]["code"] == "NAME_UNKNOWN"
    assert pull(open_mirror, name, None, ns=ns).status_int == 401
    assert_insufficient_scope(
        pull(closed_mirror, name, token(closed_mirror, None, name), ns=ns), name
    )
    stranger = pull(
        closed_mirror, name, token(closed_mirror, world.credentials["stranger"], name), ns=ns
    )
    assert (stranger.status_int, stranger.json["errors"][0]["detail"]) == (404, {"name": name})
