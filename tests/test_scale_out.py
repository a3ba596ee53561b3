"""Several server processes of one node on one PostgreSQL database and one storage: real
`pserve` processes, their metrics added up through prometheus_client's multiprocess mode."""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from depproxy_pyramid.metrics import Metrics
from depproxy_pyramid.upstream.gate import FAILURES_TO_OPEN
from tests.conftest import JWT_SECRET, ROOT, Database, app_settings
from tests.proxy import Proxy, database_with_puller
from tests.server import BIN, ServerProcess, free_port, wait_for, write_ini
from tests.support.relay import Fault
from tests.support_s3 import MotoS3

IMAGE = "library/alpine"
REQUESTS = "depproxy_requests_total"
IN_FLIGHT = "depproxy_upstream_in_flight"
CIRCUIT = "depproxy_upstream_circuit_state"
# Longer than the test waits on hung requests: they end when the relay lets them go.
READ_TIMEOUT = 60


def metric(proxy: Proxy, name: str, **labels: str) -> float:
    """The value of one sample of `/-/metrics` as `proxy` answers it."""
    text = requests.get(f"{proxy.url}/-/metrics", timeout=10).text
    values = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return values[(name, frozenset(labels.items()))]


def manifest_errors(proxy: Proxy) -> float:
    return metric(proxy, REQUESTS, kind="manifest", result="error")


@pytest.fixture
def node_database(postgres_database) -> Iterator[Database]:
    """One migrated PostgreSQL database for every process of the node, with the puller."""
    db = database_with_puller(postgres_database())
    yield db
    db.engine.dispose()


@pytest.fixture
def start_process(tmp_path, node_database, upstream) -> Iterator:
    """Starts server processes sharing the database and the storage directory; stops them."""
    started: list[ServerProcess] = []

    def start(name: str, environment: dict[str, str] | None = None) -> Proxy:
        settings = app_settings(
            node_database.url,
            tmp_path / "storage",
            **{
                "depproxy.upstream.url": upstream.url,
                "depproxy.upstream.read_timeout": str(READ_TIMEOUT),
                "depproxy.external_url": "",
            },
        )
        port = free_port()
        ini = write_ini(tmp_path / f"{name}.ini", settings, port)
        server = ServerProcess(ini, port, tmp_path / f"{name}.log", environment=environment)
        started.append(server)
        server.start()
        return Proxy(server, ini, node_database, tmp_path / "storage")

    yield start
    for server in started:
        server.stop()


def test_every_process_reports_the_sum_of_the_node_and_a_stopped_one_leaves_the_live_gauges(
    tmp_path, start_process, upstream
):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    shared = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    first, second, third = (start_process(name, shared) for name in ("a", "b", "c"))
    node = (first, second, third)
    group = first.new_group("scale-out")

    # Counters: each process counts its own requests, each answers the node's sum.
    for proxy, count in ((first, 3), (second, 2), (third, 1)):
        for _ in range(count):
            assert proxy.get(group, IMAGE, "manifests", "no-such-tag").status_code == 404
    wait_for(lambda: manifest_errors(first) == 6)
    assert [manifest_errors(proxy) for proxy in node] == [6, 6, 6]

    # Breakers are per process; the node shows the worst state of any running process.
    upstream.relay.set_mode(Fault.DOWN)
    for _ in range(FAILURES_TO_OPEN):
        assert first.get(group, IMAGE, "manifests", "latest").status_code in (502, 503)
    upstream.relay.set_mode(Fault.NORMAL)
    assert [metric(proxy, CIRCUIT, registry=upstream.relay.host) for proxy in node] == [2, 2, 2]

    # Requests waiting on upstream: the node's slots in use are the sum over the processes.
    upstream.relay.set_mode(Fault.HANG)
    with ThreadPoolExecutor(3) as pool:
        hung = [
            pool.submit(proxy.get, group, IMAGE, "manifests", "latest")
            for proxy in (second, second, third)
        ]
        wait_for(lambda: metric(first, IN_FLIGHT) == 3)
        assert [metric(proxy, IN_FLIGHT) for proxy in node] == [3, 3, 3]

        # A process stopped while it waits on upstream holds no slot of the node any more; what
        # it counted still counts.
        third_pid = third.server.process.pid
        third.server.stop()
        assert third.server.process.returncode == 0
        assert not list(metrics_dir.glob(f"gauge_live*_{third_pid}.db"))
        assert metric(first, IN_FLIGHT) == 2
        assert manifest_errors(second) == 6 + FAILURES_TO_OPEN

        # And the breaker it opened is no longer the node's.
        first.server.stop()
        assert metric(second, CIRCUIT, registry=upstream.relay.host) == 0
        assert manifest_errors(second) == 6 + FAILURES_TO_OPEN

        upstream.relay.release_stalled()
        assert [future.result().status_code for future in hung[:2]] == [502, 502]
    wait_for(lambda: metric(second, IN_FLIGHT) == 0)
    assert manifest_errors(second) == 6 + FAILURES_TO_OPEN + 2


