"""A real S3 endpoint for tests: moto's server in a child process, spoken to over HTTP.

In-process mocks would bypass the HTTP layer that streaming, ranges and presigned URLs depend on.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config

from tests.server import free_port, stop_process

_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class MotoS3:
    endpoint_url: str
    bucket: str = "depproxy-test"
    region: str = "us-east-1"
    access_key_id: str = "testing"
    secret_access_key: str = "testing"

    def settings(self, **s3_settings: str) -> dict[str, str]:
        """App settings selecting S3 storage on this server; keyword arguments add or override
        `depproxy.storage.s3.*` keys."""
        values = {
            "bucket": self.bucket,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            **s3_settings,
        }
        return {"depproxy.storage": "s3"} | {
            f"depproxy.storage.s3.{name}": value for name, value in values.items()
        }

    def client(self) -> Any:
        """An independent client, for checking what the storage did behind its back."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}),
        )


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with running_moto_s3(tmp_path_factory.mktemp("moto") / "server.log") as server:
        yield server


@contextlib.contextmanager
def running_moto_s3(log_path: Path) -> Iterator[MotoS3]:
    """moto's server on a free port with the default bucket, stopped on leaving the block."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        server = MotoS3(endpoint_url=f"http://127.0.0.1:{port}")
        _wait_until_serving(process, server.endpoint_url, log_path)
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        stop_process(process)


def _wait_until_serving(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    # Environment proxy settings must not divert a loopback probe.
    with requests.Session() as http:
        http.trust_env = False
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"moto server exited with {process.returncode}:\n{log_path.read_text()}",
                    pytrace=False,
                )
            try:
                http.get(url, timeout=1)
                return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"moto server did not answer on {url} within {_START_TIMEOUT:.0f}s:\n"
                    f"{log_path.read_text()}",
                    pytrace=False,
                )
            time.sleep(0.1)
