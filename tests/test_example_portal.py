"""`examples/portal`: a host portal with its own users, pages and writes, the add-on inside."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import sqlalchemy as sa
import webtest
from portal import main
from portal.models import Note, PortalUser
from portal.scripts import main as portal_admin
from pyramid.router import Router
from sqlalchemy.orm import Session

from depproxy_pyramid.models import Group, ProxySettings, Visibility
from tests.conftest import JWT_SECRET, Database, app_settings, basic, migrate

BIN = Path(sys.executable).parent
SESSION_SECRET = "portal-test-secret-" + "y" * 40
PASSWORDS = {"alice": "alice-password", "bob": "bob-password"}
ACME_ALPINE = "acme/dependency_proxy/containers/alpine"
PUB_ALPINE = "pub/dependency_proxy/containers/alpine"


@dataclass
class Portal:
    ini: Path
    url: str
    app: Router


def run(command: str, ini: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / command), str(ini), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def portal(tmp_path_factory) -> Portal:
    """The portal's ini, database and app: alice (member, developer of acme), bob (admin)."""
    workdir = tmp_path_factory.mktemp("portal")
    url = f"sqlite:///{workdir / 'portal.sqlite'}"
    settings = app_settings(
        url,
        workdir / "storage",
        **{
            "portal.session_secret": SESSION_SECRET,
            # Nothing here may reach an upstream; if something did, it fails at once.
            "depproxy.upstream.url": "http://127.0.0.1:9",
        },
    )
    ini = workdir / "portal.ini"
    ini.write_text(
        "[app:main]\nuse = egg:depproxy-portal-example\n"
        + "".join(f"{key} = {value}\n" for key, value in settings.items())
    )
    migrate(url)
    assert ok(run("portal-admin", ini, "initdb")).startswith("portal tables are ready")
    for args, stdin, output in (
        (("user", "add", "alice"), PASSWORDS["alice"], "created member alice"),
        (("user", "add", "bob", "--role", "admin"), PASSWORDS["bob"], "created admin bob"),
        (("team", "add", "alice", "acme", "developer"), "", "alice is developer of acme"),
    ):
        assert ok(run("portal-admin", ini, *args, stdin=f"{stdin}\n")) == output
    database = Database(url)
    manager, dbsession = database.session()
    with manager:
        for path, visibility in (("acme", Visibility.PRIVATE), ("pub", Visibility.PUBLIC)):
            dbsession.add(
                Group(
                    path=path,
                    name=path,
                    visibility=visibility,
                    proxy_settings=ProxySettings(enabled=True),
                )
            )
    database.engine.dispose()
    return Portal(ini=ini, url=url, app=main({}, **settings))


@pytest.fixture
def app(portal) -> webtest.TestApp:
    return webtest.TestApp(portal.app)


def csrf_token(response: webtest.TestResponse) -> str:
    match = re.search(
        r'<input type="hidden" name="csrf_token" value="([0-9a-f]{40})">', response.text
    )
    assert match is not None, response.text
    return match.group(1)


def sign_in(app: webtest.TestApp, username: str) -> None:
    token = csrf_token(app.get("/login"))
    form = {"csrf_token": token, "username": username, "password": PASSWORDS[username]}
    assert app.post("/login", form, status=303).location == "http://localhost/"


def token_request(app, headers: dict[str, str], *repositories: str, status: int = 200):
    params = [("service", "dependency_proxy")]
    params += [("scope", f"repository:{name}:pull") for name in repositories]
    return app.get("/jwt/auth", params=params, headers=headers, status=status)


def access(response: webtest.TestResponse) -> list[dict]:
    claims = jwt.decode(
        response.json["token"], JWT_SECRET, algorithms=["HS256"], audience="dependency_proxy"
    )
    return claims["access"]


def pull_grant(name: str) -> dict:
    return {"type": "repository", "name": name, "actions": ["pull"]}