def test_without_a_shared_directory_each_process_reports_only_its_own(start_process):
    first, second = start_process("a"), start_process("b")
    group = first.new_group("apart")
    for proxy, count in ((first, 2), (second, 1)):
        for _ in range(count):
            assert proxy.get(group, IMAGE, "manifests", "no-such-tag").status_code == 404
    wait_for(lambda: manifest_errors(first) == 2)
    assert manifest_errors(second) == 1


def test_two_apps_in_one_process_count_apart_without_the_variable():
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    one, other = Metrics.for_app(), Metrics.for_app()
    one.requests.labels("manifest", "hit").inc()
    assert b'depproxy_requests_total{kind="manifest",result="hit"} 1.0' in one.exposition()
    assert b"depproxy_requests_total{" not in other.exposition()

def test_a_process_killed_outright_leaves_the_live_gauges_when_the_next_one_starts(
    tmp_path, start_process
):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    shared = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    killed = start_process("a", shared).server.process
    assert list(metrics_dir.glob(f"gauge_live*_{killed.pid}.db"))
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    start_process("b", shared)
    assert not list(metrics_dir.glob(f"gauge_live*_{killed.pid}.db"))
    assert list(metrics_dir.glob(f"counter_{killed.pid}.db"))


def production_ini(tmp_path: Path, database_url: str, s3: MotoS3) -> Path:
    """The shipped production.ini with only what a test machine must change: the database, the
    S3 endpoint and bucket, the secret."""
    config = configparser.ConfigParser(interpolation=None)
    config.optionxform = str  # setting names are case-sensitive
    config.read(ROOT / "production.ini")
    app = config["app:main"]
    app["sqlalchemy.url"] = database_url
    app["depproxy.storage.s3.bucket"] = s3.bucket
    app["depproxy.storage.s3.endpoint_url"] = s3.endpoint_url
    app["depproxy.jwt.secret"] = JWT_SECRET
    ini = tmp_path / "production.ini"
    with ini.open("w") as file:
        config.write(file)
    return ini


def test_the_shipped_production_ini_runs_several_processes_on_one_database_and_bucket(
    tmp_path, postgres_database, moto_s3
):
    ini = production_ini(tmp_path, postgres_database(), moto_s3)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    environment = {
        # boto3's own chain, as on a server: the ini names no credentials.
        "AWS_ACCESS_KEY_ID": moto_s3.access_key_id,
        "AWS_SECRET_ACCESS_KEY": moto_s3.secret_access_key,
        "AWS_DEFAULT_REGION": moto_s3.region,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    migrated = subprocess.run(
        [str(BIN / "depproxy-admin"), str(ini), "initdb"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **environment},
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr

    # The port has no default: pserve alone stops at once, naming it.
    portless = subprocess.run(
        [str(BIN / "pserve"), str(ini)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **environment},
    )  # fmt: skip
    assert portless.returncode != 0
    assert "'http_port'" in portless.stderr

    servers = []
    try:
        for name in ("a", "b"):
            port = free_port()
            command = [str(BIN / "pserve"), str(ini), f"http_port={port}"]
            server = ServerProcess(ini, port, tmp_path / f"{name}.log", command, environment)
            servers.append(server)
            server.start()
        for server in servers:
            assert requests.get(f"{server.url}/-/health", timeout=10).status_code == 200
            assert requests.get(f"{server.url}/v2/", timeout=10).status_code == 401
            metrics = requests.get(f"{server.url}/-/metrics", timeout=10).text
            assert 'depproxy_upstream_circuit_state{registry="registry-1.docker.io"} 0.0' in (
                metrics
            )
        assert {path.name for path in metrics_dir.glob("gauge_livesum_*.db")} == {
            f"gauge_livesum_{server.process.pid}.db" for server in servers
        }
    finally:
        for server in servers:
            server.stop()
