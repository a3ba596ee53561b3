"""Upstream credentials go only to their registry, only for the groups allowed them, and stay
readable across a key rotation.

The fast half checks the realm policy and the credential-groups matching on their own; the
rest runs the proxy as a real server process against the real token-auth upstream and a
second, recording registry (`tests/support/recorder.py`).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import requests
import responses

from depproxy_pyramid.upstream import (
    Credentials,
    UpstreamAuthFailed,
    UpstreamClient,
    UpstreamNotFound,
)
from depproxy_pyramid.upstream import transport as transport_module
from depproxy_pyramid.upstream.routing import UpstreamRegistry, group_may_use, registry_hosts
from depproxy_pyramid.upstream.tokens import RealmPolicy
from tests.conftest import JWT_SECRET, app_settings
from tests.proxy import PROXY_MARKER, PULLER, Proxy, running_proxy
from tests.server import admin, write_ini
from tests.support.recorder import Recorder

ALICE = Credentials("alice", "alice-secret")
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
NEW_KEY = "new-encryption-key-" + "n" * 40
OTHER_KEY = "unrelated-encryption-key-" + "u" * 40


# -- the realm policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registry_url", "extra", "realm", "allowed"),
    [
        ("https://registry.example", (), "https://registry.example/token", True),
        # the registry's own host on another port: the test upstream's token server, say
        ("http://127.0.0.1:5000", (), "http://127.0.0.1:5001/token", True),
        ("https://REGISTRY.example", (), "https://registry.EXAMPLE/token", True),
        ("https://registry.example", (), "https://auth.example/token", False),
        ("https://registry.example", (), "https://evil.test/token", False),
        ("https://registry.example", (), "http://10.0.0.1/token", False),
        ("https://registry.example", ("auth.example",), "https://auth.example/token", True),
        ("https://registry.example", ("auth.example",), "https://auth.example:8443/t", True),
        ("https://registry.example", ("auth.example:8443",), "https://auth.example:8443/t", True),
        ("https://registry.example", ("auth.example:8443",), "https://auth.example/t", False),
        ("https://registry.example", ("auth.example:443",), "https://auth.example/t", True),
        ("https://registry.example", ("auth.example",), "https://sub.auth.example/t", False),
        ("https://registry-1.docker.io", (), "https://auth.docker.io/token", True),
        ("https://registry.example", (), "https://auth.docker.io/token", False),
        # userinfo and backslashes: parsers disagree on the host, so nothing is sent
        ("https://registry.example", (), "https://registry.example@evil.test/t", False),
        ("https://registry.example", (), "https://evil.test\\@registry.example/t", False),
        ("https://registry.example", (), "https://registry.example:99999/t", False),
        ("https://registry.example", (), "/token", False),
    ],
)
def test_realm_policy(registry_url, extra, realm, allowed):
    assert RealmPolicy(registry_url, extra).allows(realm) is allowed


def test_a_refused_realm_is_an_auth_error_that_says_how_to_allow_it():
    policy = RealmPolicy("http://127.0.0.1:5000", (), "recorder.test")
    with pytest.raises(UpstreamAuthFailed) as info:
        policy.check("http://localhost:5000/token")
    assert info.value.message == (
        "refusing to send the credentials for recorder.test to the token realm "
        "'localhost:5000' it named; if that host is the registry's own token service, allow "
        "it with depproxy.upstream.realms = recorder.test=localhost:5000"
    )


@responses.activate
def test_the_client_sends_credentials_to_no_other_realm_but_pulls_anonymously_anywhere(
    monkeypatch,
):
    # A public address: anonymous token requests go only where the address guard allows.
    monkeypatch.setattr(transport_module, "resolve_addresses", lambda host, port: ["192.0.43.10"])
    challenge = 'Bearer realm="https://elsewhere.example/token",service="s"'
    responses.get(
        "https://registry.example/v2/a/b/manifests/1.0",
        status=401,
        headers={"WWW-Authenticate": challenge},
    )
    responses.get("https://elsewhere.example/token", json={"token": "anonymous"})
    client = UpstreamClient("https://registry.example")
    with pytest.raises(UpstreamAuthFailed, match="elsewhere.example"):
        client.get_manifest("a/b", "1.0", credentials=ALICE)
    assert len(responses.calls) == 1  # the realm was never asked

    with pytest.raises(UpstreamNotFound):  # anonymous goes on to the realm; still 401 after
        client.get_manifest("a/b", "1.0")
    token_call = responses.calls[2].request
    assert token_call.url.startswith("https://elsewhere.example/token")
    assert "Authorization" not in token_call.headers


# -- who may use which credentials -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "allowed", "expected"),
    [
        ("acme", ("acme",), True),
        ("acme/web", ("acme",), True),
        ("acme/web/deep", ("acme/web",), True),
        ("acme", ("acme/web",), False),
        ("acme-corp", ("acme",), False),
        ("ac", ("acme",), False),
        ("other", ("acme", "other"), True),
        ("anything/at/all", ("*",), True),
        ("acme", ("acme/",), True),
        ("acme", (), False),
    ],
)
def test_credential_groups_match_on_path_segments(path, allowed, expected):
    assert group_may_use(path, allowed) is expected


def test_instance_credentials_are_for_the_default_upstream_and_listed_groups_only():
    upstreams = UpstreamRegistry(
        "https://registry-1.docker.io",
        {"ghcr.io": "https://ghcr.io"},
        instance_credentials=ALICE,
        credential_groups=["acme"],
    )
    try:
        assert upstreams.instance_credentials_for("registry-1.docker.io", "acme/web") == ALICE
        assert upstreams.instance_credentials_for("registry-1.docker.io", "other") is None
        assert upstreams.instance_credentials_for("ghcr.io", "acme") is None
        client, _ = upstreams.resolve("docker.io/library/alpine")
        assert upstreams.registry_of(client) == "registry-1.docker.io"
    finally:
        upstreams.close()
    nobody = UpstreamRegistry("https://registry-1.docker.io", instance_credentials=ALICE)
    try:
        assert nobody.instance_credentials_for("registry-1.docker.io", "acme") is None
    finally:
        nobody.close()


def test_realms_are_configured_per_registry_host_under_any_of_its_names():
    upstreams = UpstreamRegistry(
        "https://registry-1.docker.io",
        {"ghcr.io": "https://ghcr.io"},
        realms={"docker.io": ["auth.example"], "ghcr.io": ["ghcr-auth.example"]},
    )
    try:
        hub, ghcr = upstreams.default, upstreams.resolve("ghcr.io/a/b")[0]
        assert hub.tokens.realms.allows("https://auth.example/token")
        assert hub.tokens.realms.allows("https://auth.docker.io/token")
        assert not hub.tokens.realms.allows("https://ghcr-auth.example/token")
        assert ghcr.tokens.realms.allows("https://ghcr-auth.example/token")
        assert not ghcr.tokens.realms.allows("https://auth.example/token")
    finally:
        upstreams.close()
    assert registry_hosts("http://127.0.0.1:5000", ["Recorder.test"]) == {
        "127.0.0.1:5000": "127.0.0.1:5000",
        "recorder.test": "recorder.test",
    }


# -- through the proxy, against real registries -------------------------------------------------


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def fails(result) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def pull_manifest(
    proxy: Proxy, group: str, image: str, credentials=PULLER, reference: str = "1.0"
) -> requests.Response:
    token = proxy.token(group, image, credentials)
    return requests.get(
        f"{proxy.url}/v2/{group}/{PROXY_MARKER}/{image}/manifests/{reference}",
        headers={"Authorization": f"Bearer {token}", "Accept": MANIFEST_ACCEPT},
        timeout=60,
    )


def proxy_token_requests(upstream) -> list[tuple[str | None, int]]:
    """(account, status) of the token requests upstream answered, but the test's own as admin."""
    admin_account = upstream.admin_credentials[0]
    return [
        (r.account, r.status) for r in upstream.token_server.requests if r.account != admin_account
    ]