def test_sign_in_and_out(app):
    form = app.get("/login", status=200)
    assert form.content_type == "text/html"
    token = csrf_token(form)

    wrong = {"csrf_token": token, "username": "alice", "password": "not-her-password"}
    refused = app.post("/login", wrong, status=400)
    assert '<p class="error">wrong username or password</p>' in refused.text
    assert 'name="username" value="alice"' in refused.text
    nobody = {"csrf_token": token, "username": "nobody", "password": "whatever"}
    assert "wrong username or password" in app.post("/login", nobody, status=400).text

    forged = app.post("/login", {"username": "alice", "password": PASSWORDS["alice"]}, status=400)
    assert "<title>portal 400</title>" in forged.text
    assert "Signed in as" not in app.get("/").text

    right = {"csrf_token": token, "username": "alice", "password": PASSWORDS["alice"]}
    signed_in = app.post("/login", right, status=303)
    assert signed_in.location == "http://localhost/"
    assert "session" in app.cookies
    home = app.get("/", status=200)
    assert "Signed in as <b>alice</b> (member)" in home.text
    # Signing in issues a new CSRF token; the one from the anonymous form is spent.
    assert csrf_token(home) != token
    app.post("/logout", {"csrf_token": token}, status=400)

    assert app.post("/logout", {"csrf_token": csrf_token(home)}, status=303).location == (
        "http://localhost/"
    )
    home = app.get("/", status=200)
    assert "Signed in as" not in home.text
    assert '<a href="/login">Sign in</a>' in home.text


def test_the_portals_own_writes_are_committed(app, portal):
    anonymous = app.post("/notes", {"text": "from nobody"}, status=303)
    assert anonymous.location == "http://localhost/login"
    sign_in(app, "alice")
    token = csrf_token(app.get("/"))
    app.post("/notes", {"text": "without a token"}, status=400)
    app.post("/notes", {"csrf_token": token, "text": "first note"}, status=303)
    app.post("/notes", {"csrf_token": token, "text": "second <note>"}, status=303)

    # A new engine and session: only committed rows are visible here.
    engine = sa.create_engine(portal.url)
    try:
        with Session(engine) as dbsession:
            rows = dbsession.execute(
                sa.select(Note.text, PortalUser.username)
                .join(PortalUser, PortalUser.id == Note.author_id)
                .order_by(Note.id)
            ).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in rows] == [("first note", "alice"), ("second <note>", "alice")]
    assert "<li>second &lt;note&gt; <small>(alice, " in app.get("/").text


def test_portal_pages_and_registry_errors_each_keep_their_own(portal):
    member, admin = webtest.TestApp(portal.app), webtest.TestApp(portal.app)
    assert member.get("/admin", status=303).location == "http://localhost/login"
    sign_in(member, "alice")
    sign_in(admin, "bob")

    forbidden = member.get("/admin", status=403)
    assert forbidden.content_type == "text/html"
    assert "<h1>portal 403</h1>" in forbidden.text
    users = admin.get("/admin", status=200)
    assert "<tr><td>alice</td><td>member</td><td>acme (developer)</td></tr>" in users.text
    assert "<tr><td>bob</td><td>admin</td><td></td></tr>" in users.text

    missing = member.get("/no/such/page", status=404)
    assert missing.content_type == "text/html"
    assert "<h1>portal 404</h1>" in missing.text
    assert "Docker-Distribution-Api-Version" not in missing.headers

    base = member.get("/v2/", status=401)
    assert base.content_type == "application/json"
    assert base.json["errors"][0]["code"] == "UNAUTHORIZED"
    assert base.headers["WWW-Authenticate"] == (
        'Bearer realm="http://registry.test/jwt/auth",service="dependency_proxy"'
    )
    unknown = member.get("/v2/no/such/thing", status=404)
    assert unknown.content_type == "application/json"
    assert unknown.json["errors"][0]["code"] == "UNSUPPORTED"
    assert "portal 404" not in unknown.text


def test_registry_sign_in_goes_through_the_portals_users_and_teams(app, portal):
    alice = token_request(app, basic("alice", PASSWORDS["alice"]), ACME_ALPINE, PUB_ALPINE)
    assert access(alice) == [pull_grant(ACME_ALPINE), pull_grant(PUB_ALPINE)]
    # The bearer token is checked against the portal's users again on every request.
    bearer = {"Authorization": f"Bearer {alice.json['token']}"}
    assert app.get("/v2/", headers=bearer, status=200).json == {}

    # A portal admin is no registry admin: without a team, no private group.
    bob = token_request(app, basic("bob", PASSWORDS["bob"]), ACME_ALPINE, PUB_ALPINE)
    assert access(bob) == [pull_grant(PUB_ALPINE)]
    bearer = {"Authorization": f"Bearer {bob.json['token']}"}
    hidden = app.get(f"/v2/{ACME_ALPINE}/manifests/latest", headers=bearer, status=404)
    assert hidden.json["errors"][0]["code"] == "NAME_UNKNOWN"

    wrong = token_request(app, basic("alice", "not-her-password"), ACME_ALPINE, status=401)
    assert wrong.json["errors"][0]["code"] == "UNAUTHORIZED"
    # The add-on's own user table no longer signs anyone in.
    ok(run("depproxy-admin", portal.ini, "user", "add", "carol", stdin="carol-password\n"))
    token_request(app, basic("carol", "carol-password"), PUB_ALPINE, status=401)


