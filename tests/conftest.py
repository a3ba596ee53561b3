"""Shared fixtures: throwaway SQLite and PostgreSQL databases migrated by Alembic, the app."""

from __future__ import annotations

import base64
import itertools
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import transaction
import webtest
from sqlalchemy.engine import make_url

from depproxy_pyramid import main
from depproxy_pyramid.migrations import upgrade
from depproxy_pyramid.models import get_engine, get_session_factory, get_tm_session

pytest_plugins = [
    "tests.support.fixtures",
    "tests.support.engines",
    "tests.support.podman",
    "tests.support_s3",
]

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get(
    "DEPPROXY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
JWT_SECRET = "test-secret-" + "x" * 40


def migrate(url: str) -> None:
    engine = get_engine({"sqlalchemy.url": url})
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def _postgres_admin_engine() -> sa.Engine:
    engine = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as error:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ({error.orig}). Start one "
            "(`pg_ctlcluster 15 main start`, or `apt-get install postgresql`), or point "
            "DEPPROXY_TEST_POSTGRES_URL at one with rights to create databases."
        )
    return engine


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[callable]:
    """Creates throwaway PostgreSQL databases; drops them all at the end of the session."""
    engine = _postgres_admin_engine()
    created: list[str] = []

    def create() -> str:
        name = f"depproxy_test_{secrets.token_hex(6)}"
        with engine.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)

    yield create
    with engine.connect() as connection:
        for name in created:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request, tmp_path, postgres_database) -> str:
    """An empty database on each backend, for tests that run the migrations themselves."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'depproxy.sqlite'}"
    return postgres_database()


def app_settings(database_url: str, storage_path: Path, **extra: str) -> dict[str, str]:
    return {
        "sqlalchemy.url": database_url,
        "depproxy.storage": "filesystem",
        "depproxy.storage.path": str(storage_path),
        "depproxy.jwt.secret": JWT_SECRET,
        "depproxy.external_url": "http://registry.test",
        **extra,
    }


class Database:
    """A migrated database and a way to write rows to it outside any request."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = get_engine({"sqlalchemy.url": url})
        self.session_factory = get_session_factory(self.engine)

    def session(self):
        manager = transaction.TransactionManager(explicit=True)
        return manager, get_tm_session(self.session_factory, manager)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory, postgres_database) -> Iterator[Database]:
    """A migrated database on each backend, shared by a module's tests."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'depproxy.sqlite'}"
    else:
        url = postgres_database()
    migrate(url)
    db = Database(url)
    yield db
    db.engine.dispose()


@pytest.fixture(scope="module", params=["standalone", "embedded"])
def app_kind(request) -> str:
    """The standalone app, or the add-on inside a host portal with a policy of its own."""
    return request.param


@pytest.fixture(scope="module")
def app(app_kind, database, tmp_path_factory):
    settings = app_settings(
        database.url,
        tmp_path_factory.mktemp("storage"),
        # Short, so the tests of what a change made elsewhere does wait little for it.
        **{"depproxy.lookup_cache_seconds": "2"},
    )
    if app_kind == "standalone":
        return main({}, **settings)
    from tests.hosts import cookiecutter

    return cookiecutter.make_app({**settings, "auth.secret": "host-secret"}, with_addon=True)


@pytest.fixture
def testapp(app) -> webtest.TestApp:
    return webtest.TestApp(app)


def basic(username: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {value}"}


_groups = itertools.count()


@pytest.fixture(scope="module", params=["standalone", "embedded"])
def proxy(request, upstream_registry, tmp_path_factory, postgres_database):
    """The proxy as a real server process in front of the test upstream, one per module: the
    standalone app on PostgreSQL, as production runs it, and the add-on on SQLite inside a host
    without a policy that uses pyramid_tm's thread-local transaction manager (the wiring
    furthest from the standalone app's)."""
    from tests.proxy import start_proxy

    workdir = tmp_path_factory.mktemp("proxy")
    proxy = start_proxy(
        workdir,
        (
            postgres_database()
            if request.param == "standalone"
            else f"sqlite:///{workdir / 'proxy.sqlite'}"
        ),
        upstream_registry.url,
        app_use=(
            "egg:depproxy-pyramid"
            if request.param == "standalone"
            else "call:tests.hosts.no_policy:main"
        ),
    )
    yield proxy
    proxy.server.stop()
    proxy.db.engine.dispose()


@pytest.fixture
def group(proxy, request):
    """A group of this test's own, so it starts with an empty cache."""
    label = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    proxy.empty_cache()
    return proxy.new_group(f"g{next(_groups)}-{label}")
