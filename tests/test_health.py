"""`/-/health`: 200 while the database and storage answer, 503 naming the failing one."""

from __future__ import annotations

import shutil

import requests
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL
from tests.proxy import running_proxy


def test_health_needs_no_credentials_and_allows_only_reads(testapp):
    answer = testapp.get("/-/health")
    assert answer.json == {"status": "ok", "checks": {"database": "ok", "storage": "ok"}}
    assert answer.headers["Cache-Control"] == "no-store"
    assert testapp.head("/-/health").status_int == 200
    refused = testapp.post("/-/health", status=405)
    assert refused.headers["Allow"] == "GET, HEAD"
    assert refused.json["errors"][0]["code"] == "UNSUPPORTED"


def test_health_names_what_fails_in_a_running_server(tmp_path, postgres_database, upstream):
    database_url = postgres_database()
    with running_proxy(tmp_path, database_url, upstream.url) as proxy:
        health = f"{proxy.url}/-/health"
        assert requests.get(health, timeout=10).status_code == 200

        spool = proxy.storage / ".tmp"
        shutil.rmtree(spool)
        answer = requests.get(health, timeout=10)
        assert answer.status_code == 503
        assert answer.json() == {
            "status": "unavailable",
            "checks": {"database": "ok", "storage": "failing"},
        }
        spool.mkdir()
        assert requests.get(health, timeout=10).status_code == 200

        proxy.db.engine.dispose()
        admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        name = make_url(database_url).database
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
        answer = requests.get(health, timeout=10)
        assert answer.status_code == 503
        assert answer.json()["checks"] == {"database": "failing", "storage": "ok"}
        # Why is in the server's log, not in the answer.
        proxy.server.wait_for_log("health check: the database is not reachable")
