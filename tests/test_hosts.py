"""The add-on inside host portals of the shapes users have.

For each host: its own pages, sign-in, error pages and database writes answer exactly as they do
without the add-on; the add-on's private groups are closed to anonymous callers, non-members and
the host's own principals (`role:admin`); and `skopeo` pulls through the host as a real server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import sqlalchemy as sa
import webtest
from alembic import command
from alembic.config import Config

from depproxy_pyramid.credentials import hash_password
from depproxy_pyramid.migrations import VERSION_TABLE, upgrade
from depproxy_pyramid.models import (
    Group,
    Membership,
    ProxySettings,
    Role,
    User,
    Visibility,
    get_engine,
)
from tests.conftest import JWT_SECRET, Database, app_settings, basic
from tests.hosts import cookiecutter, in_code, no_policy
from tests.server import BIN, ServerProcess, admin, free_port, write_ini
from tests.support.registry import skopeo_pull
from tests.test_migrations import HEAD as MIGRATIONS_HEAD

PRIVATE_IMAGE = "acme/dependency_proxy/containers/library/alpine"
PUBLIC_IMAGE = "pub/dependency_proxy/containers/library/alpine"
MANIFEST = f"/v2/{PRIVATE_IMAGE}/manifests/latest"
# Built-in accounts (the add-on's default source) that the cookiecutter and no-policy hosts use.
MEMBER = ("puller", "puller-password-1")
NON_MEMBER = ("stranger", "stranger-password-1")


def seed_addon(database_url: str, builtin_accounts: bool) -> None:
    """Groups `acme` (private) and `pub` (public); with built-in accounts, a member of acme."""
    engine = get_engine({"sqlalchemy.url": database_url})
    upgrade(engine)
    manager, session = Database(database_url).session()
    with manager:
        groups = {}
        for path, visibility in (("acme", Visibility.PRIVATE), ("pub", Visibility.PUBLIC)):
            groups[path] = Group(path=path, name=path, visibility=visibility)
            groups[path].proxy_settings = ProxySettings(enabled=True)
            session.add(groups[path])
        if builtin_accounts:
            member = User(username=MEMBER[0], password_hash=hash_password(MEMBER[1]))
            session.add(member)
            session.add(User(username=NON_MEMBER[0], password_hash=hash_password(NON_MEMBER[1])))
            session.add(Membership(group=groups["acme"], user=member, role=Role.DEVELOPER))
    engine.dispose()


def _migrate_cookiecutter_host(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(cookiecutter.ALEMBIC))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    with engine.begin() as connection:
        for name, role in (("ed", "editor"), ("root", "admin")):
            connection.execute(
                sa.insert(cookiecutter.User).values(
                    name=name, role=role, password_hash=cookiecutter.hash_password(f"{name}-pw")
                )
            )
    engine.dispose()


def _create_no_policy_tables(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    no_policy.Base.metadata.create_all(engine)
    engine.dispose()


@dataclass
class Host:
    """One kind of host: how to build its database and app, and what its users do."""

    name: str
    make_app: Callable[[dict, bool], object]
    prepare_host_database: Callable[[str], None]
    member: tuple[str, str]
    non_member: tuple[str, str]
    # Host credentials that must mean nothing to the registry, as request headers.
    host_admin_headers: Callable[[webtest.TestApp], dict[str, str]]
    # A host's own traffic: each step returns what must not change with the add-on included.
    host_script: Callable[[webtest.TestApp], list]
    host_rows: Callable[[str], list]
    own_addon_database: bool = False
    extra_settings: dict[str, str] | None = None


def _cookiecutter_admin(app: webtest.TestApp) -> dict[str, str]:
    app.post("/login", {"login": "root", "password": "root-pw"}, status=303)
    return {}


def _cookiecutter_script(app: webtest.TestApp) -> list:
    seen = []

    def step(method: str, path: str, **kw) -> None:
        response = getattr(app, method)(path, expect_errors=True, **kw)
        seen.append((method, path, response.status_int, response.text, response.location))

    step("get", "/")
    step("post", "/login", params={"login": "ed", "password": "wrong"})
    step("post", "/models", params={"name": "anonymous"})
    step("post", "/login", params={"login": "ed", "password": "ed-pw"})
    step("get", "/")
    step("post", "/models", params={"name": "one"})
    step("post", "/models", params={"name": "two"})
    step("get", "/admin")
    step("get", "/no/such/page")
    step("post", "/login", params={"login": "root", "password": "root-pw"})
    step("get", "/admin")
    step("get", "/")
    return seen


def _cookiecutter_rows(database_url: str) -> list:
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT name FROM models ORDER BY id")).all()
        version = connection.execute(sa.text("SELECT version_num FROM alembic_version")).all()
    engine.dispose()
    return [rows, version]


def _no_policy_script(app: webtest.TestApp) -> list:
    seen = []
    for method, path, params in (
        ("get", "/notes", None),
        ("post", "/notes", {"text": "one"}),
        ("post", "/notes", {"text": "two"}),
        ("get", "/notes", None),
        ("get", "/edit", None),
        ("get", "/refuse", None),
        ("get", "/no/such/page", None),
    ):
        response = getattr(app, method)(path, params=params, expect_errors=True)
        seen.append((method, path, response.status_int, response.content_type, response.text))
    return seen


def _no_policy_rows(database_url: str) -> list:
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT text FROM notes ORDER BY id")).all()
    engine.dispose()
    return rows


def _in_code_script(app: webtest.TestApp) -> list:
    seen = []
    for path, who in (
        ("/whoami", None),
        ("/whoami", "carol"),
        ("/whoami/", None),
        ("/secret", None),
        ("/secret", "carol"),
        ("/secret", "dave"),
        ("/no/such/page", None),
    ):
        headers = basic(who, in_code.USERS[who][0]) if who else {}
        response = app.get(path, headers=headers, expect_errors=True)
        seen.append((path, who, response.status_int, response.text, response.location))
    return seen


PORTAL_USERS = {"alice": "alice-password-1", "bob": "bob-password-1"}


def _prepare_portal(database_url: str) -> None:
    """The example portal's tables; alice is a developer of acme, bob a portal admin."""
    from portal.models import Base as PortalBase
    from portal.models import PortalUser, RegistryTeam, hash_password

    engine = sa.create_engine(database_url)
    PortalBase.metadata.create_all(engine)
    with engine.begin() as connection:
        for name, role in (("alice", "member"), ("bob", "admin")):
            connection.execute(
                sa.insert(PortalUser).values(
                    username=name, role=role, password_hash=hash_password(PORTAL_USERS[name])
                )
            )
        alice = connection.execute(
            sa.select(PortalUser.id).where(PortalUser.username == "alice")
        ).scalar_one()
        connection.execute(
            sa.insert(RegistryTeam).values(user_id=alice, group_path="acme", role="developer")
        )
    engine.dispose()


