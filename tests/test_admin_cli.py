"""`depproxy-admin` as an operator runs it, then the token flow against a real server process."""

from __future__ import annotations

import json

import pytest
import requests
from sqlalchemy import select

from depproxy_pyramid.credentials import Keyring
from depproxy_pyramid.models.accounts import UpstreamCredential
from tests.conftest import JWT_SECRET, Database, app_settings
from tests.server import ServerProcess, admin, free_port, write_ini

NEW_KEY = "new-encryption-key-" + "n" * 40


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
        latest = json.loads(ok(admin(path, "audit", "--limit", "1", "--json")))
        assert [(e["action"], e["group"], e["detail"]) for e in latest] == [
            ("proxy.settings", "acme/platform", {"enabled": [True, False]})
        ]
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


def stored_credentials(database_url: str) -> list[tuple[int, str, str, str]]:
    db = Database(database_url)
    manager, session = db.session()
    try:
        with manager:
            rows = session.scalars(
                select(UpstreamCredential).order_by(
                    UpstreamCredential.group_id, UpstreamCredential.registry_host
                )
            ).all()
            return [(r.group.path, r.registry_host, r.username, r.password_encrypted) for r in rows]
    finally:
        db.engine.dispose()


def test_upstream_credentials_per_registry_and_key_rotation(tmp_path, empty_database_url):
    def ini(name: str, **extra: str):
        settings = app_settings(
            empty_database_url,
            tmp_path / "storage",
            **{"depproxy.upstream.registries": "ghcr.io", **extra},
        )
        return write_ini(tmp_path / name, settings, free_port())

    # No depproxy.encryption.keys: sealed under depproxy.jwt.secret, as 0.1 did.
    path = ini("plain.ini")
    ok(admin(path, "initdb"))
    ok(admin(path, "group", "add", "acme"))
    assert ok(admin(path, "proxy", "credentials", "acme", "--username", "bot", stdin="pw1\n")) == (
        "upstream credentials for registry-1.docker.io set for acme"
    )
    assert ok(
        admin(
            path,
            "proxy",
            "credentials",
            "acme",
            "--registry",
            "GHCR.io",
            "--username",
            "gh",
            stdin="pw2\n",
        )
    ) == ("upstream credentials for ghcr.io set for acme")
    # Docker Hub's other names are the same registry.
    assert ok(
        admin(
            path,
            "proxy",
            "credentials",
            "acme",
            "--registry",
            "docker.io",
            "--username",
            "bot",
            stdin="pw3\n",
        )
    ) == ("upstream credentials for registry-1.docker.io set for acme")
    fails(
        admin(path, "proxy", "credentials", "acme", "--registry", "quay.io", "--username", "x"),
        "upstream registry 'quay.io' is not configured "
        "(depproxy.upstream.url or depproxy.upstream.registries)",
    )
    fails(admin(path, "proxy", "credentials", "acme"), "--username is needed (or --clear)")

    stored = stored_credentials(empty_database_url)
    assert [row[:3] for row in stored] == [
        ("acme", "ghcr.io", "gh"),
        ("acme", "registry-1.docker.io", "bot"),
    ]
    assert [Keyring([JWT_SECRET]).decrypt(row[3]) for row in stored] == ["pw2", "pw3"]

    rotating = ini("rotating.ini", **{"depproxy.encryption.keys": f"{NEW_KEY} {JWT_SECRET}"})
    assert ok(admin(rotating, "rotate-keys")) == (
        "re-encrypted 2 upstream credential(s) under the newest encryption key"
    )
    rotated = stored_credentials(empty_database_url)
    assert [Keyring([NEW_KEY]).decrypt(row[3]) for row in rotated] == ["pw2", "pw3"]

    lost = ini("lost.ini", **{"depproxy.encryption.keys": "unrelated-key-" + "u" * 40})
    fails(
        admin(lost, "rotate-keys"),
        "the upstream credentials of group 'acme' (ghcr.io), group 'acme' "
        "(registry-1.docker.io) do not decrypt with any key in depproxy.encryption.keys",
    )
    assert stored_credentials(empty_database_url) == rotated  # all or nothing

    assert ok(
        admin(rotating, "proxy", "credentials", "acme", "--registry", "ghcr.io", "--clear")
    ) == ("upstream credentials for ghcr.io cleared for acme")
    assert ok(admin(rotating, "proxy", "credentials", "acme", "--clear")) == (
        "upstream credentials for registry-1.docker.io cleared for acme"
    )
    # What a registry no longer configured left behind can still be cleared.
    assert ok(
        admin(rotating, "proxy", "credentials", "acme", "--registry", "quay.io", "--clear")
    ) == ("acme has no upstream credentials for quay.io")
    assert stored_credentials(empty_database_url) == []
    log = json.loads(ok(admin(rotating, "audit", "--json")))
    assert [(e["action"], e["target"]) for e in reversed(log)] == [
        ("group.add", None),
        ("credentials.set", "registry-1.docker.io"),
        ("credentials.set", "ghcr.io"),
        ("credentials.set", "registry-1.docker.io"),
        ("credentials.rotate", None),
        ("credentials.remove", "ghcr.io"),
        ("credentials.remove", "registry-1.docker.io"),
    ]
    # Who the credentials are, never what opens them.
    assert log[-2]["detail"] == {"username": "bot"}
    assert not any(pw in json.dumps(log) for pw in ("pw1", "pw2", "pw3"))


