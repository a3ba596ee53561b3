"""A hung upstream never delays what the cache holds: a real server process on the runner's
defaults, in front of the real registry behind a relay that stops answering."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from depproxy_pyramid.upstream.gate import BUSY_RETRY_AFTER, COOLDOWN_SECONDS, FAILURES_TO_OPEN
from tests.proxy import PROXY_MARKER, PULLER, Proxy, running_proxy
from tests.server import wait_for
from tests.support.oci import Image
from tests.support.registry import MANIFEST_ACCEPT, skopeo_pull
from tests.support.relay import Fault

SERVER_THREADS = 256  # the runner's default
MAX_IN_FLIGHT = 32
READ_TIMEOUT = 5
UNCACHED = 64
# A cached pull answers within this, whatever upstream does.
CACHED_WITHIN = 1.0
BUSY = "the proxy is waiting on too many upstream requests; retry later"


def assert_server_threads(proxy: Proxy, threads: int) -> None:
    """The runner's default thread count is what this test relies on."""
    assert "threads" not in proxy.ini.read_text()
    # Waitress starts every worker up front: the process has them all, waiting.
    tasks = Path(f"/proc/{proxy.server.process.pid}/task")
    assert len(list(tasks.iterdir())) > threads


def metric(proxy: Proxy, name: str) -> float:
    text = requests.get(f"{proxy.url}/-/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match is not None, f"{name} not exported"
    return float(match.group(1))


def circuit_state(proxy: Proxy, registry: str) -> float:
    return metric(proxy, f'depproxy_upstream_circuit_state{{registry="{registry}"}}')


def error_of(answer: requests.Response) -> tuple[int, str, str]:
    assert answer.headers["Content-Type"] == "application/json", answer.text
    error = answer.json()["errors"][0]
    return answer.status_code, error["code"], error["message"]


class Client:
    """Registry requests to one group's image with one token, timed."""

    def __init__(self, proxy: Proxy, group: str, image: str) -> None:
        self.base = f"{proxy.url}/v2/{group}/{PROXY_MARKER}/{image}"
        self.headers = {
            "Authorization": f"Bearer {proxy.token(group, image)}",
            "Accept": MANIFEST_ACCEPT,
        }

    def get(self, kind: str, reference: str, **kw) -> tuple[requests.Response, float]:
        started = time.monotonic()
        answer = requests.get(
            f"{self.base}/{kind}/{reference}",
            headers={**self.headers, **kw.pop("headers", {})},
            timeout=60,
            **kw,
        )
        return answer, time.monotonic() - started


@pytest.fixture
def proxy(upstream, tmp_path) -> Iterator[Proxy]:
    with running_proxy(
        tmp_path,
        f"sqlite:///{tmp_path / 'proxy.sqlite'}",
        upstream.url,
        **{
            "depproxy.upstream.read_timeout": str(READ_TIMEOUT),
            # Below the 64 uncached requests, so that some of them find the budget spent.
            "depproxy.upstream.max_in_flight": str(MAX_IN_FLIGHT),
        },
    ) as proxy:
        assert_server_threads(proxy, SERVER_THREADS)
        yield proxy


def test_a_hung_upstream_never_delays_cached_pulls(proxy, upstream, tmp_path):
    group = proxy.new_group("hung-upstream")
    client = Client(proxy, group, "library/alpine")
    warm, _ = client.get("manifests", "latest")
    assert warm.status_code == 200
    digest = warm.headers["Docker-Content-Digest"]
    source = upstream.images["library/alpine:latest"].source
    assert isinstance(source, Image)
    layer = source.layers[0].digest
    blob, _ = client.get("blobs", layer)
    assert blob.status_code == 200
    assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == layer
    cached = [
        ("blobs", layer, blob.content),
        ("manifests", digest, warm.content),
        ("manifests", "latest", warm.content),  # a tag: revalidated, or served stale
    ]
    timings: dict[str, list[float]] = {}

    def cached_pulls_answer_at_once(when: str) -> None:
        for kind, reference, content in cached:
            answer, elapsed = client.get(kind, reference)
            assert answer.status_code == 200, (when, reference, answer.text)
            assert answer.content == content
            assert elapsed < CACHED_WITHIN, (when, reference, elapsed)
            timings.setdefault(when, []).append(round(elapsed, 3))

    upstream.relay.set_mode(Fault.HANG)
    upstream.relay.reset_counts()

    def uncached(i: int) -> tuple[requests.Response, float]:
        if i % 2:
            return client.get("manifests", f"uncached-{i}")
        return client.get("blobs", "sha256:" + hashlib.sha256(b"uncached-%d" % i).hexdigest())

    with ThreadPoolExecutor(UNCACHED) as pool:
        pending = [pool.submit(uncached, i) for i in range(UNCACHED)]
        # Every slot is held by a request the relay holds; the others were refused.
        wait_for(lambda: upstream.relay.count() == MAX_IN_FLIGHT, timeout=READ_TIMEOUT - 1)
        assert metric(proxy, "depproxy_upstream_in_flight") == MAX_IN_FLIGHT
        cached_pulls_answer_at_once("every slot waiting on the hung upstream")
        results = [future.result() for future in pending]

    outcomes = Counter(error_of(answer) for answer, _ in results)
    assert outcomes == {
        (504, "UNAVAILABLE", "the upstream registry is unavailable: upstream timed out"): (
            MAX_IN_FLIGHT
        ),
        (503, "UNAVAILABLE", BUSY): UNCACHED - MAX_IN_FLIGHT,
    }
    for answer, elapsed in results:
        if answer.status_code == 503:
            assert answer.headers["Retry-After"] == str(BUSY_RETRY_AFTER)
            assert elapsed < READ_TIMEOUT - 1  # refused, not left waiting on upstream
        else:
            assert READ_TIMEOUT <= elapsed < READ_TIMEOUT + 5
    assert upstream.relay.count() == MAX_IN_FLIGHT

    # The timeouts opened the breaker: nothing more is sent upstream, cached pulls go on.
    assert circuit_state(proxy, upstream.relay.host) == 2
    assert metric(proxy, "depproxy_upstream_in_flight") == 0
    cached_pulls_answer_at_once("breaker open")
    retry_after = 0
    for kind, reference in [("manifests", "still-uncached"), ("blobs", "sha256:" + "e" * 64)]:
        answer, elapsed = client.get(kind, reference)
        status, code, message = error_of(answer)
        assert (status, code) == (503, "UNAVAILABLE")
        assert message.startswith(
            f"the upstream registry is unavailable: it failed {FAILURES_TO_OPEN} times in a row"
        )
        retry_after = int(answer.headers["Retry-After"])
        assert 1 <= retry_after <= COOLDOWN_SECONDS
        assert elapsed < CACHED_WITHIN
    assert upstream.relay.count() == MAX_IN_FLIGHT

    # Upstream answers again; after the cooldown the first pull is the probe, and it succeeds.
    upstream.relay.set_mode(Fault.NORMAL)
    time.sleep(retry_after + 0.2)
    skopeo_pull(proxy.ref(group, "schema2/app:1.0"), tmp_path / "after", creds=PULLER)
    assert circuit_state(proxy, upstream.relay.host) == 0
    log = proxy.server.log_path.read_text()
    assert log.count(f"upstream {upstream.relay.host} failed") == 1
    assert log.count(f"upstream {upstream.relay.host} answers again") == 1
    print("cached pull latencies (s):", timings)


def image_of(upstream, ref: str) -> Image:
    source = upstream.images[ref].source
    assert isinstance(source, Image)
    return source


def test_a_blob_transfer_gives_its_slot_back_however_its_body_ends(upstream, tmp_path):
    with running_proxy(
        tmp_path,
        f"sqlite:///{tmp_path / 'proxy.sqlite'}",
        upstream.url,
        **{"depproxy.upstream.max_in_flight": "2"},
    ) as proxy:
        group = proxy.new_group("slots")
        big = Client(proxy, group, "big/image")
        alpine = Client(proxy, group, "library/alpine")
        schema2 = Client(proxy, group, "schema2/app")
        big_layer = image_of(upstream, "big/image:1.0").layers[0].digest
        slots_free = lambda: metric(proxy, "depproxy_upstream_in_flight") == 0  # noqa: E731

        # Clients disconnect after the first chunk of a transfer that stays in flight (upstream
        # stalls half way), more times than the budget has slots.
        upstream.relay.set_mode(Fault.STALL_BLOBS)
        for _ in range(3):
            answer = requests.get(
                f"{big.base}/blobs/{big_layer}", headers=big.headers, stream=True, timeout=60
            )
            assert answer.status_code == 200
            assert next(answer.iter_content(1024 * 1024))
            answer.close()
            wait_for(slots_free)
        upstream.relay.set_mode(Fault.NORMAL)
        wait_for(lambda: not proxy.spool_files())

        # The transfer fails mid-body: the client's connection is cut short.
        upstream.relay.set_mode(Fault.TRUNCATE_BLOBS)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            big.get("blobs", big_layer)
        upstream.relay.set_mode(Fault.NORMAL)
        wait_for(slots_free)

        # Refused before a body: an unsatisfiable range of a blob that was not cached.
        answer, _ = alpine.get(
            "blobs",
            image_of(upstream, "library/alpine:3.20").layers[0].digest,
            headers={"Range": "bytes=100000000-"},
        )
        assert error_of(answer)[:2] == (416, "SIZE_INVALID")
        wait_for(slots_free)

        # Read to the end.
        layer = image_of(upstream, "schema2/app:1.0").layers[0].digest
        answer, _ = schema2.get("blobs", layer)
        assert answer.status_code == 200
        assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == layer
        wait_for(slots_free)

        # The whole budget is there: two transfers at once both go through.
        configs = [
            (alpine, image_of(upstream, "library/alpine:latest").config.digest),
            (schema2, image_of(upstream, "schema2/app:1.0").config.digest),
        ]
        start = threading.Barrier(2)

        def fetch(client: Client, digest: str) -> int:
            start.wait()
            return client.get("blobs", digest)[0].status_code

        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(fetch, *zip(*configs, strict=True))) == [200, 200]
        wait_for(slots_free)