def restart(proxy: Proxy, upstream_url: str, **extra: str) -> None:
    """The same proxy (database, storage, port) started again with other settings."""
    proxy.server.stop()
    settings = app_settings(
        proxy.db.url,
        proxy.storage,
        **{
            "depproxy.upstream.url": upstream_url,
            "depproxy.upstream.read_timeout": "5",
            "depproxy.external_url": "",
            **extra,
        },
    )
    write_ini(proxy.ini, settings, proxy.server.port)
    proxy.server.start()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with Recorder() as server:
        yield server




def test_group_credentials_go_to_their_registry_and_nowhere_else(
    upstream, recorder, tmp_path, empty_database_url
):
    username, password = upstream.private_credentials
    private = f"{upstream.private_prefix}secret"
    registries = {"depproxy.upstream.registries": f"recorder.test={recorder.url}"}
    with running_proxy(tmp_path, empty_database_url, upstream.url, **registries) as proxy:
        group = proxy.new_group("acme")
        assert ok(proxy.set_upstream_credentials(group, username, password)) == (
            f"upstream credentials for 127.0.0.1:{upstream.relay.port} set for acme"
        )

        answer = pull_manifest(proxy, group, private)
        assert answer.status_code == 200, answer.text
        assert answer.content == upstream.manifest(private, "1.0").content
        assert proxy_token_requests(upstream) == [(username, 200)]

        answer = pull_manifest(proxy, group, "recorder.test/x/y")
        assert answer.status_code == 200, answer.text
        assert answer.content == recorder.manifest
        layer = requests.get(
            f"{proxy.url}/v2/{group}/{PROXY_MARKER}/recorder.test/x/y/blobs/"
            f"{recorder.layer_digest}",
            headers={"Authorization": f"Bearer {proxy.token(group, 'recorder.test/x/y')}"},
            timeout=60,
        )
        assert layer.status_code == 200 and layer.content == recorder.layer

    # The recorder saw the token flow, anonymous, and its own tokens: never the group's
    # Docker Hub-style password, nor any Basic credentials at all.
    seen = recorder.authorizations()
    assert basic(username, password) not in seen
    assert [a for a in seen if a is not None and not a.startswith("Bearer recorder-token-")] == []
    tokens = recorder.token_requests()
    assert len(tokens) >= 1
    assert [t.authorization for t in tokens] == [None] * len(tokens)


