import base64
import gzip
import hashlib
import io
import json
import re
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from depproxy_pyramid import upstream
from depproxy_pyramid.upstream import (
    MANIFEST_ACCEPT,
    BlobRef,
    Credentials,
    ManifestAccept,
    ManifestRef,
    UpstreamAuthFailed,
    UpstreamBadDigest,
    UpstreamClient,
    UpstreamError,
    UpstreamNotAcceptable,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamRegistry,
    UpstreamTimeout,
    UpstreamUnavailable,
    parse_challenges,
)
from depproxy_pyramid.upstream import tokens as tokens_module
from depproxy_pyramid.upstream import transport as transport_module
from depproxy_pyramid.upstream.tokens import RealmPolicy

REG = "https://registry.example"
REALM = "https://auth.example/token"
SERVICE = "registry.example"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ALICE = Credentials("alice", "alice-secret")
BOB = Credentials("bob", "bob-secret")
# The token realm of these tests is on another host: it must be allowed to get credentials.
AUTH_EXAMPLE = RealmPolicy(REG, ["auth.example"])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
MANIFEST_DIGEST = sha256(MANIFEST)
BLOB = b"layer-bytes" * 100
BLOB_DIGEST = sha256(BLOB)
MANIFEST_PATH = "/v2/library/alpine/manifests/latest"
BLOB_PATH = f"/v2/library/alpine/blobs/{BLOB_DIGEST}"


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = 1_700_000_000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    for module in (tokens_module, transport_module):
        monkeypatch.setattr(module, "time", fake)
    return fake