def test_a_fleet_pulling_one_cold_image_at_once_is_served_by_one_upstream_transfer(
    upstream, tmp_path
):
    """Every client of a blob being filled waits on upstream and holds a slot of the budget:
    the default budget takes a CI fleet's cold pull of one image without refusing anyone."""
    fleet = 120
    with running_proxy(tmp_path, f"sqlite:///{tmp_path / 'proxy.sqlite'}", upstream.url) as proxy:
        group = proxy.new_group("fleet")
        client = Client(proxy, group, "big/image")
        source = upstream.images["big/image:1.0"].source
        assert isinstance(source, Image)
        layer = source.layers[0]
        upstream.relay.reset_counts()

        def pull(i: int) -> tuple[int, str, str]:
            manifest, _ = client.get("manifests", "1.0")
            sha256 = hashlib.sha256()
            with requests.get(
                f"{client.base}/blobs/{layer.digest}",
                headers=client.headers,
                stream=True,
                timeout=120,
            ) as blob:
                for chunk in blob.iter_content(1024 * 1024):
                    sha256.update(chunk)
            return manifest.status_code, blob.status_code, "sha256:" + sha256.hexdigest()

        with ThreadPoolExecutor(max_workers=fleet) as pool:
            outcomes = Counter(pool.map(pull, range(fleet)))
    assert outcomes == Counter({(200, 200, layer.digest): fleet})
    # The manifest once: a new process's first GET is answered with the token challenge, and
    # the second carries the token (the blob GET then has it already).
    assert upstream.relay.count(method="GET", kind="manifest") == 2
    assert upstream.relay.blob_fetches() == Counter({layer.digest: 1})
