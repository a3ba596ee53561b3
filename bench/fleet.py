"""Scale-out benchmark: three depproxy processes behind nginx, on one database and one storage.

Usage (from the repository root, with the project's virtualenv; needs docker-registry, skopeo,
nginx and a PostgreSQL that DEPPROXY_TEST_POSTGRES_URL, as for the tests, may create databases
on)::

    .venv/bin/python -m bench.fleet                                  # --layers-mb 16,8,4 --repeat 2
    .venv/bin/python -m bench.fleet --layers-mb 4,2,1 --repeat 1     # smoke run

One run starts a token-auth ``docker-registry`` upstream behind the tests' counting relay and
moto's S3 server, pushes an image with one uncompressed layer per ``--layers-mb``, and then, for
each storage in turn (S3 with presigned redirects, S3 streamed through the app, one directory
shared by the processes and sent by nginx), a fleet of three ``pserve`` processes on a fresh
PostgreSQL database behind nginx running ``deploy/nginx/depproxy.conf`` (over TLS) measures:

1. ``--clients`` simultaneous cold pulls: wall time, and upstream bytes per image (the body
   bytes upstream sent ÷ the image's size: 1.0× when the fleet fetched each blob and the
   manifest once), with the most GETs any one blob took;
2. warm: one pull alone and ``--clients`` simultaneous pulls, ``--repeat`` rounds each (medians:
   seconds, and the image's bytes delivered per second).

It prints a table; docs/benchmarks.md has figures and what they mean.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/fleet.py`: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench.run import ROOT, log, step  # noqa: E402
from tests.conftest import POSTGRES_URL  # noqa: E402
from tests.proxy import PULLER  # noqa: E402
from tests.support import oci  # noqa: E402
from tests.support.fleet import Fleet, start_fleet, throwaway_postgres  # noqa: E402
from tests.support.nginx import ACCEL_PREFIX  # noqa: E402
from tests.support.relay import Relay  # noqa: E402
from tests.support_s3 import MotoS3, running_moto_s3  # noqa: E402

REPO, TAG = "bench/fleet", "1.0"
PROCESSES = 3
UPSTREAM_BYTES_GOAL = 1.0


@dataclass(frozen=True)
class Storage:
    """One way the fleet stores blobs: its label, and the settings that select it."""

    key: str
    label: str
    s3_settings: Mapping[str, str] | None  # None: a shared directory
    extra_settings: Mapping[str, str] = field(default_factory=dict)


STORAGES = (
    Storage("s3_redirect", "S3, presigned redirect", {"redirect": "true"}),
    Storage("s3_stream", "S3, streamed by the app", {"redirect": "false"}),
    Storage(
        "filesystem",
        "filesystem, sent by nginx",
        None,
        {"depproxy.storage.accel_redirect": ACCEL_PREFIX},
    ),
)


@dataclass
class Measured:
    """What one storage's fleet measured."""

    cold_seconds: float
    upstream_bytes: int
    most_gets_of_a_blob: int
    warm_single: list[float] = field(default_factory=list)
    warm_concurrent: list[float] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--layers-mb",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[16, 8, 4],
        help="size of each layer of the pulled image, comma-separated (default 16,8,4)",
    )
    parser.add_argument("--clients", type=int, default=16, help="simultaneous pulls")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of warm pulls")
    parser.add_argument("--tmpdir", type=Path, default=None, help="parent of the work directory")
    return parser.parse_args(argv)


def image_bytes(image: oci.Image) -> int:
    """What a pull transfers: the manifest, the config and every layer."""
    return image.manifest.size + image.config.size + sum(layer.size for layer in image.layers)


def blob_count(image: oci.Image) -> int:
    return 1 + len(image.layers)


@contextlib.contextmanager
def running_fleet(
    workdir: Path, storage: Storage, upstream_url: str, s3: MotoS3
) -> Iterator[Fleet]:
    """Three processes and nginx on a database of their own, stopped on leaving the block."""
    with throwaway_postgres(POSTGRES_URL) as database_url:
        fleet = start_fleet(
            workdir,
            database_url,
            upstream_url,
            s3 if storage.s3_settings is not None else None,
            size=PROCESSES,
            s3_settings=storage.s3_settings,
            extra_settings=storage.extra_settings,
        )
        try:
            yield fleet
        finally:
            fleet.stop()


def check_storage_path(fleet: Fleet, storage: Storage, group: str, digest: str) -> str:
    """How a process answers a cached blob, checked to be what `storage` is meant to measure:
    otherwise its figures would be those of another path."""
    member = fleet.members[0]
    with member.get(group, REPO, "blobs", digest, allow_redirects=False, stream=True) as answer:
        status, headers = answer.status_code, answer.headers
    accel = headers.get("X-Accel-Redirect")
    if storage.s3_settings is None:
        expected, seen = status == 200 and accel is not None, f"X-Accel-Redirect: {accel}"
    elif storage.s3_settings["redirect"] == "true":
        expected, seen = status == 307, "307 to a presigned URL"
    else:
        expected, seen = status == 200 and accel is None, "200 with the blob's bytes"
    if not expected:
        raise RuntimeError(f"{storage.label}: a cached blob was answered {status}, {headers}")
    return seen


def wait_until_cached(fleet: Fleet, group: str, blobs: int, timeout: float = 120) -> None:
    """A fill records its blob just after its last client has the last byte: warm pulls must
    not start before every blob is stored."""
    deadline = time.monotonic() + timeout
    while fleet.members[0].cached_blobs(group) < blobs:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cold pulls' {blobs} blobs were not all cached in {timeout}s")
        time.sleep(0.1)


