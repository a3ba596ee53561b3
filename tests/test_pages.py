"""The HTML pages through webtest: who sees what, who may post which form, CSRF, sign-in.

Standalone and inside the cookiecutter host (which has no session factory and the add-on's own
accounts: the pages offer their own sign-in form there too), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta

import pytest
import webtest
from sqlalchemy import select

from depproxy_pyramid.models import (
    AuditEvent,
    CachedManifest,
    CachedTag,
    Group,
    ImageTtlPolicy,
    Membership,
    Role,
    User,
    Visibility,
)
from depproxy_pyramid.models.accounts import UpstreamCredential
from tests.conftest import app_settings, basic
from tests.world import PASSWORD, build_world, fresh_sign_in_limits

SIGN_IN = "/-/dependency_proxy/sign_in"
ROLES = ["guest", "reporter", "developer", "maintainer"]
GROUPS = ["pub", "priv", "priv/nested", "off"]
REGISTRY = "registry-1.docker.io"


@pytest.fixture(scope="module")
def world(database):
    return build_world(database)


@pytest.fixture(autouse=True)
def _fresh_limits(app):
    fresh_sign_in_limits(app)


def page_url(group: str, action: str = "") -> str:
    return f"/groups/{group}/-/dependency_proxy{action}"


def signed_in(app, username: str | None) -> webtest.TestApp:
    browser = webtest.TestApp(app)
    if username is None:
        return browser
    form = browser.get(SIGN_IN).forms["sign-in-form"]
    form["username"] = username
    form["password"] = PASSWORD
    answer = form.submit()
    assert answer.status_int == 303, answer.text
    return browser


def _csrf(browser: webtest.TestApp) -> str:
    # Any page carries the session's token; the sign-in page answers everyone.
    page = browser.get(SIGN_IN)
    return page.html.find("input", {"name": "csrf_token"})["value"]


def ttl_days(database, path: str) -> int | None:
    manager, session = database.session()
    with manager:
        group = session.scalar(select(Group).where(Group.path == path))
        policy = session.get(ImageTtlPolicy, group.id)
        return policy.ttl_days if policy is not None else None


def is_member(user: str | None, group: str) -> bool:
    if user in (*ROLES, "owner"):
        return group in GROUPS
    return user == "elder" and group in ("priv", "priv/nested")


def may_administer(user: str | None, group: str) -> bool:
    if group == "missing":
        return False
    return user == "admin" or (user in ("owner", "elder") and is_member(user, group))


def expected_view(user: str | None, group: str) -> int:
    if group == "pub" or user == "admin" and group != "missing" or is_member(user, group):
        return 200
    # Signed out: off to sign in, whether the group is private or missing; signed in: 404.
    return 303 if user is None else 404


def expected_post(user: str | None, group: str) -> int:
    """A form post, or the purge confirmation: 303 back to the page once done."""
    if may_administer(user, group):
        return 303
    if user is None:
        return 303
    return 404 if expected_view(user, group) == 404 else 403


USERS = [None, "stranger", *ROLES, "owner", "elder", "admin"]


@pytest.mark.parametrize("group", [*GROUPS, "missing"])
@pytest.mark.parametrize("user", USERS)
def test_who_sees_a_groups_page_and_its_controls(app, world, user, group):
    browser = signed_in(app, user)
    answer = browser.get(page_url(group), status="*")
    assert answer.status_int == expected_view(user, group)
    if answer.status_int == 303:
        assert answer.location.endswith(SIGN_IN + "?next=" + page_url(group).replace("/", "%2F")), (
            answer.location
        )
    elif answer.status_int == 404:
        assert "There is no such page, or you may not see it." in answer.text
        assert group not in answer.html.find("main").text.replace("Not found", "")
    else:
        assert answer.content_type == "text/html"
        assert "no-store" in answer.headers["Cache-Control"]
        prefix = answer.html.find(id="image-prefix")["value"]
        assert prefix == f"registry.test/{group}/dependency_proxy/containers"
        controls = answer.html.find(id="settings")
        assert (controls is not None) == may_administer(user, group)
        assert ("enabled-form" in answer.forms) == may_administer(user, group)


@pytest.mark.parametrize("group", [*GROUPS, "missing"])
@pytest.mark.parametrize("user", USERS)
def test_who_may_post_each_form(app, world, database, user, group):
    browser = signed_in(app, user)
    token = _csrf(browser)
    days = 3 + USERS.index(user) * 7 + [*GROUPS, "missing"].index(group)
    before = None if group == "missing" else ttl_days(database, group)
    posts = [
        (page_url(group, "/ttl"), {"ttl_enabled": "on", "ttl_days": str(days)}),
        (page_url(group, "/settings"), {"enabled": "true" if group != "off" else "false"}),
        (page_url(group, "/credentials"), {"registry": REGISTRY, "action": "clear"}),
        (page_url(group, "/purge"), {}),
    ]
    for url, fields in posts:
        answer = browser.post(url, {**fields, "csrf_token": token}, status="*")
        assert answer.status_int == expected_post(user, group), (url, answer.text[-500:])
        if answer.status_int == 303 and not may_administer(user, group):
            assert SIGN_IN in answer.location
    confirmation = browser.get(page_url(group, "/purge"), status="*")
    assert confirmation.status_int == (
        200 if may_administer(user, group) else expected_post(user, group)
    )
    if group != "missing":
        after = ttl_days(database, group)
        assert (after == days) == may_administer(user, group), (before, after)


@pytest.mark.parametrize("user", USERS)
def test_only_instance_admins_see_the_overview(app, world, user):
    answer = signed_in(app, user).get("/admin/dependency_proxy", status="*")
    if user == "admin":
        assert answer.status_int == 200
        paths = [a.text for a in answer.html.find(id="groups").find_all("a")]
        assert set(GROUPS) <= set(paths)
        assert paths == sorted(paths)
        assert answer.html.find(id="audit-log") is not None or "No changes recorded" in answer
    elif user is None:
        assert answer.status_int == 303
        assert SIGN_IN in answer.location
    else:
        assert answer.status_int == 404


def test_a_form_posted_without_its_csrf_token_is_refused_and_changes_nothing(app, database, world):
    browser = signed_in(app, "owner")
    before = ttl_days(database, "priv")
    answer = browser.post(
        page_url("priv", "/ttl"), {"ttl_enabled": "on", "ttl_days": "77"}, status="*"
    )
    assert answer.status_int == 400
    assert "without its security token" in answer.text
    answer = browser.post(
        page_url("priv", "/ttl"),
        {"ttl_enabled": "on", "ttl_days": "77", "csrf_token": "forged"},
        status="*",
    )
    assert answer.status_int == 400
    assert ttl_days(database, "priv") == before != 77


def test_the_sign_in_form_itself_needs_its_csrf_token(app, world):
    answer = webtest.TestApp(app).post(
        SIGN_IN, {"username": "owner", "password": PASSWORD}, status="*"
    )
    assert answer.status_int == 400


@pytest.mark.parametrize("credentials", ["owner", "owner_api_token", "deploy_token"])
def test_registry_credentials_never_open_a_page(app, world, credentials):
    browser = webtest.TestApp(app)
    answer = browser.get(
        page_url("priv"), headers=basic(*world.credentials[credentials]), status="*"
    )
    assert answer.status_int == 303
    assert SIGN_IN in answer.location
    answer = browser.get(page_url("priv"), headers={"Authorization": "Bearer x.y.z"}, status="*")
    assert answer.status_int == 303


@pytest.mark.parametrize("credentials", ["owner_api_token", "deploy_token", "wrong_password"])
def test_only_a_password_signs_in(app, world, credentials):
    browser = webtest.TestApp(app)
    form = browser.get(SIGN_IN).forms["sign-in-form"]
    form["username"], form["password"] = world.credentials[credentials]
    answer = form.submit(status="*")
    assert answer.status_int == 400
    assert "Wrong user name or password." in answer.text
    assert browser.get(page_url("priv"), status="*").status_int == 303


def test_too_many_failed_sign_ins_are_refused_with_429(app, world):
    browser = webtest.TestApp(app)
    settings = app.registry["depproxy.settings"]
    for _ in range(settings.auth_max_failures):
        form = browser.get(SIGN_IN).forms["sign-in-form"]
        form["username"], form["password"] = "owner", "not the password"
        assert form.submit(status="*").status_int == 400
    form = browser.get(SIGN_IN).forms["sign-in-form"]
    form["username"], form["password"] = "owner", PASSWORD
    answer = form.submit(status="*")
    assert answer.status_int == 429
    assert int(answer.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(
    "next_path",
    ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)", ""],
)
def test_sign_in_never_redirects_off_site(app, world, next_path):
    browser = webtest.TestApp(app)
    form = browser.get(SIGN_IN, params={"next": next_path}).forms["sign-in-form"]
    form["username"], form["password"] = "owner", PASSWORD
    form["next"] = next_path
    answer = form.submit()
    assert answer.status_int == 303
    assert answer.location.endswith(SIGN_IN)


def test_sign_in_returns_to_the_page_asked_for_and_sign_out_ends_the_session(app, world):
    browser = webtest.TestApp(app)
    answer = browser.get(page_url("priv/nested"), status=303)
    form = answer.follow().forms["sign-in-form"]
    form["username"], form["password"] = "guest", PASSWORD
    answer = form.submit(status=303)
    assert answer.location.endswith(page_url("priv/nested"))
    assert answer.follow().html.find(id="signed-in-as").text == "guest"
    token = _csrf(browser)
    browser.post("/-/dependency_proxy/sign_out", {"csrf_token": token}, status=303)
    assert browser.get(page_url("priv/nested"), status="*").status_int == 303


def test_the_session_cookie_is_httponly_and_samesite_lax(app, world):
    browser = webtest.TestApp(app)
    answer = browser.get(SIGN_IN)
    cookie = next(c for c in answer.headers.getall("Set-Cookie") if "depproxy_session=" in c)
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "secure" not in cookie.lower()
    answer = webtest.TestApp(app, extra_environ={"wsgi.url_scheme": "https"}).get(SIGN_IN)
    cookie = next(c for c in answer.headers.getall("Set-Cookie") if "depproxy_session=" in c)
    assert "secure" in cookie.lower()


def test_upstream_password_is_write_only_and_changes_are_audited(app, database, world):
    browser = signed_in(app, "owner")
    page = browser.get(page_url("pub"))
    form = page.forms["credentials-form"]
    form["registry"] = REGISTRY
    form["username"] = "bot"
    form["password"] = "upstream-secret-never-shown"
    answer = form.submit(status=303).follow()
    assert "upstream-secret-never-shown" not in answer.text
    assert answer.html.find(id="credentials").find("td", string="set") is not None
    manager, session = database.session()
    with manager:
        group = session.scalar(select(Group).where(Group.path == "pub"))
        stored = session.get(UpstreamCredential, (group.id, REGISTRY))
        assert stored.username == "bot"
        assert "upstream-secret-never-shown" not in stored.password_encrypted
        event = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.group_path == "pub", AuditEvent.action == "credentials.set")
            .order_by(AuditEvent.id.desc())
        ).first()
        assert event.actor == "user:owner"
        assert "upstream-secret-never-shown" not in event.detail
        assert json.loads(event.detail) == {"username": "bot"}
    answer = browser.post(
        page_url("pub", "/credentials"),
        {
            "registry": "evil.example",
            "action": "set",
            "username": "a",
            "password": "b",
            "csrf_token": _csrf(browser),
        },
        status="*",
    )
    assert answer.status_int == 400


def _group_with_cached_images(database, count: int) -> str:
    path = f"paged-{secrets.token_hex(4)}"
    manager, session = database.session()
    with manager:
        owner = session.scalar(select(User).where(User.username == "owner"))
        group = Group(path=path, name=path, visibility=Visibility.PRIVATE)
        session.add(group)
        session.add(Membership(group=group, user=owner, role=Role.OWNER))
        session.flush()
        start = datetime(2026, 1, 1, tzinfo=UTC)
        for number in range(count):
            digest = f"sha256:{number:064x}"
            session.add(
                CachedManifest(
                    group_id=group.id,
                    image=f"library/image{number:02d}",
                    digest=digest,
                    size=1000 + number,
                    content_type="application/vnd.oci.image.manifest.v1+json",
                    storage_key=f"{path}/{number}",
                    read_at=start + timedelta(minutes=number),
                )
            )
            session.add(
                CachedTag(
                    group_id=group.id, image=f"library/image{number:02d}", tag="1.0", digest=digest
                )
            )
    return path


def test_cached_images_are_paginated_most_recently_pulled_first(app, database, world):
    path = _group_with_cached_images(database, 25)
    browser = signed_in(app, "owner")

    def images(page: webtest.TestResponse) -> list[str]:
        rows = page.html.find(id="cached-images").find("tbody").find_all("tr")
        return [row.find("td").text for row in rows]

    first = browser.get(page_url(path))
    assert first.html.find(id="manifest-count").text == "25"
    assert images(first) == [f"library/image{n:02d}" for n in range(24, 4, -1)]
    assert first.html.find("a", rel="prev") is None
    second = browser.get(page_url(path) + first.html.find("a", rel="next")["href"])
    assert images(second) == [f"library/image{n:02d}" for n in range(4, -1, -1)]
    assert second.html.find("a", rel="next") is None
    for nonsense in ("0", "-3", "x", "99999999"):
        assert browser.get(page_url(path), params={"page": nonsense}).status_int == 200


def test_a_deactivated_account_is_signed_out_of_the_pages(app, database, world):
    browser = signed_in(app, "elder")
    assert browser.get(page_url("priv")).status_int == 200
    manager, session = database.session()
    with manager:
        session.scalar(select(User).where(User.username == "elder")).is_active = False
    try:
        assert browser.get(page_url("priv"), status="*").status_int == 303
    finally:
        manager, session = database.session()
        with manager:
            session.scalar(select(User).where(User.username == "elder")).is_active = True


def test_pages_are_never_framed_or_cached(app, world):
    answer = signed_in(app, "guest").get(page_url("priv"))
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert "no-store" in answer.headers["Cache-Control"]


def test_a_host_without_a_policy_keeps_the_pages_closed(database, world, tmp_path):
    from tests.hosts import no_policy

    app = no_policy.make_app(app_settings(database.url, tmp_path / "storage"), with_addon=True)
    assert webtest.TestApp(app).get(page_url("priv"), status="*").status_int == 303
    assert signed_in(app, "stranger").get(page_url("priv"), status="*").status_int == 404
    guest = signed_in(app, "guest")
    assert guest.get(page_url("priv")).html.find(id="settings") is None
    assert guest.post(page_url("priv", "/ttl"), {"csrf_token": _csrf(guest)}, status=403)
    assert signed_in(app, "owner").get(page_url("priv")).html.find(id="settings") is not None
    # The host's own views are as open as before.
    assert webtest.TestApp(app).get("/edit").text == "anyone may edit: no policy"


def test_a_host_signing_in_with_basic_everywhere_signs_no_one_in_to_the_pages(
    database, world, tmp_path
):
    from tests.hosts import in_code

    app = in_code.make_app(
        app_settings(database.url, tmp_path / "storage", **{"depproxy.mirror.group": ""}),
        with_addon=True,
    )
    browser = webtest.TestApp(app)
    carol = basic("carol", in_code.USERS["carol"][0])
    assert browser.get("/whoami", headers=carol).text.startswith("carol at ")
    answer = browser.get(page_url("pub"), headers=carol)
    assert answer.html.find(id="signed-in-as") is None
    # Its account source has no signed_in_account: the pages' own form signs its users in.
    form = browser.get(SIGN_IN).forms["sign-in-form"]
    form["username"], form["password"] = "dave", in_code.USERS["dave"][0]
    form.submit(status=303)
    assert browser.get(page_url("pub")).html.find(id="signed-in-as").text == "dave"
    assert browser.get(page_url("priv"), status=404)