def test_a_token_realm_on_another_host_gets_no_credentials_unless_allowed(
    upstream, recorder, tmp_path, empty_database_url
):
    recorder.realm = recorder.other_host_realm  # the same server, as "localhost"
    settings = {
        "depproxy.upstream.registries": (
            f"recorder.test={recorder.url} allowed.test={recorder.url}"
        ),
        "depproxy.upstream.realms": "allowed.test=localhost",
    }
    with running_proxy(tmp_path, empty_database_url, upstream.url, **settings) as proxy:
        group = proxy.new_group("acme")
        ok(proxy.set_upstream_credentials(group, "bot", "bot-password", "recorder.test"))
        ok(proxy.set_upstream_credentials(group, "bot", "bot-password", "ALLOWED.test"))

        refused = pull_manifest(proxy, group, "recorder.test/x/y")
        assert refused.status_code == 502
        assert refused.headers["Content-Type"].startswith("application/json")
        [error] = refused.json()["errors"]
        assert error["code"] == "UNKNOWN"
        assert error["message"].startswith("upstream authentication failed")
        assert (
            "refusing to send the credentials for recorder.test to the token realm "
            f"'localhost:{recorder.port}' it named; if that host is the registry's own token "
            f"service, allow it with depproxy.upstream.realms = "
            f"recorder.test=localhost:{recorder.port}"
        ) in proxy.server.log()
        assert recorder.token_requests() == []
        assert [a for a in recorder.authorizations() if a is not None] == []

        # The operator allowed that realm for allowed.test: there the credentials go.
        recorder.clear()
        answer = pull_manifest(proxy, group, "allowed.test/x/y")
        assert answer.status_code == 200, answer.text
        assert [(t.host, t.authorization) for t in recorder.token_requests()] == [
            (f"localhost:{recorder.port}", basic("bot", "bot-password"))
        ]


