"""Memory and spool disk of one blob fill into S3 storage (moto's server over HTTP), or into
filesystem storage for comparison.

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python -m bench.s3_fill                     # --size-mb 512 --storage s3
    .venv/bin/python -m bench.s3_fill --storage filesystem

The fill runs in this process, as in a server: `BlobFills` over the storage, with an upstream
registry stand-in on a thread here that streams `--size-mb` MiB of pseudo-random bytes (never
held whole). Two readers follow it: one keeping up, one that stops after its first MiB until
the fill is committed (a slow client). Every 20 ms the sampler notes this process's VmRSS and
the bytes of the files in the storage's spool directory; it prints the baseline (before the
fill), the peak, the peak spool use, and whether both readers got the blob's digest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

if __package__ in (None, ""):  # `python bench/s3_fill.py`: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
import requests  # noqa: E402

from bench.harness import rss_kib  # noqa: E402
from depproxy_pyramid.services.fills import BlobFills, Fill  # noqa: E402
from depproxy_pyramid.storage import Storage, storage_from_settings  # noqa: E402
from depproxy_pyramid.upstream import UpstreamClient  # noqa: E402
from tests.server import free_port, stop_process  # noqa: E402

MIB = 1024 * 1024
BUCKET = "depproxy-bench"
REPOSITORY = "bench/huge"


def blob_chunks(size: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)  # noqa: S311 - not crypto: only needs to be fast and incompressible
    remaining = size
    while remaining:
        count = min(MIB, remaining)
        yield rng.randbytes(count)
        remaining -= count


def serve_upstream(size: int, seed: int, digest: str) -> ThreadingHTTPServer:
    """A registry that answers one blob GET, streamed as it is generated."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != f"/v2/{REPOSITORY}/blobs/{digest}":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            for chunk in blob_chunks(size, seed):
                self.wfile.write(chunk)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    with requests.Session() as http:
        http.trust_env = False
        while True:
            try:
                http.get(url, timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
    return process, url


def s3_settings(endpoint_url: str) -> dict[str, str]:
    credentials = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
    boto3.session.Session(region_name="us-east-1", **credentials).client(
        "s3", endpoint_url=endpoint_url
    ).create_bucket(Bucket=BUCKET)
    return {
        "depproxy.storage": "s3",
        "depproxy.storage.s3.bucket": BUCKET,
        "depproxy.storage.s3.endpoint_url": endpoint_url,
        "depproxy.storage.s3.region": "us-east-1",
        "depproxy.storage.s3.access_key_id": "bench",
        "depproxy.storage.s3.secret_access_key": "bench",
    }


def spool_bytes(spool_dir: str) -> int:
    total = 0
    for entry in os.scandir(spool_dir):
        try:
            total += entry.stat().st_size
        except FileNotFoundError:
            continue
    return total


def measure(storage: Storage, upstream_url: str, size: int, digest: str) -> None:
    committed = threading.Event()

    def commit(group_id: int, fill: Fill) -> None:
        committed.set()

    fills = BlobFills(storage, lambda group_id, digest: f"{group_id}/blobs/{digest[7:]}", commit)
    client = UpstreamClient(upstream_url)
    pid = os.getpid()
    baseline = rss_kib(pid)
    peak_rss, peak_spool = baseline, 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_spool
        while not sampling.is_set():
            peak_rss = max(peak_rss, rss_kib(pid))
            peak_spool = max(peak_spool, spool_bytes(storage.spool_dir))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    fill = fills.join_or_start(
        1, digest, lambda: False, lambda: client.open_blob(REPOSITORY, digest)
    )
    assert fill is not None
    fill.wait_started()
    received: dict[str, str] = {}

    def read(name: str, stops: bool) -> None:
        hasher = hashlib.sha256()
        reader = fill.read()
        hasher.update(next(reader))
        if stops:
            committed.wait()
        for chunk in reader:
            hasher.update(chunk)
        received[name] = "sha256:" + hasher.hexdigest()

    readers = [
        threading.Thread(target=read, args=(name, stops))
        for name, stops in [("keeping up", False), ("slow", True)]
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    took = time.monotonic() - started
    sampling.set()
    sampler.join()
    print(f"blob: {size // MIB} MiB in {took:.1f} s; storage {storage.location}")
    print(
        f"RSS baseline {baseline / 1024:.1f} MiB, peak {peak_rss / 1024:.1f} MiB, "
        f"growth {(peak_rss - baseline) / 1024:.1f} MiB"
    )
    print(f"spool dir {storage.spool_dir}: peak {peak_spool / MIB:.1f} MiB")
    for name, got in received.items():
        print(f"reader {name}: {'digest matches' if got == digest else 'WRONG ' + got}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_fill", description=__doc__)
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--storage", choices=["s3", "filesystem"], default="s3")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    size = args.size_mb * MIB
    hasher = hashlib.sha256()
    for chunk in blob_chunks(size, args.seed):
        hasher.update(chunk)
    digest = "sha256:" + hasher.hexdigest()
    upstream = serve_upstream(size, args.seed, digest)
    upstream_url = f"http://127.0.0.1:{upstream.server_address[1]}"
    with tempfile.TemporaryDirectory(prefix="depproxy-bench-") as workdir:
        # The S3 strategy spools under the temporary directory: this run's own.
        tempfile.tempdir = workdir
        moto = None
        try:
            if args.storage == "s3":
                moto, endpoint_url = start_moto()
                settings = s3_settings(endpoint_url)
            else:
                settings = {"depproxy.storage.path": os.path.join(workdir, "store")}
            measure(storage_from_settings(settings), upstream_url, size, digest)
        finally:
            stop_process(moto)
            upstream.shutdown()


if __name__ == "__main__":
    main()