def _portal_admin(app: webtest.TestApp) -> dict[str, str]:
    form = app.get("/login").forms[0]
    form["username"], form["password"] = "bob", PORTAL_USERS["bob"]
    assert form.submit().status_int == 303
    return {}


def _portal_app(settings: dict, with_addon: bool):
    from portal import main as portal_main

    assert with_addon, "the example portal always includes the add-on"
    return portal_main({}, **settings)


HOSTS = {
    "cookiecutter": Host(
        name="cookiecutter",
        make_app=cookiecutter.make_app,
        prepare_host_database=_migrate_cookiecutter_host,
        member=MEMBER,
        non_member=NON_MEMBER,
        host_admin_headers=_cookiecutter_admin,
        host_script=_cookiecutter_script,
        host_rows=_cookiecutter_rows,
        extra_settings={"auth.secret": "cookiecutter-secret"},
    ),
    "no_policy": Host(
        name="no_policy",
        make_app=no_policy.make_app,
        prepare_host_database=_create_no_policy_tables,
        member=MEMBER,
        non_member=NON_MEMBER,
        host_admin_headers=lambda app: {},
        host_script=_no_policy_script,
        host_rows=_no_policy_rows,
    ),
    "in_code": Host(
        name="in_code",
        make_app=in_code.make_app,
        prepare_host_database=lambda url: None,
        member=("dave", in_code.USERS["dave"][0]),
        non_member=("carol", in_code.USERS["carol"][0]),
        # carol is the host's admin (`role:admin`), and her Basic credentials open its pages.
        host_admin_headers=lambda app: basic("carol", in_code.USERS["carol"][0]),
        host_script=_in_code_script,
        host_rows=lambda url: [],
        own_addon_database=True,
    ),
    # examples/portal: its pages, sign-in and writes are tested in test_example_portal.py.
    "portal": Host(
        name="portal",
        make_app=_portal_app,
        prepare_host_database=_prepare_portal,
        member=("alice", PORTAL_USERS["alice"]),
        non_member=("bob", PORTAL_USERS["bob"]),
        host_admin_headers=_portal_admin,
        host_script=lambda app: [],
        host_rows=lambda url: [],
        extra_settings={"portal.session_secret": "portal-test-secret-" + "z" * 40},
    ),
}
COMPARABLE_HOSTS = sorted(name for name in HOSTS if name != "portal")