def test_instance_credentials_serve_only_the_groups_listed(upstream, tmp_path, empty_database_url):
    username, password = upstream.private_credentials
    private = f"{upstream.private_prefix}secret"
    settings = {
        "depproxy.upstream.username": username,
        "depproxy.upstream.password": password,
        "depproxy.upstream.credential_groups": "listed",
    }
    with running_proxy(tmp_path, empty_database_url, upstream.url, **settings) as proxy:
        ini = proxy.ini
        for command in (
            ["group", "add", "listed"],
            ["group", "add", "listed/sub"],
            ["group", "add", "listed/own"],
            ["group", "add", "listed-lookalike"],
            ["group", "add", "unlisted"],
            ["group", "add", "open", "--public"],
            *(
                ["member", "add", path, PULLER[0], "--role", "developer"]
                for path in ("listed", "listed-lookalike", "unlisted")
            ),
        ):
            ok(admin(ini, *command))
        ok(admin(ini, "user", "add", "stranger", stdin="stranger-password\n"))
        deploy = ok(
            admin(
                ini, "deploy-token", "add", "unlisted", "--name", "ci", "--scope", "read_registry"
            )
        ).splitlines()
        deploy_token = (deploy[0].removeprefix("username: "), deploy[1].removeprefix("token: "))
        ok(proxy.set_upstream_credentials("listed/own", username, "wrong-password"))

        for group in ("listed", "listed/sub"):
            answer = pull_manifest(proxy, group, private)
            assert answer.status_code == 200, (group, answer.text)
            assert answer.content == upstream.manifest(private, "1.0").content

        for group, credentials in [
            ("listed-lookalike", PULLER),
            ("unlisted", PULLER),
            ("open", ("stranger", "stranger-password")),  # a member of nothing, public group
            ("unlisted", deploy_token),
        ]:
            answer = pull_manifest(proxy, group, private, credentials)
            assert answer.status_code == 404, (group, answer.text)
            assert answer.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"

        # Its own (wrong) credentials, and no falling back to the instance's.
        upstream.token_server.reset()
        answer = pull_manifest(proxy, "listed/own", private)
        assert answer.status_code == 502, answer.text
        assert "rejected" in answer.json()["errors"][0]["message"]
        assert proxy_token_requests(upstream) == [(username, 401)]


def test_instance_credentials_nobody_may_use_are_announced_at_start_up(
    upstream, tmp_path, empty_database_url
):
    username, password = upstream.private_credentials
    settings = {"depproxy.upstream.username": username, "depproxy.upstream.password": password}
    with running_proxy(tmp_path, empty_database_url, upstream.url, **settings) as proxy:
        log = proxy.server.log()
        assert "WARN" in log
        assert "depproxy.upstream.credential_groups is empty" in log
        group = proxy.new_group("acme")
        answer = pull_manifest(proxy, group, f"{upstream.private_prefix}secret")
        assert answer.status_code == 404


def test_credentials_survive_a_key_rotation_and_a_missing_key_is_named(
    upstream, tmp_path, empty_database_url
):
    username, password = upstream.private_credentials
    private = f"{upstream.private_prefix}secret"
    with running_proxy(tmp_path, empty_database_url, upstream.url) as proxy:
        # No depproxy.encryption.keys: sealed under depproxy.jwt.secret, as 0.1 did.
        group = proxy.new_group("rotating")
        ok(proxy.set_upstream_credentials(group, username, password))
        assert pull_manifest(proxy, group, private).status_code == 200

        restart(proxy, upstream.url, **{"depproxy.encryption.keys": f"{NEW_KEY} {JWT_SECRET}"})
        assert ok(admin(proxy.ini, "rotate-keys")) == (
            "re-encrypted 1 upstream credential(s) under the newest encryption key"
        )

        restart(proxy, upstream.url, **{"depproxy.encryption.keys": NEW_KEY})
        upstream.token_server.reset()
        answer = pull_manifest(proxy, group, private)
        assert answer.status_code == 200, answer.text
        assert answer.content == upstream.manifest(private, "1.0").content
        assert proxy_token_requests(upstream) == [(username, 200)]

        restart(proxy, upstream.url, **{"depproxy.encryption.keys": OTHER_KEY})
        upstream.token_server.reset()
        answer = pull_manifest(proxy, group, private)
        assert answer.status_code == 500
        [error] = answer.json()["errors"]
        assert error["code"] == "UNKNOWN"
        assert error["detail"] == {"group": "rotating"}
        assert error["message"].startswith(
            "the upstream credentials of group 'rotating' cannot be decrypted with the "
            "configured depproxy.encryption.keys: an operator must run `depproxy-admin "
            "CONFIG_URI rotate-keys`"
        )
        assert (
            f"the upstream credentials of group rotating for 127.0.0.1:{upstream.relay.port} "
            "do not decrypt with any key"
        ) in proxy.server.log()
        assert upstream.token_server.requests == []  # and nobody else's credentials instead

        line = fails(admin(proxy.ini, "rotate-keys"))
        assert line.startswith("depproxy-admin: error: the upstream credentials of group ")
        assert f"group 'rotating' (127.0.0.1:{upstream.relay.port})" in line