def measure(
    args: argparse.Namespace,
    workdir: Path,
    storage: Storage,
    image: oci.Image,
    relay: Relay,
    s3: MotoS3,
) -> Measured:
    """Cold pulls, then warm ones, through a fleet of `storage`."""
    dest = workdir / "pulled"
    with running_fleet(workdir / storage.key, storage, relay.url, s3) as fleet:
        group = fleet.new_group(f"bench-{storage.key}")
        reference = fleet.ref(group, f"{REPO}:{TAG}")
        cert_dir = fleet.front.cert_dir
        relay.reset_counts()
        with step(f"{storage.label}: {args.clients} simultaneous cold pulls"):
            cold = harness.concurrent_pulls(
                reference, dest, args.clients, creds=PULLER, cert_dir=cert_dir
            )
        gets = relay.blob_downloads()
        measured = Measured(cold, relay.body_bytes_sent, max(gets.values()))
        log(
            f"  {cold:.2f}s, upstream sent {measured.upstream_bytes / image_bytes(image):.2f}x "
            f"the image, {measured.most_gets_of_a_blob} GETs of the most fetched blob"
        )
        wait_until_cached(fleet, group, blob_count(image))
        log(f"  a cached blob: {check_storage_path(fleet, storage, group, image.layers[0].digest)}")
        relay.reset_counts()
        pids = [m.server.process.pid for m in fleet.members if m.server.process is not None]
        pids.append(fleet.front.process.pid)
        for run in range(1, args.repeat + 1):
            with step(f"{storage.label}: warm round {run}/{args.repeat}"):
                single = harness.timed_pull(
                    reference, dest, creds=PULLER, server_pids=pids, cert_dir=cert_dir
                )
                measured.warm_single.append(single.seconds)
                measured.warm_concurrent.append(
                    harness.concurrent_pulls(
                        reference, dest, args.clients, creds=PULLER, cert_dir=cert_dir
                    )
                )
            log(
                f"  one pull {measured.warm_single[-1]:.2f}s, {args.clients} at once "
                f"{measured.warm_concurrent[-1]:.2f}s"
            )
        warm_gets = relay.count(method="GET", kind="blob")
        if warm_gets:
            raise RuntimeError(f"{storage.label}: warm pulls made {warm_gets} upstream blob GETs")
    return measured


def table(args: argparse.Namespace, image: oci.Image, results: Mapping[str, Measured]) -> str:
    """The results as a markdown table, one row per storage."""
    size = image_bytes(image)
    mib = size / harness.MIB
    lines = [
        f"Image: {blob_count(image)} blobs, {mib:.1f} MiB (layers {args.layers_mb} MiB); "
        f"{PROCESSES} processes behind nginx; {args.clients} clients; warm: median of "
        f"{args.repeat} rounds.",
        "",
        f"| storage | {args.clients} cold pulls | upstream bytes per image (goal "
        f"{UPSTREAM_BYTES_GOAL:.1f}x) | GETs of the most fetched blob | one warm pull | "
        f"{args.clients} warm pulls at once |",
        "|---|---|---|---|---|---|",
    ]
    for storage in STORAGES:
        m = results[storage.key]
        single = statistics.median(m.warm_single)
        concurrent = statistics.median(m.warm_concurrent)
        lines.append(
            f"| {storage.label} | {m.cold_seconds:.2f} s | {m.upstream_bytes / size:.2f}x | "
            f"{m.most_gets_of_a_blob} | {single:.2f} s ({mib / single:.0f} MiB/s) | "
            f"{concurrent:.2f} s ({args.clients * mib / concurrent:.0f} MiB/s in all) |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    """Every measurement, with every process stopped and the work directory removed at the end."""
    for tool in ("docker-registry", "skopeo", "nginx"):
        harness.require_binary(tool)
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="depproxy-bench-fleet-", dir=args.tmpdir))
        stack.callback(harness.remove_tree, workdir)
        stack.callback(harness.remove_skopeo_auth_file)
        started = time.monotonic()
        load_at_start = harness.load_average()
        upstream = harness.Upstream(workdir / "upstream")
        stack.callback(upstream.stop)
        with step("starting upstream docker-registry + token server, the relay and moto"):
            upstream.start()
            relay = Relay(upstream.registry.port)
            # skopeo closing kept-alive connections makes http.server print tracebacks.
            relay._httpd.handle_error = lambda request, client_address: None
            stack.callback(relay.stop)
            relay.start()
            s3 = stack.enter_context(running_moto_s3(workdir / "moto.log"))
        with step(f"generating and pushing the image (layers {args.layers_mb} MiB)"):
            layout = workdir / "layout"
            image = oci.write_layered_image(layout, TAG, args.layers_mb, seed=1)
            upstream.registry.seed_image(image, REPO, TAG)
            harness.remove_tree(layout)
        results = {
            storage.key: measure(args, workdir, storage, image, relay, s3) for storage in STORAGES
        }
        facts = [
            f"Measured {harness.command_output(['date', '-u', '+%Y-%m-%d %H:%M UTC'])} on "
            f"{harness.command_output(['nproc'])} cores; load average {load_at_start} at start, "
            f"{harness.load_average()} at end; {time.monotonic() - started:.0f} s in all.",
            f"Code: {harness.code_version(ROOT)}.",
        ]
        return "\n".join([*facts, "", table(args, image, results)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run and print the table."""
    print(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
