"""`depproxy-admin` taking away against a real server: each removal refuses the registry tokens
issued before it, within `depproxy.lookup_cache_seconds`, and every change is in the audit log."""

from __future__ import annotations

import json
import time

import requests

from tests.proxy import PROXY_MARKER, running_proxy
from tests.server import admin

IMAGE = "library/alpine"
LOOKUP_SECONDS = 1
MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def fails(result, message: str) -> None:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("depproxy-admin: error: ")
    assert message in lines[0], lines[0]


def token(proxy, group: str, credentials: tuple[str, str]) -> str:
    scope = f"repository:{group}/{PROXY_MARKER}/{IMAGE}:pull"
    answer = requests.get(
        f"{proxy.url}/jwt/auth",
        params={"service": "dependency_proxy", "scope": scope},
        auth=credentials,
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["token"]


def pull(proxy, group: str, bearer: str) -> requests.Response:
    return requests.get(
        f"{proxy.url}/v2/{group}/{PROXY_MARKER}/{IMAGE}/manifests/latest",
        headers={"Authorization": f"Bearer {bearer}", "Accept": MANIFEST_ACCEPT},
        timeout=30,
    )


def refused_within_the_lookup_time(proxy, group: str, bearer: str) -> requests.Response:
    """The pull's answer once the change is seen, which must be within the lookup time."""
    deadline = time.monotonic() + LOOKUP_SECONDS + 2
    while True:
        answer = pull(proxy, group, bearer)
        if answer.status_code != 200 or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def test_each_removal_refuses_tokens_issued_before_it(tmp_path, upstream, empty_database_url):
    with running_proxy(
        tmp_path,
        empty_database_url,
        upstream.url,
        **{"depproxy.lookup_cache_seconds": str(LOOKUP_SECONDS)},
    ) as proxy:
        ini = proxy.ini
        for group in ("acme", "other"):
            ok(admin(ini, "group", "add", group))
        people = ["stays", "inactive", "removed", "pat-user", "ex-member", "other-dev"]
        for name in people:
            ok(admin(ini, "user", "add", name, stdin=f"{name}-password\n"))
        ok(admin(ini, "member", "add", "acme", "stays", "--role", "owner"))
        for name in ("inactive", "removed", "pat-user", "ex-member"):
            ok(admin(ini, "member", "add", "acme", name, "--role", "developer"))
        ok(admin(ini, "member", "add", "other", "other-dev", "--role", "owner"))
        pat = ok(admin(ini, "token", "add", "pat-user", "--name", "ci", "--scope", "read_registry"))
        deploy = ok(
            admin(ini, "deploy-token", "add", "acme", "--name", "ci", "--scope", "read_registry")
        ).splitlines()
        deploy_credentials = (
            deploy[0].removeprefix("username: "),
            deploy[1].removeprefix("token: "),
        )

        tokens = {
            "control": ("acme", token(proxy, "acme", ("stays", "stays-password"))),
            "deactivate": ("acme", token(proxy, "acme", ("inactive", "inactive-password"))),
            "remove": ("acme", token(proxy, "acme", ("removed", "removed-password"))),
            "revoke": ("acme", token(proxy, "acme", ("pat-user", pat))),
            "member": ("acme", token(proxy, "acme", ("ex-member", "ex-member-password"))),
            "deploy": ("acme", token(proxy, "acme", deploy_credentials)),
            "group": ("other", token(proxy, "other", ("other-dev", "other-dev-password"))),
        }
        # Every token pulls, and who it stands for is now remembered by the server.
        for group, bearer in tokens.values():
            assert pull(proxy, group, bearer).status_code == 200

        ok(admin(ini, "user", "deactivate", "inactive"))
        ok(admin(ini, "user", "remove", "removed"))
        ok(admin(ini, "token", "revoke", "pat-user", "--name", "ci"))
        ok(admin(ini, "member", "remove", "acme", "ex-member"))
        ok(admin(ini, "deploy-token", "revoke", "acme", "--name", "ci"))
        fails(admin(ini, "user", "remove", "other-dev"), "other-dev is the last owner of other")
        ok(admin(ini, "group", "remove", "other"))

        answers = {
            case: refused_within_the_lookup_time(proxy, group, bearer)
            for case, (group, bearer) in tokens.items()
            if case != "control"
        }
        statuses = {case: answer.status_code for case, answer in answers.items()}
        assert statuses == {
            "deactivate": 401,
            "remove": 401,
            "revoke": 401,
            "member": 404,
            "deploy": 401,
            "group": 404,
        }
        group, bearer = tokens["control"]
        assert pull(proxy, group, bearer).status_code == 200

        # A user added now may be given the removed one's id (SQLite gives the highest again):
        # the removed user's token is still refused.
        ok(admin(ini, "user", "add", "newcomer", stdin="newcomer-password\n"))
        ok(admin(ini, "member", "add", "acme", "newcomer", "--role", "developer"))
        time.sleep(LOOKUP_SECONDS + 0.2)
        assert pull(proxy, "acme", tokens["remove"][1]).status_code == 401

        log = json.loads(ok(admin(ini, "audit", "--limit", "100", "--json")))
        actions = [(event["action"], event["group"], event["target"]) for event in log]
        assert actions[:9] == [
            ("member.add", "acme", "newcomer"),
            ("user.add", None, "newcomer"),
            ("group.remove", "other", None),
            ("deploy_token.revoke", "acme", "ci"),
            ("member.remove", "acme", "ex-member"),
            ("token.revoke", None, "pat-user"),
            ("user.remove", None, "removed"),
            ("user.deactivate", None, "inactive"),
            ("deploy_token.issue", "acme", "ci"),
        ]
        assert "dpat-" not in json.dumps(log) and deploy_credentials[1] not in json.dumps(log)