def test_a_portal_session_never_opens_the_registry(app):
    sign_in(app, "bob")
    assert app.get("/admin", status=200).content_type == "text/html"

    pull = app.get(f"/v2/{ACME_ALPINE}/manifests/latest", status=401)
    assert pull.content_type == "application/json"
    assert pull.json["errors"][0]["code"] == "UNAUTHORIZED"
    assert pull.headers["WWW-Authenticate"] == (
        'Bearer realm="http://registry.test/jwt/auth",service="dependency_proxy",'
        f'scope="repository:{ACME_ALPINE}:pull"'
    )
    public = app.get(f"/v2/{PUB_ALPINE}/manifests/latest", status=401)
    assert public.json["errors"][0]["code"] == "UNAUTHORIZED"
    # At the token endpoint the session is nobody: the anonymous token grants nothing.
    assert access(token_request(app, {}, ACME_ALPINE, PUB_ALPINE)) == []


def test_portal_admin_reports_errors_in_one_line(portal, monkeypatch, capsys):
    for args, message in (
        (("team", "add", "alice", "acme", "boss"), "unknown role 'boss'"),
        (("team", "add", "nobody", "acme", "guest"), "no user named 'nobody'"),
        (("team", "add", "alice", "Acme", "guest"), "invalid group path 'Acme'"),
        (("user", "add", "alice"), "a user named 'alice' already exists"),
        (("user", "add", "dave"), "no password on standard input"),
    ):
        monkeypatch.setattr("sys.stdin", io.StringIO(""))
        assert portal_admin([str(portal.ini), *args]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(f"portal-admin: error: {message}"), captured.err


ACME_PAGE = "/registry/groups/acme/-/dependency_proxy"


def test_the_add_ons_pages_take_the_portals_sign_in_under_its_prefix(portal):
    browser = webtest.TestApp(portal.app)
    # Signed out of the portal: nothing of the private group, and no sign-in form of the
    # add-on's own (the portal brings its sign-in).
    assert "There is no such page" in browser.get(ACME_PAGE, status=404).text
    browser.get("/registry/-/dependency_proxy/sign_in", status=404)
    # Registry credentials never open a page.
    browser.get(ACME_PAGE, headers=basic("alice", PASSWORDS["alice"]), status=404)
    # Nor at the root: the pages honour the prefix the portal included the add-on under.
    browser.get("/groups/acme/-/dependency_proxy", status=404)

    sign_in(browser, "alice")
    page = browser.get(ACME_PAGE, status=200)
    assert page.html.find(id="signed-in-as").text == "alice"
    assert page.html.find(id="image-prefix")["value"] == (
        "registry.test/acme/dependency_proxy/containers"
    )
    # A developer: no controls, and a forged post is refused.
    assert page.html.find(id="settings") is None
    forged = browser.post(
        ACME_PAGE + "/settings",
        {"enabled": "false", "csrf_token": csrf_token(browser.get("/"))},
        status=403,
    )
    assert forged.html.find(id="error-message").text == (
        "Only the group's owners and instance admins may do this."
    )
    # The portal's own pages are the portal's as before.
    assert "Signed in as <b>alice</b>" in browser.get("/").text


def test_a_portal_admin_is_not_an_instance_admin_on_the_pages(portal):
    browser = webtest.TestApp(portal.app)
    sign_in(browser, "bob")
    browser.get("/registry/admin/dependency_proxy", status=404)
    browser.get(ACME_PAGE, status=404)
    assert (
        browser.get("/registry/groups/pub/-/dependency_proxy", status=200).html.find(id="settings")
        is None
    )
