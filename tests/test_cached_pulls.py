"""What cached pulls keep in memory, and how soon a change made elsewhere reaches them.

A real server process with `depproxy.lookup_cache_seconds` of 2: groups, accounts, memberships
and tokens a request looked up are reused for at most that long, so a change made by the admin
command or in the database is refused within it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest
import requests
from sqlalchemy import delete, select, update

from depproxy_pyramid.credentials import hash_password
from depproxy_pyramid.models import CachedBlob, CachedManifest, Group, Membership, Role, User
from depproxy_pyramid.services.read_times import FLUSH_SECONDS
from tests.conftest import JWT_SECRET
from tests.proxy import PROXY_MARKER, PULLER, Proxy, running_proxy, start_proxy
from tests.server import admin
from tests.support.registry import skopeo_pull

LOOKUP_SECONDS = 2
# Past the lookup cache time, with room for a loaded machine.
WAIT = LOOKUP_SECONDS + 1.5
IMAGE, TAG = "library/alpine", "latest"


@pytest.fixture(scope="module")
def proxy(upstream_registry, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cached-pulls")
    proxy = start_proxy(
        workdir,
        f"sqlite:///{workdir / 'proxy.sqlite'}",
        upstream_registry.url,
        **{"depproxy.lookup_cache_seconds": str(LOOKUP_SECONDS)},
    )
    yield proxy
    proxy.server.stop()


def _group(proxy: Proxy, request) -> str:
    return proxy.new_group(f"c-{request.node.name.lower().replace('_', '-')[:50]}")


def _user(proxy: Proxy, name: str, group: str) -> tuple[str, str]:
    """A user of its own, a developer of `group`: tests that disable one disable only it."""
    credentials = (name, f"{name}-password")
    manager, session = proxy.db.session()
    with manager:
        user = User(username=name, password_hash=hash_password(credentials[1]))
        session.add(user)
        group_row = session.scalar(select(Group).where(Group.path == group))
        session.add(Membership(group=group_row, user=user, role=Role.DEVELOPER))
    return credentials


def _url(proxy: Proxy, group: str, kind: str, reference: str) -> str:
    return f"{proxy.url}/v2/{group}/{PROXY_MARKER}/{IMAGE}/{kind}/{reference}"


def _get(url: str, token: str) -> requests.Response:
    return requests.get(
        url,
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.oci.image.manifest.v1+json",
        },
        timeout=30,
    )


def _cached_digest(proxy: Proxy, group: str, token: str) -> str:
    """Cache the tag's manifest and answer its digest."""
    answer = _get(_url(proxy, group, "manifests", TAG), token)
    assert answer.status_code == 200, answer.text
    return answer.headers["Docker-Content-Digest"]


def _error(answer: requests.Response) -> tuple[int, str, str]:
    error = answer.json()["errors"][0]
    return answer.status_code, error["code"], error["message"]


def test_a_manifest_by_digest_is_served_from_memory_byte_for_byte(proxy, upstream, request):
    group = _group(proxy, request)
    token = proxy.token(group, IMAGE)
    digest = _cached_digest(proxy, group, token)
    url = _url(proxy, group, "manifests", digest)
    first = _get(url, token)
    assert first.status_code == 200
    expected = upstream.manifest(IMAGE, digest)
    assert first.content == expected.content

    # With the stored file gone, only the copy in memory can answer.
    stored = proxy.storage / "manifests" / "sha256" / digest[7:]
    stored.unlink()
    fetches = upstream.relay.count(method="GET", kind="manifest")
    for _ in range(3):
        again = _get(url, token)
        assert again.status_code == 200
        assert again.content == expected.content
        assert again.headers["Docker-Content-Digest"] == digest
        assert again.headers["Content-Type"] == expected.headers["Content-Type"]
        assert again.headers["Content-Length"] == str(len(expected.content))
    assert upstream.relay.count(method="GET", kind="manifest") == fetches


def test_a_removed_member_is_refused_within_the_lookup_cache_time(proxy, request):
    group = _group(proxy, request)
    credentials = _user(proxy, "leaver", group)
    token = proxy.token(group, IMAGE, credentials)
    digest = _cached_digest(proxy, group, token)

    manager, session = proxy.db.session()
    with manager:
        user_id = session.scalar(select(User.id).where(User.username == "leaver"))
        session.execute(delete(Membership).where(Membership.user_id == user_id))
    url = _url(proxy, group, "manifests", digest)
    # The group is private: to a non-member it does not exist.
    unknown = (404, "NAME_UNKNOWN", "repository name not known to registry")

    # A new pull signs in again, which forgets what was remembered of the account at once.
    assert _error(_get(url, proxy.token(group, IMAGE, credentials))) == unknown
    time.sleep(WAIT)
    assert _error(_get(url, token)) == unknown