def test_lists_show_no_secrets_and_removals_name_what_is_unknown(ini):
    path, _ = ini
    ok(admin(path, "user", "add", "dev", stdin="dev-password\n"))
    ok(admin(path, "group", "add", "acme"))
    ok(admin(path, "group", "add", "acme/platform"))
    ok(admin(path, "member", "add", "acme", "dev", "--role", "owner"))
    pat = ok(admin(path, "token", "add", "dev", "--name", "ci", "--scope", "read_registry"))
    deploy = ok(
        admin(path, "deploy-token", "add", "acme", "--name", "ci", "--scope", "read_registry")
    )
    deploy_secret = deploy.splitlines()[1].removeprefix("token: ")

    users = ok(admin(path, "user", "list")).splitlines()
    assert users[0].split() == ["NAME", "ADMIN", "ACTIVE", "CREATED"]
    assert users[1].split()[:3] == ["dev", "no", "yes"]
    tokens = ok(admin(path, "token", "list", "dev"))
    assert tokens.splitlines()[1].split()[:4] == ["dev", "ci", "read_registry", "active"]
    groups = json.loads(ok(admin(path, "group", "list", "--json")))
    assert [(g["path"], g["members"], g["blobs"]) for g in groups] == [
        ("acme", 1, 0),
        ("acme/platform", 0, 0),
    ]
    members = ok(admin(path, "member", "list", "acme")).splitlines()
    assert members[1].split()[:2] == ["dev", "owner"]
    deploy_tokens = ok(admin(path, "deploy-token", "list", "acme"))
    everything = users + [tokens, json.dumps(groups), deploy_tokens]
    everything.append(ok(admin(path, "audit", "--json")))
    for secret in (pat, deploy_secret, "dev-password", "scrypt"):
        assert all(secret not in output for output in everything)

    fails(admin(path, "user", "remove", "nobody"), "no user named 'nobody'")
    fails(admin(path, "user", "deactivate", "nobody"), "no user named 'nobody'")
    fails(admin(path, "token", "revoke", "dev", "--name", "nope"), "no personal access token")
    fails(admin(path, "token", "list", "nobody"), "no user named 'nobody'")
    fails(admin(path, "member", "remove", "nowhere", "dev"), "no group at 'nowhere'")
    fails(admin(path, "member", "role", "acme/platform", "dev", "guest"), "not a member")
    fails(admin(path, "deploy-token", "revoke", "acme", "--name", "nope"), "no deploy token")
    fails(admin(path, "group", "remove", "nowhere"), "no group at 'nowhere'")
    fails(admin(path, "purge", "nowhere"), "no group at 'nowhere'")
    fails(admin(path, "audit", "--limit", "0"), "--limit must be at least 1")

    # The last owner stays, until someone else owns the group or one above it.
    fails(admin(path, "member", "remove", "acme", "dev"), "dev is the last owner of acme")
    fails(admin(path, "member", "role", "acme", "dev", "developer"), "last owner of acme")
    fails(admin(path, "user", "remove", "dev"), "dev is the last owner of acme")
    ok(admin(path, "user", "add", "lead", stdin="lead-password\n"))
    ok(admin(path, "member", "add", "acme", "lead", "--role", "owner"))
    assert ok(admin(path, "member", "role", "acme", "dev", "developer")) == (
        "dev is developer of acme"
    )

    fails(admin(path, "group", "remove", "acme"), "acme has 1 subgroup(s) (acme/platform)")
    assert ok(admin(path, "group", "remove", "acme", "--recursive")) == (
        "removed acme and 1 subgroup(s)"
    )
    assert ok(admin(path, "group", "list")) == "no groups"
    assert ok(admin(path, "user", "remove", "dev")) == (
        "removed dev with 0 membership(s) and 1 personal access token(s)"
    )

    log = json.loads(ok(admin(path, "audit", "--json", "--limit", "100")))
    assert [(e["action"], e["group"], e["target"]) for e in reversed(log)] == [
        ("user.add", None, "dev"),
        ("group.add", "acme", None),
        ("group.add", "acme/platform", None),
        ("member.add", "acme", "dev"),
        ("token.issue", None, "dev"),
        ("deploy_token.issue", "acme", "ci"),
        ("user.add", None, "lead"),
        ("member.add", "acme", "lead"),
        ("member.role", "acme", "dev"),
        # Subgroups first, as the recursive removal goes.
        ("group.remove", "acme/platform", None),
        ("group.remove", "acme", None),
        ("user.remove", None, "dev"),
    ]
    assert log[3]["detail"] == {"from": "owner", "to": "developer"}
    assert [
        e["group"]
        for e in json.loads(ok(admin(path, "audit", "--group", "acme/platform", "--json")))
    ] == ["acme/platform"] * 2