def host_settings(host: Host, workdir: Path, **extra: str) -> dict[str, str]:
    host_url = f"sqlite:///{workdir / 'host.sqlite'}"
    if host.own_addon_database:
        settings = app_settings(host_url, workdir / "storage")
        settings["depproxy.sqlalchemy.url"] = f"sqlite:///{workdir / 'depproxy.sqlite'}"
    else:
        settings = app_settings(host_url, workdir / "storage")
    return {**settings, **(host.extra_settings or {}), **extra}


def addon_url(settings: dict[str, str]) -> str:
    return settings.get("depproxy.sqlalchemy.url") or settings["sqlalchemy.url"]


def build(host: Host, workdir: Path, with_addon: bool, **extra: str) -> tuple[object, dict]:
    workdir.mkdir(parents=True)
    settings = host_settings(host, workdir, **extra)
    host.prepare_host_database(settings["sqlalchemy.url"])
    seed_addon(addon_url(settings), builtin_accounts=not host.own_addon_database)
    return host.make_app(settings, with_addon), settings


@pytest.fixture(params=sorted(HOSTS))
def host(request) -> Host:
    return HOSTS[request.param]


@pytest.mark.parametrize("name", COMPARABLE_HOSTS)
def test_host_pages_sign_in_and_writes_are_unchanged_by_the_addon(name, tmp_path):
    host = HOSTS[name]
    results = []
    for with_addon in (False, True):
        app, settings = build(host, tmp_path / str(with_addon), with_addon)
        results.append(
            (host.host_script(webtest.TestApp(app)), host.host_rows(settings["sqlalchemy.url"]))
        )
    without, with_ = results
    assert with_ == without
    # And the scripts did something: every host wrote its rows.
    if host.name == "cookiecutter":
        assert without[1] == [[("one",), ("two",)], [("0001",)]]
    elif host.name == "no_policy":
        assert without[1] == [("one",), ("two",)]


def _token(app: webtest.TestApp, credentials: tuple[str, str] | None, image: str) -> str:
    headers = basic(*credentials) if credentials else {}
    response = app.get(
        "/jwt/auth",
        params={"service": "dependency_proxy", "scope": f"repository:{image}:pull"},
        headers=headers,
    )
    return response.json["token"]


def _granted(token: str) -> list:
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="dependency_proxy")
    return [entry["name"] for entry in claims["access"]]


def test_private_groups_stay_private_inside_the_host(host, tmp_path):
    app, _ = build(host, tmp_path / "host", with_addon=True)
    client = webtest.TestApp(app)

    anonymous = client.get(MANIFEST, status=401)
    assert anonymous.json["errors"][0]["code"] == "UNAUTHORIZED"
    assert anonymous.headers["WWW-Authenticate"].startswith('Bearer realm="http://registry.test')
    assert client.get("/v2", status=401).json["errors"][0]["code"] == "UNAUTHORIZED"
    ping = client.get("/v2/", expect_errors=True)
    if host.name == "in_code":  # its tween sends `/v2/` to `/v2`, which answers the ping
        assert (ping.status_int, ping.location) == (301, "http://localhost/v2")
    else:
        assert ping.status_int == 401

    assert _granted(_token(client, host.member, PRIVATE_IMAGE)) == [PRIVATE_IMAGE]
    outsider = _token(client, host.non_member, PRIVATE_IMAGE)
    assert _granted(outsider) == []
    refused = client.get(MANIFEST, headers={"Authorization": f"Bearer {outsider}"}, status=404)
    assert refused.json["errors"][0]["code"] == "NAME_UNKNOWN"
    assert _granted(_token(client, host.non_member, PUBLIC_IMAGE)) == [PUBLIC_IMAGE]
    assert client.get("/jwt/auth", headers=basic(host.member[0], "wrong"), status=401)

    # The host's own sign-in (a session cookie, or Basic on every URL) is not a registry
    # credential, however privileged the host user is.
    client.reset()
    headers = host.host_admin_headers(client)
    refused = client.get(MANIFEST, headers=headers, status=401)
    assert refused.json["errors"][0]["code"] == "UNAUTHORIZED"
    if not headers:
        # A caller without registry credentials gets the anonymous token, which grants nothing.
        assert _granted(_token(client, None, PRIVATE_IMAGE)) == []


def test_registry_errors_stay_on_the_addons_paths(host, tmp_path):
    app, _ = build(host, tmp_path / "host", with_addon=True)
    client = webtest.TestApp(app)
    assert client.get("/v2/acme/not-a-registry-path", status=404).json["errors"][0]["code"]
    for path in ("/jwt", "/jwt/other", "/-/other", "/v2beta"):
        response = client.get(path, expect_errors=True)
        assert response.status_int == 404
        assert "Docker-Distribution-Api-Version" not in response.headers
        assert not response.content_type.endswith("json"), path