def test_a_disabled_account_is_refused_within_the_lookup_cache_time(proxy, request):
    group = _group(proxy, request)
    credentials = _user(proxy, "disabled", group)
    token = proxy.token(group, IMAGE, credentials)
    digest = _cached_digest(proxy, group, token)

    manager, session = proxy.db.session()
    with manager:
        session.execute(update(User).where(User.username == "disabled").values(is_active=False))
    time.sleep(WAIT)

    answer = _get(_url(proxy, group, "manifests", digest), token)
    assert _error(answer) == (401, "UNAUTHORIZED", "invalid or expired credentials")


def test_a_disabled_group_is_refused_within_the_lookup_cache_time(proxy, request):
    group = _group(proxy, request)
    token = proxy.token(group, IMAGE)
    digest = _cached_digest(proxy, group, token)
    layer = _get(_url(proxy, group, "manifests", digest), token).json()["layers"][0]["digest"]
    assert _get(_url(proxy, group, "blobs", layer), token).status_code == 200

    result = admin(proxy.ini, "proxy", "disable", group)
    assert result.returncode == 0, result.stderr
    time.sleep(WAIT)

    for kind, reference in (("manifests", digest), ("blobs", layer)):
        answer = _get(_url(proxy, group, kind, reference), token)
        assert _error(answer) == (
            403,
            "DENIED",
            f"the dependency proxy is disabled for group {group!r}",
        )


def test_an_expired_token_is_refused_though_it_was_verified_before(proxy, request):
    group = _group(proxy, request)
    digest = _cached_digest(proxy, group, proxy.token(group, IMAGE))
    manager, session = proxy.db.session()
    with manager:
        puller_id = session.scalar(select(User.id).where(User.username == PULLER[0]))
    now = int(time.time())
    name = f"{group}/{PROXY_MARKER}/{IMAGE}"
    short_lived = jwt.encode(
        {
            "iss": "depproxy-pyramid",
            "aud": "dependency_proxy",
            "sub": f"account:{puller_id}",
            "name": PULLER[0],
            "iat": now,
            "nbf": now,
            "exp": now + 2,
            "access": [{"type": "repository", "name": name, "actions": ["pull"]}],
        },
        JWT_SECRET,
        algorithm="HS256",
    )
    url = _url(proxy, group, "manifests", digest)
    assert _get(url, short_lived).status_code == 200
    # Past its expiry and the 5 seconds of clock skew tokens are allowed.
    time.sleep(max(0.0, now + 2 + 5 + 0.5 - time.time()))

    answer = _get(url, short_lived)
    assert _error(answer) == (401, "UNAUTHORIZED", "invalid or expired credentials")


def _age_read_at(proxy: Proxy, group: str) -> datetime:
    long_ago = datetime.now(UTC) - timedelta(days=2)
    group_id = proxy.group_id(group)
    manager, session = proxy.db.session()
    with manager:
        for model in (CachedManifest, CachedBlob):
            session.execute(
                update(model).where(model.group_id == group_id).values(read_at=long_ago)
            )
    return long_ago


def _read_ats(proxy: Proxy, group: str, digests: list[str]) -> list[datetime]:
    group_id = proxy.group_id(group)
    manager, session = proxy.db.session()
    with manager:
        return [
            session.scalar(
                select(model.read_at).where(model.group_id == group_id, model.digest == digest)
            )
            for model, digest in zip((CachedManifest, CachedBlob), digests, strict=True)
        ]


def test_read_at_is_written_in_batches_and_at_shutdown(upstream, tmp_path, empty_database_url):
    with running_proxy(tmp_path, empty_database_url, upstream.url) as proxy:
        group = proxy.new_group("reads")
        skopeo_pull(proxy.ref(group, f"{IMAGE}:{TAG}"), tmp_path / "pulled", creds=PULLER)
        token = proxy.token(group, IMAGE)
        digest = _cached_digest(proxy, group, token)
        layer = _get(_url(proxy, group, "manifests", digest), token).json()["layers"][0]["digest"]
        urls = [_url(proxy, group, "manifests", digest), _url(proxy, group, "blobs", layer)]

        # A fresh process, which has written no read_at yet, stopped right after two hits.
        proxy.server.stop()
        long_ago = _age_read_at(proxy, group)
        proxy.server.start()
        started = datetime.now(UTC)
        for url in urls:
            assert _get(url, token).status_code == 200
        proxy.server.stop()
        for read_at in _read_ats(proxy, group, [digest, layer]):
            assert read_at >= started - timedelta(seconds=1)

        # While it runs: written with a later hit, once the flush interval is over.
        long_ago = _age_read_at(proxy, group)
        proxy.server.start()
        started = datetime.now(UTC)
        for url in urls:
            assert _get(url, token).status_code == 200
        time.sleep(FLUSH_SECONDS + 0.5)
        assert _get(urls[0], token).status_code == 200
        deadline = time.monotonic() + 5
        while long_ago in _read_ats(proxy, group, [digest, layer]):
            assert time.monotonic() < deadline, "read_at was not written while serving"
            time.sleep(0.1)
        for read_at in _read_ats(proxy, group, [digest, layer]):
            assert read_at >= started - timedelta(seconds=1)
