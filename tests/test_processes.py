"""Two real server processes on one PostgreSQL database and one storage directory, in front of
the real token-auth upstream: concurrent misses on both fetch a blob and a tag's manifest from
upstream once, and when the process fetching a blob is killed, the other takes over.

(tests/test_fleet.py runs three behind nginx on S3; this is the smallest fleet, on the
filesystem strategy, that shows the leases at work.)
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import select

from depproxy_pyramid.models import Lease
from tests.conftest import app_settings
from tests.proxy import PROXY_MARKER, Proxy, start_proxy
from tests.server import ServerProcess, free_port, wait_for, write_ini
from tests.support.registry import MANIFEST_ACCEPT
from tests.support.relay import Fault

IMAGE = "big/image"


@pytest.fixture
def pair(upstream, postgres_database, tmp_path) -> Iterator[tuple[Proxy, Proxy]]:
    url = postgres_database()
    first = start_proxy(tmp_path / "first", url, upstream.url)
    settings = app_settings(
        url,
        first.storage,
        **{"depproxy.upstream.url": upstream.url, "depproxy.external_url": ""},
    )
    port = free_port()
    ini = write_ini(tmp_path / "second.ini", settings, port)
    server = ServerProcess(ini, port, tmp_path / "second.log").start()
    second = Proxy(server, ini, first.db, first.storage)
    try:
        yield first, second
    finally:
        first.server.stop()
        second.server.stop()
        first.db.engine.dispose()


def get(proxy: Proxy, group: str, kind: str, reference: str, token: str) -> requests.Response:
    return requests.get(
        f"{proxy.url}/v2/{group}/{PROXY_MARKER}/{IMAGE}/{kind}/{reference}",
        headers={"Authorization": f"Bearer {token}", "Accept": MANIFEST_ACCEPT},
        timeout=120,
    )


def fetch(proxy: Proxy, group: str, digest: str, token: str) -> requests.Response | None:
    """The blob's response, read whole; None when the connection broke off."""
    try:
        return get(proxy, group, "blobs", digest, token)
    except requests.exceptions.RequestException:
        return None


def blob_gets(upstream) -> int:
    """Blob GETs upstream answered with content: those that carried a token (one without only
    fetches the challenge)."""
    wanted = ("GET", "blob", True)
    return sum(1 for r in upstream.relay.requests if (r.method, r.kind, r.authorized) == wanted)


def lease_owner_pid(proxy: Proxy, key: str) -> int | None:
    manager, session = proxy.db.session()
    with manager:
        owner = session.scalar(select(Lease.owner).where(Lease.key == key))
    return None if owner is None else int(owner.split(":")[1])


def test_concurrent_misses_on_two_processes_fetch_once(pair, upstream):
    first, second = pair
    group = first.new_group("fleet")
    token = first.token(group, IMAGE)
    manifest = upstream.manifest(IMAGE, "1.0")
    layer = manifest.json()["layers"][0]["digest"]
    upstream.relay.reset_counts()
    # Upstream answers after a second: every request below misses while the first is running.
    with upstream.relay.fault(Fault.SLOW), ThreadPoolExecutor(8) as pool:
        manifests = list(
            pool.map(lambda p: get(p, group, "manifests", "1.0", token), [first, second] * 4)
        )
        blobs = list(pool.map(lambda p: get(p, group, "blobs", layer, token), [first, second] * 4))
    assert {answer.status_code for answer in manifests + blobs} == {200}
    assert {answer.content for answer in manifests} == {manifest.content}
    for answer in blobs:
        assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == layer
    # One GET with a token (the first, without, only fetched the challenge).
    fetched = [r for r in upstream.relay.requests if r.kind == "manifest" and r.authorized]
    assert [r.method for r in fetched] == ["GET"]
    assert blob_gets(upstream) == 1
    assert first.stored_blob_files(group) == [first.storage / "blobs" / "sha256" / layer[7:]]


def test_a_killed_fetch_is_taken_over_by_the_other_process(pair, upstream):
    first, second = pair
    group = first.new_group("takeover")
    token = first.token(group, IMAGE)
    layer = upstream.manifest(IMAGE, "1.0").json()["layers"][0]["digest"]
    processes = {first.server.process.pid: first, second.server.process.pid: second}
    upstream.relay.reset_counts()
    with ThreadPoolExecutor(2) as pool:
        # Half the layer, then upstream stalls: the owner is mid-fill when it is killed.
        upstream.relay.set_mode(Fault.STALL_BLOBS, {"blob"})
        answers = [pool.submit(fetch, proxy, group, layer, token) for proxy in processes.values()]
        wait_for(lambda: lease_owner_pid(first, f"blob:{layer}") is not None)
        owner = processes.pop(lease_owner_pid(first, f"blob:{layer}"))
        survivor = next(iter(processes.values()))
        wait_for(lambda: blob_gets(upstream) == 1)
        time.sleep(0.5)  # half the layer on its way
        os.killpg(owner.server.process.pid, signal.SIGKILL)
        owner.server.process.wait()
        upstream.relay.set_mode(Fault.NORMAL)
        results = [answer.result() for answer in answers]

    served = [answer for answer in results if answer is not None and answer.status_code == 200]
    assert len(served) == 1  # the killed process's client lost its connection
    assert "sha256:" + hashlib.sha256(served[0].content).hexdigest() == layer
    assert blob_gets(upstream) == 2
    stored = first.storage / "blobs" / "sha256" / layer[7:]
    assert "sha256:" + hashlib.sha256(stored.read_bytes()).hexdigest() == layer
    assert lease_owner_pid(first, f"blob:{layer}") is None
    # The survivor serves it from the cache now.
    upstream.relay.reset_counts()
    again = get(survivor, group, "blobs", layer, token)
    assert "sha256:" + hashlib.sha256(again.content).hexdigest() == layer
    assert upstream.relay.count(method="GET", kind="blob") == 0