def _server(host: Host, workdir: Path, upstream_url: str) -> ServerProcess:
    settings = host_settings(
        host,
        workdir,
        **{"depproxy.upstream.url": upstream_url, "depproxy.external_url": ""},
    )
    port = free_port()
    if host.name == "in_code":
        command = [sys.executable, "-m", "tests.hosts.in_code", str(port), json.dumps(settings)]
        server = ServerProcess(None, port, workdir / "server.log", command=command)
    else:
        ini = write_ini(
            workdir / "host.ini",
            settings,
            port,
            app_use=(
                "egg:depproxy-portal-example"
                if host.name == "portal"
                else f"call:tests.hosts.{host.name}:main"
            ),
            # A host's own Alembic set-up: `initdb` must not run these instead of the add-on's.
            extra_sections=f"\n[alembic]\nscript_location = {cookiecutter.ALEMBIC}\n",
        )
        server = ServerProcess(ini, port, workdir / "server.log")
    host.prepare_host_database(settings["sqlalchemy.url"])
    seed_addon(addon_url(settings), builtin_accounts=not host.own_addon_database)
    return server  # started by `with`


def test_skopeo_pulls_through_the_host(host, upstream, tmp_path):
    workdir = tmp_path / "host"
    workdir.mkdir()
    with _server(host, workdir, upstream.url) as server:
        reference = f"127.0.0.1:{server.port}/{PRIVATE_IMAGE}:latest"
        pulled = skopeo_pull(reference, tmp_path / "pulled", creds=host.member)
        assert pulled.returncode == 0
        index = json.loads((tmp_path / "pulled" / "index.json").read_text())
        assert index["manifests"][0]["digest"] == upstream.digest_of("library/alpine", "latest")
        for credentials in (host.non_member, None):
            refused = skopeo_pull(reference, tmp_path / "refused", creds=credentials, check=False)
            assert refused.returncode != 0
            assert not (tmp_path / "refused" / "index.json").exists()


def test_initdb_runs_the_addons_migrations_whatever_the_host_ini_says(tmp_path):
    """The cookiecutter host's ini names its own Alembic scripts, with the same revision id."""
    host = HOSTS["cookiecutter"]
    settings = host_settings(host, tmp_path)
    ini = write_ini(
        tmp_path / "host.ini",
        settings,
        free_port(),
        app_use="call:tests.hosts.cookiecutter:main",
        extra_sections=f"\n[alembic]\nscript_location = {cookiecutter.ALEMBIC}\n",
    )
    host.prepare_host_database(settings["sqlalchemy.url"])
    result = admin(ini, "initdb")
    assert result.returncode == 0, result.stderr
    assert "dependency proxy schema is up to date" in result.stdout
    engine = sa.create_engine(settings["sqlalchemy.url"])
    with engine.connect() as connection:
        tables = set(sa.inspect(connection).get_table_names())
        host_version = connection.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        ours = connection.execute(sa.text("SELECT version_num FROM depproxy_alembic_version")).all()
    engine.dispose()
    assert {"users", "models", "alembic_version", "depproxy_users", "depproxy_groups"} <= tables
    assert host_version == [("0001",)]
    assert ours == [(MIGRATIONS_HEAD,)]
    # The operator CLI works against the host's ini as well.
    created = admin(ini, "group", "add", "acme")
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "created private group acme"


def test_the_wheel_carries_its_migrations(tmp_path):
    """Build the wheel, install it in a fresh virtualenv, and run initdb from there."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            str(BIN / "pip"),
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(tmp_path / "dist"),
            str(root),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("depproxy_pyramid-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    ini = tmp_path / "production.ini"
    ini.write_text(
        "[app:main]\nuse = egg:depproxy-pyramid\n"
        f"sqlalchemy.url = sqlite:///{tmp_path / 'depproxy.sqlite'}\n"
        f"depproxy.storage.path = {tmp_path / 'storage'}\n"
        f"depproxy.jwt.secret = {JWT_SECRET}\n"
    )
    # Run from elsewhere, with nothing of the checkout on the path.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "from depproxy_pyramid.migrations import "
         "script_location; print(script_location())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert located.stdout.strip().startswith(str(venv))
    result = subprocess.run(
        [str(venv / "bin" / "depproxy-admin"), str(ini), "initdb"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'depproxy.sqlite'}")
    with engine.connect() as connection:
        tables = set(sa.inspect(connection).get_table_names())
    engine.dispose()
    assert {"depproxy_groups", "depproxy_blobs", VERSION_TABLE} <= tables