@pytest.fixture(autouse=True)
def public_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every name a redirect names resolves to a public address (responses connects nowhere)."""
    monkeypatch.setattr(transport_module, "resolve_addresses", lambda host, port: ["192.0.43.10"])


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def client():
    c = UpstreamClient(REG)
    yield c
    c.close()


def bearer_challenge(scope: str | None, realm: str = REALM) -> str:
    params = [f'realm="{realm}"', f'service="{SERVICE}"']
    if scope is not None:
        params.append(f'scope="{scope}"')
    return "Bearer " + ",".join(params)


def basic_header(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


class TokenServer:
    """Issues t1, t2, ... and remembers which Authorization each was issued for."""

    def __init__(self, rsps, *, realm: str = REALM, **body) -> None:
        self.body = {"expires_in": 300, **body}
        self.issued: list[tuple[str | None, str]] = []
        self.requests: list[requests.PreparedRequest] = []
        self.revoked: set[str] = set()
        rsps.add_callback(responses.GET, realm, callback=self._respond)

    def _respond(self, request):
        self.requests.append(request)
        token = f"t{len(self.issued) + 1}"
        self.issued.append((request.headers.get("Authorization"), token))
        return 200, {"Content-Type": "application/json"}, json.dumps({"token": token, **self.body})

    @property
    def valid(self) -> set[str]:
        return {token for _, token in self.issued} - self.revoked

    def issued_to(self, authorization: str | None) -> list[str]:
        return [token for auth, token in self.issued if auth == authorization]


class Registry:
    """A registry that demands a bearer token from `tokens` on every request."""

    def __init__(self, rsps, tokens: TokenServer, base: str = REG) -> None:
        self.rsps = rsps
        self.tokens = tokens
        self.base = base
        self.seen: list[requests.PreparedRequest] = []

    def add(
        self,
        method: str,
        path: str,
        *,
        status: int = 200,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        challenge: str | None = None,
    ) -> None:
        name = re.match(r"/v2/(.+)/(?:manifests|blobs)/", path).group(1)
        challenge = challenge or bearer_challenge(f"repository:{name}:pull")

        def respond(request):
            self.seen.append(request)
            auth = request.headers.get("Authorization", "")
            if auth.removeprefix("Bearer ") not in self.tokens.valid:
                return 401, {"WWW-Authenticate": challenge}, b""
            return status, dict(headers or {}), body

        self.rsps.add_callback(method, self.base + path, callback=respond, content_type=None)

    def auths(self) -> list[str | None]:
        return [r.headers.get("Authorization") for r in self.seen]


def manifest_headers(content: bytes = MANIFEST, media_type: str = OCI_INDEX) -> dict[str, str]:
    return {
        "Content-Type": media_type,
        "Docker-Content-Digest": sha256(content),
        "Content-Length": str(len(content)),
    }


@pytest.fixture
def tokens(rsps) -> TokenServer:
    return TokenServer(rsps)


@pytest.fixture
def registry(rsps, tokens) -> Registry:
    return Registry(rsps, tokens)


# -- challenge parsing ----------------------------------------------------------------------


def test_parse_bearer_challenge():
    [c] = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert c.scheme == "bearer"
    assert dict(c.params) == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull",
    }


def test_parse_escaped_quotes_and_backslashes():
    [c] = parse_challenges(r'Bearer realm="https://a/t",service="say \"hi\" \\o/"')
    assert c.params["service"] == r'say "hi" \o/'
    assert c.params["realm"] == "https://a/t"


def test_parse_commas_inside_quotes():
    [c] = parse_challenges('Bearer scope="repository:a/b:pull,push", realm="https://a/t"')
    assert c.params["scope"] == "repository:a/b:pull,push"
    assert c.params["realm"] == "https://a/t"


def test_parse_case_insensitive_scheme_and_params_and_spacing():
    [c] = parse_challenges('bearer Realm = "https://a/t" ,  SERVICE=reg')
    assert c.scheme == "bearer"
    assert dict(c.params) == {"realm": "https://a/t", "service": "reg"}


def test_parse_unquoted_realm_url():
    [c] = parse_challenges("Bearer realm=https://a.example/token?x=1,service=reg")
    assert dict(c.params) == {"realm": "https://a.example/token?x=1", "service": "reg"}


def test_parse_several_challenges_and_token68():
    challenges = parse_challenges('Negotiate abc==, Basic realm="r1", Bearer realm="r2"')
    assert [c.scheme for c in challenges] == ["negotiate", "basic", "bearer"]
    assert challenges[1].params["realm"] == "r1"
    assert challenges[2].params["realm"] == "r2"


def test_parse_missing_scope():
    [c] = parse_challenges('Bearer realm="https://a/t"')
    assert "scope" not in c.params


# -- bearer token flow ----------------------------------------------------------------------


def test_anonymous_token_flow(rsps, client, tokens, registry):
    registry.add("GET", MANIFEST_PATH, body=MANIFEST, headers=manifest_headers())

    manifest = client.get_manifest("library/alpine", "latest")

    assert manifest.content == MANIFEST
    assert manifest.digest == MANIFEST_DIGEST
    assert manifest.media_type == OCI_INDEX
    assert registry.auths() == [None, "Bearer t1"]
    [token_request] = tokens.requests
    assert "Authorization" not in token_request.headers
    assert parse_qs(urlsplit(token_request.url).query) == {
        "service": [SERVICE],
        "scope": ["repository:library/alpine:pull"],
    }
    assert all(r.headers["Accept"] == MANIFEST_ACCEPT for r in registry.seen)
    assert all(r.headers["User-Agent"] == "depproxy-pyramid" for r in registry.seen)


def test_accept_lists_exactly_the_four_manifest_types():
    assert sorted(t.strip() for t in MANIFEST_ACCEPT.split(",")) == sorted(
        [
            OCI_MANIFEST,
            OCI_INDEX,
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ]
    )


def test_missing_scope_requests_pull_scope_for_the_repository(rsps, client, tokens, registry):
    registry.add(
        "GET",
        MANIFEST_PATH,
        body=MANIFEST,
        headers=manifest_headers(),
        challenge=bearer_challenge(None),
    )
    client.get_manifest("library/alpine", "latest")
    query = parse_qs(urlsplit(tokens.requests[0].url).query)
    assert query["scope"] == ["repository:library/alpine:pull"]


def test_challenge_scope_is_used_verbatim_and_split(rsps, client, tokens, registry):
    scope = "repository:library/alpine:pull repository:other/thing:pull"
    registry.add(
        "GET",
        MANIFEST_PATH,
        body=MANIFEST,
        headers=manifest_headers(),
        challenge=bearer_challenge(scope),
    )
    client.get_manifest("library/alpine", "latest")
    query = parse_qs(urlsplit(tokens.requests[0].url).query)
    assert query["scope"] == scope.split()


def test_realm_query_string_is_kept(rsps, client):
    realm = "https://auth.example/token?account=x"
    tokens = TokenServer(rsps, realm="https://auth.example/token")
    registry = Registry(rsps, tokens)
    registry.add(
        "GET",
        MANIFEST_PATH,
        body=MANIFEST,
        headers=manifest_headers(),
        challenge=bearer_challenge("repository:library/alpine:pull", realm=realm),
    )
    client.get_manifest("library/alpine", "latest")
    query = parse_qs(urlsplit(tokens.requests[0].url).query)
    assert query["account"] == ["x"]
    assert query["service"] == [SERVICE]


def test_access_token_field_is_accepted(rsps, client):
    rsps.add(responses.GET, REALM, json={"access_token": "at-1"})
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        status=401,
        headers={"WWW-Authenticate": bearer_challenge("repository:library/alpine:pull")},
        match=[responses.matchers.header_matcher({"Accept": MANIFEST_ACCEPT})],
    )
    with pytest.raises(UpstreamNotFound):
        client.get_manifest("library/alpine", "latest")
    assert rsps.calls[-1].request.headers["Authorization"] == "Bearer at-1"


def test_credentials_go_only_to_the_realm(rsps, tokens, registry):
    creds = Credentials("alice", "pässwörd")
    client = UpstreamClient(REG, realms=AUTH_EXAMPLE)
    registry.add("GET", MANIFEST_PATH, body=MANIFEST, headers=manifest_headers())

    client.get_manifest("library/alpine", "latest", credentials=creds)

    expected = "Basic " + base64.b64encode("alice:pässwörd".encode()).decode()
    assert [auth for auth, _ in tokens.issued] == [expected]
    assert registry.auths() == [None, "Bearer t1"]


def test_token_is_cached_and_sent_proactively(rsps, client, tokens, registry):
    registry.add("GET", MANIFEST_PATH, body=MANIFEST, headers=manifest_headers())
    registry.add("GET", BLOB_PATH, body=BLOB)

    client.get_manifest("library/alpine", "latest")
    client.get_manifest("library/alpine", "latest")
    with client.open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert b"".join(blob.iter_chunks()) == BLOB

    assert len(tokens.issued) == 1
    assert registry.auths() == [None, "Bearer t1", "Bearer t1", "Bearer t1"]


def test_tokens_are_separated_by_credentials(rsps, tokens, registry):
    client = UpstreamClient(REG, realms=AUTH_EXAMPLE)
    registry.add("GET", MANIFEST_PATH, body=MANIFEST, headers=manifest_headers())
    bob_with_other_password = Credentials("bob", "different")

    client.get_manifest("library/alpine", "latest", credentials=ALICE)
    client.get_manifest("library/alpine", "latest", credentials=BOB)
    client.get_manifest("library/alpine", "latest", credentials=bob_with_other_password)
    anonymous = UpstreamClient(REG)
    anonymous.get_manifest("library/alpine", "latest")

    assert tokens.issued == [
        (basic_header(ALICE), "t1"),
        (basic_header(BOB), "t2"),
        (basic_header(bob_with_other_password), "t3"),
        (None, "t4"),
    ]
    # every identity starts unauthenticated, then uses only its own token
    assert registry.auths() == [
        None,
        "Bearer t1",
        None,
        "Bearer t2",
        None,
        "Bearer t3",
        None,
        "Bearer t4",
    ]

    client.get_manifest("library/alpine", "latest", credentials=BOB)
    client.get_manifest("library/alpine", "latest", credentials=ALICE)
    assert registry.auths()[-2:] == ["Bearer t2", "Bearer t1"]
    assert len(tokens.issued) == 4


@pytest.mark.parametrize(
    ("body", "still_fresh_at", "stale_at"),
    [
        ({"expires_in": 300}, 289, 291),
        ({"expires_in": None}, 49, 51),  # absent: spec default of 60 s
        ({"expires_in": 4}, 1.9, 2.1),  # tiny lifetime: margin is half of it
        ({"expires_in": 60, "issued_at": "2023-11-14T22:12:50Z"}, 19, 21),  # issued 30 s ago
        ({"expires_in": 60, "issued_at": "2023-11-14T22:14:20.123456789Z"}, 49, 51),  # future
    ],
)
def test_token_expiry(rsps, client, clock, body, still_fresh_at, stale_at):
    assert clock.wall == 1_700_000_000.0  # 2023-11-14T22:13:20Z
    body = {k: v for k, v in body.items() if v is not None}
    tokens = TokenServer(rsps)
    tokens.body = body
    registry = Registry(rsps, tokens)
    registry.add("GET", MANIFEST_PATH, body=MANIFEST, headers=manifest_headers())

    client.get_manifest("library/alpine", "latest")
    clock.advance(still_fresh_at)
    client.get_manifest("library/alpine", "latest")
    assert len(tokens.issued) == 1
    clock.advance(stale_at - still_fresh_at)
    client.get_manifest("library/alpine", "latest")
    assert len(tokens.issued) == 2
    assert registry.auths()[-1] == "Bearer t2"


def test_rejected_cached_token_is_refreshed_once(rsps, client, tokens, registry):
    registry.add("GET", MANIFEST_PATH, body=MANIFEST, headers=manifest_headers())
    client.get_manifest("library/alpine", "latest")
    tokens.revoked.add("t1")

    client.get_manifest("library/alpine", "latest")

    assert registry.auths() == [None, "Bearer t1", "Bearer t1", "Bearer t2"]


def test_401_after_token_exchange_is_not_found(rsps, client, tokens, registry):
    tokens.revoked.update({"t1", "t2"})  # the registry never accepts what it issues
    registry.add("GET", MANIFEST_PATH, body=MANIFEST)

    with pytest.raises(UpstreamNotFound, match="not found or access denied upstream") as info:
        client.get_manifest("library/alpine", "latest")

    assert info.value.status == 401
    assert registry.auths() == [None, "Bearer t1"]  # retried exactly once


def test_403_is_not_found(rsps, client, tokens, registry):
    registry.add("GET", MANIFEST_PATH, status=403)
    with pytest.raises(UpstreamNotFound, match="not found or access denied") as info:
        client.get_manifest("library/alpine", "latest")
    assert info.value.status == 403


def test_404_is_not_found(rsps, client, tokens, registry):
    registry.add("GET", MANIFEST_PATH, status=404)
    with pytest.raises(UpstreamNotFound) as info:
        client.get_manifest("library/alpine", "latest")
    assert info.value.status == 404


@pytest.mark.parametrize("status", [401, 403])
def test_realm_rejecting_credentials_is_auth_failed(rsps, status):
    client = UpstreamClient(REG, realms=AUTH_EXAMPLE)
    rsps.add(responses.GET, REALM, status=status)
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        status=401,
        headers={"WWW-Authenticate": bearer_challenge("repository:library/alpine:pull")},
    )
    with pytest.raises(UpstreamAuthFailed) as info:
        client.get_manifest("library/alpine", "latest", credentials=ALICE)
    assert info.value.status == status
    assert "alice-secret" not in str(info.value)
    assert len(rsps.calls) == 2


def test_plain_http_realm_gets_no_credentials_from_https_upstream(rsps):
    client = UpstreamClient(REG, realms=AUTH_EXAMPLE)
    rsps.add(responses.GET, "http://auth.example/token", json={"token": "x"})
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        status=401,
        headers={"WWW-Authenticate": bearer_challenge("s", realm="http://auth.example/token")},
    )
    with pytest.raises(UpstreamUnavailable, match="plain-http"):
        client.get_manifest("library/alpine", "latest", credentials=ALICE)
    assert len(rsps.calls) == 1


@pytest.mark.parametrize("realm", ["ftp://auth.example/token", "/token", ""])
def test_unusable_realm_is_unavailable(rsps, client, realm):
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        status=401,
        headers={"WWW-Authenticate": f'Bearer realm="{realm}"'},
    )
    with pytest.raises(UpstreamUnavailable, match="realm"):
        client.get_manifest("library/alpine", "latest")
    assert len(rsps.calls) == 1


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"expires_in": 60}', b'{"token": ""}', b'{"token": 5}']
)
def test_malformed_token_response_is_unavailable(rsps, client, body):
    rsps.add(responses.GET, REALM, body=body)
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        status=401,
        headers={"WWW-Authenticate": bearer_challenge("s")},
    )
    with pytest.raises(UpstreamUnavailable, match="token endpoint"):
        client.get_manifest("library/alpine", "latest")


def test_token_endpoint_errors(rsps, client):
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        status=401,
        headers={"WWW-Authenticate": bearer_challenge("s")},
    )
    rsps.add(responses.GET, REALM, status=429, headers={"Retry-After": "7"})
    with pytest.raises(UpstreamRateLimited) as info:
        client.get_manifest("library/alpine", "latest")
    assert info.value.retry_after == 7
    rsps.replace(responses.GET, REALM, status=404)
    with pytest.raises(UpstreamUnavailable) as info:
        client.get_manifest("library/alpine", "latest")
    assert info.value.status == 404


def test_401_without_challenge_is_unavailable(rsps, client):
    rsps.add(responses.GET, REG + MANIFEST_PATH, status=401)
    with pytest.raises(UpstreamUnavailable, match="challenge") as info:
        client.get_manifest("library/alpine", "latest")
    assert info.value.status == 401


def test_prefers_bearer_when_several_challenges_offered(rsps, client, tokens):
    registry = Registry(rsps, tokens)
    registry.add(
        "GET",
        MANIFEST_PATH,
        body=MANIFEST,
        headers=manifest_headers(),
        challenge='Basic realm="x", ' + bearer_challenge("repository:library/alpine:pull"),
    )
    client.get_manifest("library/alpine", "latest")
    assert registry.auths() == [None, "Bearer t1"]


def test_token_cache_prunes_expired_entries(rsps, client, tokens, clock, monkeypatch):
    monkeypatch.setattr(tokens_module, "_TOKEN_CACHE_PRUNE_AT", 2)
    registry = Registry(rsps, tokens)
    for name in ("a/one", "a/two", "a/three"):
        registry.add(
            "GET", f"/v2/{name}/manifests/latest", body=MANIFEST, headers=manifest_headers()
        )
    client.get_manifest("a/one", "latest")
    clock.advance(1000)
    client.get_manifest("a/two", "latest")
    client.get_manifest("a/three", "latest")
    assert len(client.tokens._tokens) == 2
    assert {key[0] for key in client.tokens._token_keys} == {"a/two", "a/three"}


# -- Basic-auth upstreams -------------------------------------------------------------------


def basic_registry(rsps, creds: Credentials) -> list[str | None]:
    seen: list[str | None] = []

    def respond(request):
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != basic_header(creds):
            return 401, {"WWW-Authenticate": 'Basic realm="registry"'}, b""
        return 200, manifest_headers(), MANIFEST

    rsps.add_callback(responses.GET, REG + MANIFEST_PATH, callback=respond, content_type=None)
    return seen


def test_basic_upstream_gets_credentials_directly(rsps):
    seen = basic_registry(rsps, ALICE)
    client = UpstreamClient(REG)
    client.get_manifest("library/alpine", "latest", credentials=ALICE)
    client.get_manifest("library/alpine", "latest", credentials=ALICE)
    assert seen == [None, basic_header(ALICE), basic_header(ALICE)]


def test_basic_upstream_with_wrong_credentials_is_auth_failed(rsps):
    seen = basic_registry(rsps, ALICE)
    client = UpstreamClient(REG)
    with pytest.raises(UpstreamAuthFailed) as info:
        client.get_manifest("library/alpine", "latest", credentials=BOB)
    assert info.value.status == 401
    with pytest.raises(UpstreamAuthFailed):  # now sent proactively, still rejected
        client.get_manifest("library/alpine", "latest", credentials=BOB)
    assert seen == [None, basic_header(BOB), basic_header(BOB)]


def test_basic_upstream_without_credentials_is_auth_failed(rsps, client):
    seen = basic_registry(rsps, ALICE)
    with pytest.raises(UpstreamAuthFailed, match="requires credentials"):
        client.get_manifest("library/alpine", "latest")
    assert seen == [None]


# -- status mapping and retries ------------------------------------------------------------


def test_429_with_retry_after_seconds(rsps, client):
    rsps.add(responses.GET, REG + MANIFEST_PATH, status=429, headers={"Retry-After": "30"})
    with pytest.raises(UpstreamRateLimited) as info:
        client.get_manifest("library/alpine", "latest")
    assert (info.value.status, info.value.retry_after) == (429, 30)
    assert len(rsps.calls) == 1


def test_429_with_retry_after_date(rsps, client, clock):
    # 2023-11-14T22:13:20Z is the fake wall clock; the date is 45 s later
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        status=429,
        headers={"Retry-After": "Tue, 14 Nov 2023 22:14:05 GMT"},
    )
    with pytest.raises(UpstreamRateLimited) as info:
        client.get_manifest("library/alpine", "latest")
    assert info.value.retry_after == 45


def test_429_without_retry_after(rsps, client):
    rsps.add(responses.GET, REG + MANIFEST_PATH, status=429, headers={"Retry-After": "soon"})
    with pytest.raises(UpstreamRateLimited) as info:
        client.get_manifest("library/alpine", "latest")
    assert info.value.retry_after is None


def test_500_is_unavailable_without_retry(rsps, client):
    rsps.add(responses.GET, REG + MANIFEST_PATH, status=500)
    with pytest.raises(UpstreamUnavailable) as info:
        client.get_manifest("library/alpine", "latest")
    assert info.value.status == 500
    assert len(rsps.calls) == 1


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_errors_are_retried_a_bounded_number_of_times(rsps, client, clock, status):
    rsps.add(responses.GET, REG + MANIFEST_PATH, status=status)
    with pytest.raises(UpstreamUnavailable) as info:
        client.get_manifest("library/alpine", "latest")
    assert info.value.status == status
    assert len(rsps.calls) == 2
    assert clock.sleeps == [0.25]


def test_transient_503_then_success(rsps, client):
    rsps.add(responses.GET, REG + MANIFEST_PATH, status=503)
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        body=MANIFEST,
        headers=manifest_headers(),
    )
    assert client.get_manifest("library/alpine", "latest").content == MANIFEST
    assert len(rsps.calls) == 2


@pytest.mark.parametrize(
    "error", [requests.ConnectionError("refused"), requests.exceptions.ConnectTimeout("slow")]
)
def test_connection_errors_are_retried_then_unavailable(rsps, client, error):
    rsps.add(responses.GET, REG + MANIFEST_PATH, body=error)
    with pytest.raises(UpstreamUnavailable, match="cannot connect") as info:
        client.get_manifest("library/alpine", "latest")
    assert info.value.status is None
    assert len(rsps.calls) == 2


def test_read_timeout_is_unavailable_without_retry(rsps, client):
    rsps.add(responses.GET, REG + MANIFEST_PATH, body=requests.exceptions.ReadTimeout("slow"))
    with pytest.raises(UpstreamTimeout, match="timed out"):
        client.get_manifest("library/alpine", "latest")
    assert len(rsps.calls) == 1


class FailingRaw(io.RawIOBase):
    """Gives `good` bytes, then fails like a dropped connection."""

    def __init__(self, good: bytes) -> None:
        self.good = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.good:
            raise ConnectionResetError("connection reset")
        n = min(len(buffer), len(self.good))
        buffer[:n] = self.good[:n]
        self.good = self.good[n:]
        return n


def test_failure_while_streaming_is_unavailable_and_not_retried(rsps, client):
    body = io.BufferedReader(FailingRaw(b"x" * 10), buffer_size=4)
    rsps.add(responses.GET, REG + BLOB_PATH, body=body)
    with client.open_blob("library/alpine", BLOB_DIGEST) as blob:
        chunks = blob.iter_chunks(chunk_size=4)
        assert next(chunks) == b"xxxx"
        with pytest.raises(UpstreamUnavailable, match="transfer failed"):
            list(chunks)
    assert len(rsps.calls) == 1


def test_manifest_read_failure_is_unavailable(rsps, client):
    body = io.BufferedReader(FailingRaw(b"{"), buffer_size=4)
    rsps.add(responses.GET, REG + MANIFEST_PATH, body=body, content_type=OCI_MANIFEST)
    with pytest.raises(UpstreamUnavailable, match="reading upstream manifest"):
        client.get_manifest("library/alpine", "latest")
    assert len(rsps.calls) == 1


def test_parse_ignores_parameters_before_any_scheme():
    [c] = parse_challenges('realm="x", Bearer realm="y"')
    assert (c.scheme, dict(c.params)) == ("bearer", {"realm": "y"})


def test_all_errors_share_the_base_class():
    for cls in (
        UpstreamUnavailable,
        UpstreamRateLimited,
        UpstreamNotFound,
        UpstreamAuthFailed,
        UpstreamRefused,
        UpstreamBadDigest,
    ):
        assert issubclass(cls, UpstreamError)
    error = UpstreamNotFound("gone", status=404)
    assert (str(error), error.message, error.status) == ("gone", "gone", 404)


# -- manifests -----------------------------------------------------------------------------


def test_head_manifest_uses_headers(rsps, client):
    rsps.add(
        responses.HEAD,
        REG + MANIFEST_PATH,
        headers={
            "Content-Type": f"{OCI_INDEX}; charset=utf-8",
            "Docker-Content-Digest": MANIFEST_DIGEST,
            "Content-Length": "1234",
        },
    )
    ref = client.head_manifest("library/alpine", "latest")
    assert ref == ManifestRef(MANIFEST_DIGEST, OCI_INDEX, 1234)
    assert [c.request.method for c in rsps.calls] == ["HEAD"]
    assert rsps.calls[0].request.headers["Accept"] == MANIFEST_ACCEPT


@pytest.mark.parametrize("missing", ["Docker-Content-Digest", "Content-Type", "Content-Length"])
def test_head_manifest_falls_back_to_get(rsps, client, missing):
    headers = manifest_headers()
    del headers[missing]
    rsps.add(
        responses.HEAD,
        REG + MANIFEST_PATH,
        headers=headers,
        **({"content_type": None} if missing == "Content-Type" else {}),
    )
    rsps.add(responses.GET, REG + MANIFEST_PATH, body=MANIFEST, headers={"Content-Type": OCI_INDEX})
    ref = client.head_manifest("library/alpine", "latest")
    assert ref == ManifestRef(MANIFEST_DIGEST, OCI_INDEX, len(MANIFEST))
    assert [c.request.method for c in rsps.calls] == ["HEAD", "GET"]


def test_head_manifest_by_digest_with_other_digest_is_bad_digest(rsps, client):
    other = sha256(b"other")
    rsps.add(
        responses.HEAD,
        REG + f"/v2/library/alpine/manifests/{MANIFEST_DIGEST}",
        headers=manifest_headers(b"other"),
    )
    with pytest.raises(UpstreamBadDigest, match=other):
        client.head_manifest("library/alpine", MANIFEST_DIGEST)


def test_head_manifest_not_found(rsps, client):
    rsps.add(responses.HEAD, REG + MANIFEST_PATH, status=404)
    with pytest.raises(UpstreamNotFound):
        client.head_manifest("library/alpine", "latest")


SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
SCHEMA2_ONLY = ManifestAccept.of([SCHEMA2])
SCHEMA2_MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": SCHEMA2, "config": {}, "layers": []}
).encode()


def test_manifests_are_asked_for_with_the_accepted_types(rsps, client):
    rsps.add(
        responses.HEAD,
        REG + MANIFEST_PATH,
        headers=manifest_headers(SCHEMA2_MANIFEST, SCHEMA2),
        match=[responses.matchers.header_matcher({"Accept": SCHEMA2})],
    )
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        body=SCHEMA2_MANIFEST,
        content_type=SCHEMA2,
        match=[responses.matchers.header_matcher({"Accept": SCHEMA2})],
    )
    ref = client.head_manifest("library/alpine", "latest", accept=SCHEMA2_ONLY)
    assert ref == ManifestRef(sha256(SCHEMA2_MANIFEST), SCHEMA2, len(SCHEMA2_MANIFEST))
    manifest = client.get_manifest("library/alpine", "latest", accept=SCHEMA2_ONLY)
    assert (manifest.media_type, manifest.content) == (SCHEMA2, SCHEMA2_MANIFEST)


@pytest.mark.parametrize(
    ("content_type", "answered"),
    [
        (OCI_INDEX, OCI_INDEX),
        (f"{OCI_INDEX}; charset=utf-8", OCI_INDEX),
        # A registry converting for an old client.
        ("application/vnd.docker.distribution.manifest.v1+prettyjws",
         "application/vnd.docker.distribution.manifest.v1+prettyjws"),
        # A generic type leaves the body to say.
        ("application/json", OCI_INDEX),
    ],
)  # fmt: skip
def test_a_type_not_asked_for_is_not_acceptable(rsps, client, content_type, answered):
    rsps.add(responses.GET, REG + MANIFEST_PATH, body=MANIFEST, content_type=content_type)
    with pytest.raises(UpstreamNotAcceptable) as refused:
        client.get_manifest("library/alpine", "latest", accept=SCHEMA2_ONLY)
    assert refused.value.media_type == answered
    assert refused.value.message == (
        f"upstream answered manifest library/alpine:latest with {answered}, which was not "
        "asked for"
    )


def test_a_head_answering_a_type_not_asked_for_is_not_acceptable(rsps, client):
    rsps.add(responses.HEAD, REG + MANIFEST_PATH, headers=manifest_headers())
    with pytest.raises(UpstreamNotAcceptable) as refused:
        client.head_manifest("library/alpine", "latest", accept=SCHEMA2_ONLY)
    assert refused.value.media_type == OCI_INDEX
    assert [c.request.method for c in rsps.calls] == ["HEAD"]


def test_a_manifest_of_all_four_types_still_answers_schema1_as_not_acceptable(rsps, client):
    schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    rsps.add(responses.GET, REG + MANIFEST_PATH, body=b"{}", content_type=schema1)
    with pytest.raises(UpstreamNotAcceptable):
        client.get_manifest("library/alpine", "latest")


def test_get_manifest_by_digest(rsps, client):
    rsps.add(
        responses.GET,
        REG + f"/v2/library/alpine/manifests/{MANIFEST_DIGEST}",
        body=MANIFEST,
        headers=manifest_headers(),
    )
    manifest = client.get_manifest("library/alpine", MANIFEST_DIGEST)
    assert manifest.digest == MANIFEST_DIGEST
    assert manifest.size == len(MANIFEST)


def test_get_manifest_by_sha512_digest(rsps, client):
    digest = "sha512:" + hashlib.sha512(MANIFEST).hexdigest()
    rsps.add(
        responses.GET,
        REG + f"/v2/library/alpine/manifests/{digest}",
        body=MANIFEST,
        headers={"Content-Type": OCI_INDEX},
    )
    assert client.get_manifest("library/alpine", digest).digest == digest


def test_get_manifest_digest_mismatch_is_bad_digest(rsps, client):
    # the upstream even claims the requested digest: only the bytes count
    rsps.add(
        responses.GET,
        REG + f"/v2/library/alpine/manifests/{MANIFEST_DIGEST}",
        body=MANIFEST + b" ",
        headers={"Content-Type": OCI_INDEX, "Docker-Content-Digest": MANIFEST_DIGEST},
    )
    with pytest.raises(UpstreamBadDigest):
        client.get_manifest("library/alpine", MANIFEST_DIGEST)


def test_get_manifest_by_tag_trusts_bytes_over_header(rsps, client):
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        body=MANIFEST,
        headers={"Content-Type": OCI_INDEX, "Docker-Content-Digest": sha256(b"lie")},
    )
    assert client.get_manifest("library/alpine", "latest").digest == MANIFEST_DIGEST


def test_manifest_media_type_from_body_when_header_is_generic(rsps, client):
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        body=MANIFEST,
        headers={"Content-Type": "application/json"},
    )
    assert client.get_manifest("library/alpine", "latest").media_type == OCI_INDEX


def test_manifest_without_any_media_type_is_unavailable(rsps, client):
    rsps.add(responses.GET, REG + MANIFEST_PATH, body=b'{"schemaVersion": 2}', content_type=None)
    with pytest.raises(UpstreamUnavailable, match="not a manifest"):
        client.get_manifest("library/alpine", "latest")


def test_manifest_of_exactly_the_limit_is_accepted(rsps, client):
    head = b'{"schemaVersion": 2, "annotations": {"padding": "'
    body = head + b"x" * (upstream.MAX_MANIFEST_SIZE - len(head) - 3) + b'"}}'
    rsps.add(responses.GET, REG + MANIFEST_PATH, body=body, content_type=OCI_MANIFEST)
    assert client.get_manifest("library/alpine", "latest").size == upstream.MAX_MANIFEST_SIZE


def test_oversized_manifest_without_content_length(rsps, client):
    body = b"x" * (upstream.MAX_MANIFEST_SIZE + 1)
    rsps.add(responses.GET, REG + MANIFEST_PATH, body=body, content_type=OCI_MANIFEST)
    with pytest.raises(UpstreamUnavailable, match="limit"):
        client.get_manifest("library/alpine", "latest")


def test_oversized_manifest_announced_by_content_length(rsps, client):
    size = upstream.MAX_MANIFEST_SIZE + 1
    rsps.add(
        responses.GET,
        REG + MANIFEST_PATH,
        body=b"{}",
        content_type=OCI_MANIFEST,
        headers={"Content-Length": str(size)},
    )
    with pytest.raises(UpstreamUnavailable, match=str(size)):
        client.get_manifest("library/alpine", "latest")


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("../etc", "latest"),
        ("library//alpine", "latest"),
        ("library/alpine/", "latest"),
        ("Library/alpine", "latest"),
        ("library/alp%2e", "latest"),
        ("library/alpine", "../latest"),
        ("library/alpine", "latest?x=1"),
        ("library/alpine", "sha256:abc"),
        ("library/alpine", "md5:" + "0" * 32),
        ("library/alpine", "sha256:" + "A" * 64),
    ],
)
def test_unsafe_names_and_references_are_refused_without_a_request(rsps, client, name, reference):
    with pytest.raises(UpstreamRefused):
        client.get_manifest(name, reference)
    with pytest.raises(UpstreamRefused):
        client.head_manifest(name, reference)
    assert len(rsps.calls) == 0


def test_unsafe_blob_digest_is_refused(rsps, client):
    with pytest.raises(UpstreamRefused):
        client.open_blob("library/alpine", "sha256:../../x")
    with pytest.raises(UpstreamRefused):
        client.head_blob("library/alpine", "latest")
    assert len(rsps.calls) == 0


# -- blobs ---------------------------------------------------------------------------------


def test_open_blob_streams_body(rsps, client):
    rsps.add(responses.GET, REG + BLOB_PATH, body=BLOB, headers={"Content-Length": str(len(BLOB))})
    with client.open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert (blob.status, blob.size) == (200, len(BLOB))
        assert list(blob.iter_chunks(chunk_size=500)) == [BLOB[:500], BLOB[500:1000], BLOB[1000:]]


def test_open_blob_does_not_decode_content_encoding(rsps, client):
    compressed = gzip.compress(BLOB)
    rsps.add(responses.GET, REG + BLOB_PATH, body=compressed, headers={"Content-Encoding": "gzip"})
    with client.open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert b"".join(blob.iter_chunks()) == compressed
    assert rsps.calls[0].request.headers["Accept-Encoding"] == "identity"


def test_redirect_to_other_host_drops_authorization(rsps, client, tokens, registry):
    cdn = "https://cdn.example/blobs/abc?signature=xyz"
    registry.add("GET", BLOB_PATH, status=307, headers={"Location": cdn})
    rsps.add(responses.GET, cdn, body=BLOB, headers={"Content-Length": str(len(BLOB))})

    with client.open_blob("library/alpine", BLOB_DIGEST, byte_range=(0, None)) as blob:
        assert b"".join(blob.iter_chunks()) == BLOB

    cdn_request = rsps.calls[-1].request
    assert cdn_request.url == cdn
    assert "Authorization" not in cdn_request.headers
    assert cdn_request.headers["Range"] == "bytes=0-"
    assert registry.auths()[-1] == "Bearer t1"


@pytest.mark.parametrize(
    "location", ["https://registry.example:8443/elsewhere", "http://registry.example/elsewhere"]
)
def test_redirect_to_other_port_or_scheme_drops_authorization(
    rsps, client, tokens, registry, location
):
    registry.add("GET", BLOB_PATH, status=302, headers={"Location": location})
    rsps.add(responses.GET, location, body=BLOB)
    with client.open_blob("library/alpine", BLOB_DIGEST):
        pass
    assert "Authorization" not in rsps.calls[-1].request.headers


def test_redirect_on_same_host_keeps_authorization(rsps, client, tokens, registry):
    target = "/v2/library/alpine/storage/abc"
    registry.add("GET", BLOB_PATH, status=307, headers={"Location": target})
    rsps.add(responses.GET, REG + target, body=BLOB)
    with client.open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert b"".join(blob.iter_chunks()) == BLOB
    assert rsps.calls[-1].request.url == REG + target
    assert rsps.calls[-1].request.headers["Authorization"] == "Bearer t1"


def test_redirect_loop_is_bounded(rsps, client):
    rsps.add(responses.GET, REG + BLOB_PATH, status=302, headers={"Location": BLOB_PATH})
    with pytest.raises(UpstreamUnavailable, match="redirects"):
        client.open_blob("library/alpine", BLOB_DIGEST)
    assert len(rsps.calls) == 6  # the request plus five followed hops


def test_five_redirects_are_followed(rsps, client):
    hops = [f"https://cdn{i}.example/b" for i in range(5)]
    rsps.add(responses.GET, REG + BLOB_PATH, status=302, headers={"Location": hops[0]})
    for here, there in zip(hops, hops[1:], strict=False):
        rsps.add(responses.GET, here, status=307, headers={"Location": there})
    rsps.add(responses.GET, hops[-1], body=BLOB)
    with client.open_blob("library/alpine", BLOB_DIGEST) as blob:
        assert b"".join(blob.iter_chunks()) == BLOB


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://cdn.example/blob"])
def test_non_http_redirect_is_refused(rsps, client, location):
    rsps.add(responses.GET, REG + BLOB_PATH, status=302, headers={"Location": location})
    with pytest.raises(UpstreamUnavailable, match="non-http"):
        client.open_blob("library/alpine", BLOB_DIGEST)
    assert len(rsps.calls) == 1


def test_redirect_without_location_is_unavailable(rsps, client):
    rsps.add(responses.GET, REG + BLOB_PATH, status=302)
    with pytest.raises(UpstreamUnavailable, match="Location"):
        client.open_blob("library/alpine", BLOB_DIGEST)


def test_storage_refusal_after_redirect_is_unavailable_not_not_found(rsps, client):
    cdn = "https://cdn.example/blob"
    rsps.add(responses.GET, REG + BLOB_PATH, status=307, headers={"Location": cdn})
    rsps.add(responses.GET, cdn, status=403)
    with pytest.raises(UpstreamUnavailable) as info:
        client.open_blob("library/alpine", BLOB_DIGEST)
    assert info.value.status == 403


def test_blob_not_found(rsps, client):
    rsps.add(responses.GET, REG + BLOB_PATH, status=404)
    with pytest.raises(UpstreamNotFound):
        client.open_blob("library/alpine", BLOB_DIGEST)


@pytest.mark.parametrize(
    ("byte_range", "header", "content_range", "size"),
    [
        ((10, 19), "bytes=10-19", "bytes 10-19/1100", 1100),
        ((10, None), "bytes=10-", "bytes 10-1099/1100", 1100),
        ((0, 0), "bytes=0-0", "bytes 0-0/*", None),
    ],
)
def test_range_request(rsps, client, byte_range, header, content_range, size):
    rsps.add(
        responses.GET,
        REG + BLOB_PATH,
        status=206,
        body=b"part",
        headers={"Content-Range": content_range},
    )
    with client.open_blob("library/alpine", BLOB_DIGEST, byte_range=byte_range) as blob:
        assert (blob.status, blob.size) == (206, size)
        assert blob.headers["Content-Range"] == content_range
    assert rsps.calls[0].request.headers["Range"] == header


def test_range_ignored_by_upstream_gives_full_body(rsps, client):
    rsps.add(responses.GET, REG + BLOB_PATH, body=BLOB, headers={"Content-Length": str(len(BLOB))})
    with client.open_blob("library/alpine", BLOB_DIGEST, byte_range=(10, 19)) as blob:
        assert (blob.status, blob.size) == (200, len(BLOB))


@pytest.mark.parametrize("content_range", ["bytes 0-9/1100", "", "bytes */1100"])
def test_wrong_or_missing_content_range_is_unavailable(rsps, client, content_range):
    rsps.add(
        responses.GET,
        REG + BLOB_PATH,
        status=206,
        body=b"part",
        headers={"Content-Range": content_range},
    )
    with pytest.raises(UpstreamUnavailable):
        client.open_blob("library/alpine", BLOB_DIGEST, byte_range=(10, 19))


def test_206_without_a_range_request_is_unavailable(rsps, client):
    rsps.add(responses.GET, REG + BLOB_PATH, status=206, headers={"Content-Range": "bytes 0-1/2"})
    with pytest.raises(UpstreamUnavailable):
        client.open_blob("library/alpine", BLOB_DIGEST)


@pytest.mark.parametrize("byte_range", [(-1, None), (5, 4)])
def test_invalid_range_is_rejected(rsps, client, byte_range):
    with pytest.raises(ValueError):
        client.open_blob("library/alpine", BLOB_DIGEST, byte_range=byte_range)
    assert len(rsps.calls) == 0


def test_head_blob(rsps, client):
    rsps.add(
        responses.HEAD,
        REG + BLOB_PATH,
        headers={
            "Content-Length": str(len(BLOB)),
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": BLOB_DIGEST,
        },
    )
    assert client.head_blob("library/alpine", BLOB_DIGEST) == BlobRef(
        len(BLOB), "application/octet-stream"
    )
    assert [c.request.method for c in rsps.calls] == ["HEAD"]


def test_head_blob_follows_redirect_with_head(rsps, client):
    cdn = "https://cdn.example/blob"
    rsps.add(responses.HEAD, REG + BLOB_PATH, status=307, headers={"Location": cdn})
    rsps.add(responses.HEAD, cdn, content_type=None, headers={"Content-Length": "42"})
    assert client.head_blob("library/alpine", BLOB_DIGEST) == BlobRef(42, None)
    assert [c.request.method for c in rsps.calls] == ["HEAD", "HEAD"]


def test_head_blob_without_length_is_unavailable(rsps, client):
    rsps.add(responses.HEAD, REG + BLOB_PATH)
    with pytest.raises(UpstreamUnavailable, match="Content-Length"):
        client.head_blob("library/alpine", BLOB_DIGEST)


def test_head_blob_with_other_digest_is_bad_digest(rsps, client):
    rsps.add(
        responses.HEAD,
        REG + BLOB_PATH,
        headers={"Content-Length": "1", "Docker-Content-Digest": sha256(b"x")},
    )
    with pytest.raises(UpstreamBadDigest):
        client.head_blob("library/alpine", BLOB_DIGEST)


def test_head_blob_not_found(rsps, client):
    rsps.add(responses.HEAD, REG + BLOB_PATH, status=404)
    with pytest.raises(UpstreamNotFound):
        client.head_blob("library/alpine", BLOB_DIGEST)


# -- client hygiene ------------------------------------------------------------------------


def test_credentials_repr_hides_password():
    assert "alice-secret" not in repr(ALICE)
    assert "alice-secret" not in str(ALICE)
    assert "alice" in repr(ALICE)


def test_cookies_are_not_carried_between_requests(rsps, client):
    rsps.add(responses.GET, REG + BLOB_PATH, body=b"", headers={"Set-Cookie": "sid=alice; Path=/"})
    client.open_blob("library/alpine", BLOB_DIGEST).close()
    client.open_blob("library/alpine", BLOB_DIGEST).close()
    assert "Cookie" not in rsps.calls[1].request.headers


@pytest.mark.parametrize(
    "url", ["ftp://registry.example", "https://user:pw@registry.example", "https://r.example/?x"]
)
def test_bad_base_url_is_rejected(url):
    with pytest.raises(ValueError) as info:
        UpstreamClient(url)
    assert "pw" not in str(info.value)


def test_custom_user_agent_and_timeouts(rsps, monkeypatch):
    client = UpstreamClient(REG, connect_timeout=1.5, read_timeout=7, user_agent="ua/1")
    seen = {}
    original = requests.Session.request

    def spy(self, *args, **kwargs):
        seen["timeout"] = kwargs["timeout"]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", spy)
    rsps.add(responses.HEAD, REG + BLOB_PATH, headers={"Content-Length": "1"})
    client.head_blob("library/alpine", BLOB_DIGEST)
    assert seen["timeout"] == (1.5, 7)
    assert rsps.calls[0].request.headers["User-Agent"] == "ua/1"


# -- routing -------------------------------------------------------------------------------


@pytest.fixture
def upstreams():
    reg = UpstreamRegistry(
        "https://registry-1.docker.io",
        {"ghcr.io": "https://ghcr.io", "REG.example:5000": "http://reg.example:5000"},
    )
    yield reg
    reg.close()


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("alpine", "library/alpine"),
        ("foo.bar", "library/foo.bar"),
        ("bitnami/redis", "bitnami/redis"),
        ("a/b/c", "a/b/c"),
        ("docker.io/alpine", "library/alpine"),
        ("docker.io/library/alpine", "library/alpine"),
        ("index.docker.io/bitnami/redis", "bitnami/redis"),
        ("registry-1.docker.io/alpine", "library/alpine"),
    ],
)
def test_resolve_default_docker_hub(upstreams, image, name):
    client, resolved = upstreams.resolve(image)
    assert client is upstreams.default
    assert upstreams.registry_of(client) == "registry-1.docker.io"
    assert resolved == name


def test_resolve_extra_hosts(upstreams):
    client, name = upstreams.resolve("ghcr.io/owner/image")
    assert (client.base_url, name) == ("https://ghcr.io", "owner/image")
    assert upstreams.registry_of(client) == "ghcr.io"
    client, name = upstreams.resolve("ghcr.io/single")
    assert (client.base_url, name) == ("https://ghcr.io", "single")
    client, name = upstreams.resolve("reg.example:5000/team/app")
    assert (client.base_url, name) == ("http://reg.example:5000", "team/app")


@pytest.mark.parametrize(
    "image",
    [
        "quay.io/org/image",
        "localhost/image",
        "localhost:5000/image",
        "registry:5000/image",
        "evil.example/library/alpine",
        "GHCR.io/owner/image",
    ],
)
def test_resolve_refuses_unconfigured_hosts(upstreams, image):
    with pytest.raises(UpstreamRefused, match="not configured"):
        upstreams.resolve(image)


@pytest.mark.parametrize(
    "image",
    [
        "..",
        "a/../b",
        "ghcr.io/../x",
        "ghcr.io/",
        "a//b",
        "/a",
        "a/",
        "",
        "Alpine",
        "a/b?x=1",
        "a/b#x",
        "a/%2e%2e/b",
        "a b",
        "a/.hidden",
        "ghcr.io/owner/Image",
    ],
)
def test_resolve_refuses_unsafe_names(upstreams, image):
    with pytest.raises(UpstreamRefused):
        upstreams.resolve(image)


def test_resolve_non_docker_hub_default():
    reg = UpstreamRegistry("https://mirror.example:8443")
    try:
        client, name = reg.resolve("alpine")
        assert (client, name) == (reg.default, "alpine")
        assert reg.resolve("mirror.example:8443/team/app") == (reg.default, "team/app")
        with pytest.raises(UpstreamRefused):
            reg.resolve("docker.io/library/alpine")
    finally:
        reg.close()


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("alpine", "library/alpine"),
        ("bitnami/redis", "bitnami/redis"),
        ("mirror.internal:5000/alpine", "library/alpine"),
        # Docker Hub's names mean the mirror's copy of Docker Hub's image.
        ("docker.io/alpine", "library/alpine"),
        ("docker.io/library/alpine", "library/alpine"),
        ("index.docker.io/bitnami/redis", "bitnami/redis"),
    ],
)
def test_resolve_default_docker_hub_mirror(image, name):
    reg = UpstreamRegistry(
        "https://mirror.internal:5000", docker_hub_mirrors=["Mirror.Internal:5000"]
    )
    try:
        assert reg.resolve(image) == (reg.default, name)
        assert reg.registry_of(reg.default) == "mirror.internal:5000"
        assert reg.registry_host("docker.io") == "mirror.internal:5000"
    finally:
        reg.close()


def test_resolve_extra_docker_hub_mirror_and_docker_hub():
    reg = UpstreamRegistry(
        "https://r.example",
        {
            "mirror.gcr.io": "https://mirror.gcr.io",
            "hub.example": "https://registry-1.docker.io",
            "ghcr.io": "https://ghcr.io",
        },
        docker_hub_mirrors=["mirror.gcr.io"],
    )
    try:
        client, name = reg.resolve("mirror.gcr.io/alpine")
        assert (reg.registry_of(client), name) == ("mirror.gcr.io", "library/alpine")
        # Docker Hub itself, configured as an extra upstream, needs no mark.
        client, name = reg.resolve("hub.example/alpine")
        assert (reg.registry_of(client), name) == ("hub.example", "library/alpine")
        client, name = reg.resolve("ghcr.io/single")
        assert (reg.registry_of(client), name) == ("ghcr.io", "single")
        # The default upstream is not a mirror: its names are not prefixed, and Docker Hub's
        # names go nowhere.
        assert reg.resolve("alpine") == (reg.default, "alpine")
        with pytest.raises(UpstreamRefused, match="not configured"):
            reg.resolve("docker.io/library/alpine")
    finally:
        reg.close()


def test_registry_passes_client_options():
    reg = UpstreamRegistry(
        "https://r.example",
        {"ghcr.io": "https://ghcr.io"},
        connect_timeout=1,
        read_timeout=2,
        user_agent="ua/2",
    )
    try:
        for image in ("x", "ghcr.io/x/y"):
            client, _ = reg.resolve(image)
            assert client.transport._timeout == (1, 2)
            assert client.transport._session.headers["User-Agent"] == "ua/2"
    finally:
        reg.close()
