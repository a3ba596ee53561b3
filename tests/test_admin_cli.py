"""`depproxy-admin` as an operator runs it, then the token flow against a real server process."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import app_settings
from tests.server import ServerProcess, admin, free_port, write_ini


@pytest.fixture
def ini(tmp_path, empty_database_url):
    port = free_port()
    path = write_ini(
        tmp_path / "test.ini", app_settings(empty_database_url, tmp_path / "storage"), port
    )
    assert admin(path, "initdb").returncode == 0
    return path, port


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def fails(result, message: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("depproxy-admin: error: ")
    assert message in lines[0]


def test_operator_sets_up_a_group_and_pulls_a_token(ini, tmp_path):
    path, port = ini
    ok(admin(path, "user", "add", "root", "--admin", stdin="s3cret-password\n"))
    ok(admin(path, "user", "add", "dev", stdin="dev-password\n"))
    ok(admin(path, "group", "add", "acme"))
    ok(admin(path, "group", "add", "acme/platform"))
    ok(admin(path, "group", "add", "open", "--public"))
    ok(admin(path, "member", "add", "acme", "dev", "--role", "developer"))
    pat = ok(
        admin(
            path,
            "token",
            "add",
            "dev",
            "--name",
            "ci",
            "--scope",
            "read_registry",
            "--expires-days",
            "30",
        )
    )
    assert pat.startswith("dpat-")
    deploy = ok(
        admin(path, "deploy-token", "add", "acme", "--name", "ci", "--scope", "read_registry")
    )
    deploy_user = deploy.splitlines()[0].removeprefix("username: ")
    deploy_secret = deploy.splitlines()[1].removeprefix("token: ")

    fails(admin(path, "group", "add", "missing/child"), "no group at 'missing'")
    fails(admin(path, "group", "add", "Upper"), "invalid group path")
    fails(admin(path, "group", "add", "acme"), "already exists")
    fails(admin(path, "group", "add", "acme/public", "--public"), "cannot be public")
    fails(admin(path, "user", "add", "dev", stdin="x\n"), "already exists")
    fails(admin(path, "user", "add", "empty", stdin="\n"), "empty password")
    fails(admin(path, "member", "add", "acme", "nobody", "--role", "guest"), "no user")
    fails(admin(path, "token", "add", "dev", "--name", "x", "--scope", "write"), "unknown scope")
    fails(
        admin(path, "token", "add", "dev", "--name", "x", "--scope", "api", "--expires-days", "0"),
        "at least 1",
    )
    fails(
        admin(path, "deploy-token", "add", "acme", "--name", "x", "--scope", "api"), "unknown scope"
    )

    scope = "repository:acme/platform/dependency_proxy/containers/alpine:pull"
    with ServerProcess(path, port, tmp_path / "server.log") as server:
        challenge = requests.get(f"{server.url}/v2/", timeout=10)
        assert challenge.status_code == 401
        assert challenge.headers["WWW-Authenticate"] == (
            'Bearer realm="http://registry.test/jwt/auth",service="dependency_proxy"'
        )
        for credentials in (("dev", "dev-password"), ("dev", pat), (deploy_user, deploy_secret)):
            answer = requests.get(
                f"{server.url}/jwt/auth",
                params={"service": "dependency_proxy", "scope": scope},
                auth=credentials,
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
            token = answer.json()["token"]
            assert (
                requests.get(
                    f"{server.url}/v2/", headers={"Authorization": f"Bearer {token}"}, timeout=10
                ).status_code
                == 200
            )
        ok(admin(path, "proxy", "disable", "acme/platform"))
        answer = requests.get(
            f"{server.url}/jwt/auth",
            params={"scope": scope},
            auth=("dev", "dev-password"),
            timeout=10,
        )
        assert answer.json()["token"]
        assert (
            requests.get(f"{server.url}/jwt/auth", auth=("dev", "nope"), timeout=10).status_code
            == 401
        )


def test_commands_on_an_uninitialised_database_fail_in_one_line(tmp_path):
    path = write_ini(
        tmp_path / "test.ini",
        app_settings(f"sqlite:///{tmp_path / 'empty.sqlite'}", tmp_path / "storage"),
        free_port(),
    )
    fails(admin(path, "group", "add", "acme"), "no such table")


def test_bad_configuration_fails_in_one_line(tmp_path):
    settings = app_settings(f"sqlite:///{tmp_path / 'x.sqlite'}", tmp_path / "storage")
    settings["depproxy.jwt.expire_seconds"] = "never"
    path = write_ini(tmp_path / "bad.ini", settings, free_port())
    fails(admin(path, "group", "add", "acme"), "depproxy.jwt.expire_seconds")
