"""Run every benchmark of depproxy-pyramid once, print a table, update docs/benchmarks.md.

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python -m bench.run                 # --big-mb 200 --huge-mb 1024 --repeat 3
    .venv/bin/python bench/run.py --big-mb 50 --huge-mb 256 --no-docs   # a quick smoke run

What it measures, all on 127.0.0.1 against real processes (see docs/benchmarks.md):

1. ``skopeo copy`` of an image with one uncompressed ``--big-mb`` MiB layer: directly from a
   token-auth ``docker-registry``, through depproxy cold (fresh group) and warm (same group
   again), and through ``docker-registry`` in proxy mode cold (fresh storage) and warm.
2. ``wrk`` throughput (``-c8`` and ``-c16``) of a cached few-MiB blob (depproxy vs. nginx serving
   the same file, plus distribution's proxy for context) and of a cached tag's manifest
   (depproxy with ``depproxy.manifest.freshness_seconds`` 0 and 300, distribution's proxy).
3. Peak RSS of the depproxy server process tree while it fills a ``--huge-mb`` MiB blob cold.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench import harness, report  # noqa: E402
from tests.proxy import PULLER, Proxy, start_proxy  # noqa: E402
from tests.support import oci  # noqa: E402
from tests.support.registry import skopeo_pull  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
BIG_REPO, SMALL_REPO, HUGE_REPO, TAG = "bench/big", "bench/small", "bench/huge", "1.0"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--big-mb", type=int, default=200, help="layer of the pull benchmark")
    parser.add_argument("--huge-mb", type=int, default=1024, help="blob of the RSS benchmark")
    parser.add_argument("--small-mb", type=int, default=4, help="blob of the wrk benchmark")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each pull scenario")
    parser.add_argument("--wrk-seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=16)
    parser.add_argument(
        "--wrk-low-connections",
        type=int,
        default=8,
        help="second, lower wrk concurrency for depproxy and nginx (below the DB pool size)",
    )
    parser.add_argument("--tmpdir", type=Path, default=None, help="parent of the work directory")
    parser.add_argument(
        "--docs",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="markdown file whose results section is replaced (default: docs/benchmarks.md)",
    )
    parser.add_argument("--no-docs", action="store_true", help="only print the table")
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="FILE",
        help="also profile depproxy with py-spy during one extra (uncounted) cold pull of the "
        "big image; collapsed stacks go to FILE, the top frames into the report",
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    """Progress on stderr, so stdout carries only the result table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Log a step and how long it took."""
    log(f"{name} ...")
    started = time.monotonic()
    yield
    log(f"{name}: {time.monotonic() - started:.1f}s")


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class Bench:
    """One benchmark run: owns the work directory and every process it starts."""

    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.stack = stack
        self.workdir = Path(tempfile.mkdtemp(prefix="depproxy-bench-", dir=args.tmpdir))
        stack.callback(harness.remove_tree, self.workdir)
        stack.callback(harness.remove_skopeo_auth_file)
        self.results = report.Results(args=vars(args))
        self.upstream = harness.Upstream(self.workdir / "upstream")
        self.small: oci.Image | None = None  # the wrk image, once pushed
        self._groups = 0

    # Setup ----------------------------------------------------------------------------------

    def start_upstream(self) -> None:
        """Start the token-auth registry and push the three benchmark images."""
        with step("starting upstream docker-registry + token server"):
            self.stack.callback(self.upstream.stop)
            self.upstream.start()
        with step(f"generating and pushing {self.args.big_mb} MiB image"):
            self.upstream.push_big_image(BIG_REPO, TAG, self.args.big_mb, seed=1)
        with step(f"generating and pushing {self.args.small_mb} MiB image"):
            self.small = self.upstream.push_big_image(SMALL_REPO, TAG, self.args.small_mb, seed=2)
        with step(f"generating and pushing {self.args.huge_mb} MiB image"):
            self.upstream.push_big_image(HUGE_REPO, TAG, self.args.huge_mb, seed=3)
        os.sync()

    def start_proxy(self, name: str, **settings: str) -> Proxy:
        """A depproxy ``pserve`` process with its own SQLite database and storage."""
        workdir = self.workdir / name
        proxy = start_proxy(
            workdir, f"sqlite:///{workdir / 'depproxy.sqlite'}", self.upstream.url, **settings
        )
        self.stack.callback(proxy.db.engine.dispose)
        self.stack.callback(proxy.server.stop)
        return proxy

    def new_group(self, proxy: Proxy, kind: str) -> str:
        """A fresh private group (an empty cache) the puller belongs to."""
        self._groups += 1
        return proxy.new_group(f"bench-{kind}-{self._groups}")

    def start_distribution(self, name: str) -> harness.DistributionProxy:
        """docker-registry in proxy mode on fresh storage, in front of the upstream."""
        dist = harness.DistributionProxy(self.workdir / name, self.upstream.url)
        self.stack.callback(dist.stop)
        return dist.start()

    # 1 + 2: pulls ---------------------------------------------------------------------------

    def pulls(self, proxy: Proxy) -> None:
        """Direct, depproxy cold/warm, distribution cold/warm; interleaved, ``--repeat`` times."""
        names = ["direct", "depproxy_cold", "depproxy_warm", "dist_cold", "dist_warm"]
        timings = {name: harness.Timings(name) for name in names}
        dest = self.workdir / "pulled"
        image = f"{BIG_REPO}:{TAG}"
        proxy_pid = proxy.server.process.pid
        for run in range(1, self.args.repeat + 1):
            with step(f"pull round {run}/{self.args.repeat}"):
                timings["direct"].pulls.append(
                    harness.timed_pull(
                        f"{self.upstream.host}/{image}", dest, server_pid=self.upstream.pid
                    )
                )
                group = self.new_group(proxy, "pull")
                for name in ("depproxy_cold", "depproxy_warm"):
                    timings[name].pulls.append(
                        harness.timed_pull(
                            proxy.ref(group, image), dest, creds=PULLER, server_pid=proxy_pid
                        )
                    )
                dist = self.start_distribution(f"dist-pull-{run}")
                try:
                    for name in ("dist_cold", "dist_warm"):
                        timings[name].pulls.append(
                            harness.timed_pull(f"{dist.host}/{image}", dest, server_pid=dist.pid)
                        )
                finally:
                    dist.stop()
                    harness.remove_tree(dist.workdir)
                log("  " + ", ".join(f"{name} {timings[name].seconds[-1]:.2f}s" for name in names))
        self.results.pulls = timings

    def profile(self, proxy: Proxy, output: Path) -> None:
        """py-spy of depproxy during an extra cold pull, not counted in the pull table."""
        group = self.new_group(proxy, "profile")
        with step("extra cold pull under py-spy"), harness.PySpy(proxy.server.process.pid, output):
            harness.timed_pull(
                proxy.ref(group, f"{BIG_REPO}:{TAG}"), self.workdir / "pulled", creds=PULLER
            )
        self.results.profile = harness.top_frames(output)

    # 3: throughput --------------------------------------------------------------------------

    def wrk(
        self,
        label: str,
        url: str,
        headers: dict[str, str],
        connections: int | None = None,
        server_log: Path | None = None,
    ) -> None:
        """One wrk run after a short sequential warm-up; counts pool timeouts in the log."""
        connections = connections or self.args.wrk_connections
        with requests.Session() as session:
            for _ in range(20):
                answer = session.get(url, headers=headers, timeout=60)
                if answer.status_code != 200:
                    raise RuntimeError(f"{label}: GET {url} answered {answer.status_code}")
        log_offset = server_log.stat().st_size if server_log else 0
        label = f"{label} (-c{connections})"
        with step(f"wrk {label}"):
            result = harness.run_wrk(
                label,
                url,
                headers,
                self.workdir,
                threads=self.args.wrk_threads,
                connections=connections,
                seconds=self.args.wrk_seconds,
            )
        if server_log is not None:
            result = self._check_recovery(result, url, headers, server_log, log_offset)
        log(
            f"  {result.rps:.0f} req/s, {result.mib_per_s:.1f} MiB/s, {result.errors} errors"
            + (f"; {result.note}" if result.note else "")
        )
        self.results.throughput.append(result)

    @staticmethod
    def _check_recovery(
        result: harness.WrkResult,
        url: str,
        headers: dict[str, str],
        server_log: Path,
        log_offset: int,
    ) -> harness.WrkResult:
        """Time one GET right after wrk, and count DB pool timeouts the run caused.

        A server that stalled under wrk (requests stuck waiting for a database connection)
        answers only once those give up, after SQLAlchemy's 30 s pool timeout.
        """
        started = time.monotonic()
        answer = requests.get(url, headers=headers, timeout=120)
        waited = time.monotonic() - started
        time.sleep(0.5)
        with server_log.open("rb") as handle:
            handle.seek(log_offset)
            text = handle.read().decode(errors="replace")
        notes = []
        if waited > 2 or answer.status_code != 200:
            notes.append(f"next single GET: {answer.status_code} after {waited:.1f}s")
        pool = text.count("QueuePool limit")
        if pool:
            notes.append(f"{pool} requests failed with a SQLAlchemy QueuePool timeout")
        return dataclasses.replace(result, note="; ".join(notes)) if notes else result

    def throughput(self, proxy: Proxy) -> None:
        """Cached blob (depproxy, nginx, distribution) and cached tag manifest GETs."""
        image = f"{SMALL_REPO}:{TAG}"
        assert self.small is not None, "start_upstream() first"
        layer = self.small.layers[0].digest
        group = self.new_group(proxy, "wrk")
        skopeo_pull(proxy.ref(group, image), self.workdir / "pulled", creds=PULLER)
        harness.remove_tree(self.workdir / "pulled")
        base = f"{proxy.url}/v2/{group}/dependency_proxy/containers/{SMALL_REPO}"
        auth = {"Authorization": f"Bearer {proxy.token(group, SMALL_REPO)}"}
        blob_path = proxy.storage / str(proxy.group_id(group)) / "blobs" / "sha256" / layer[7:]
        proxy_log = proxy.server.log_path

        levels = (self.args.wrk_low_connections, self.args.wrk_connections)
        nginx = harness.Nginx(self.workdir / "nginx")
        shutil.copyfile(blob_path, nginx.html / "blob")
        self.stack.callback(nginx.stop)
        nginx.start()
        try:
            for connections in levels:
                self.wrk("nginx static file", f"{nginx.url}/blob", {}, connections)
        finally:
            nginx.stop()
        for connections in levels:
            self.wrk("depproxy cached blob", f"{base}/blobs/{layer}", auth, connections, proxy_log)

        dist = self.start_distribution("dist-wrk")
        try:
            skopeo_pull(f"{dist.host}/{image}", self.workdir / "pulled")
            harness.remove_tree(self.workdir / "pulled")
            dist_base = f"{dist.url}/v2/{SMALL_REPO}"
            self.wrk("distribution proxy cached blob", f"{dist_base}/blobs/{layer}", {})
            self.wrk(
                "distribution proxy manifest (revalidates)",
                f"{dist_base}/manifests/{TAG}",
                {"Accept": MANIFEST_ACCEPT},
            )
        finally:
            dist.stop()

        fresh = self.start_proxy("proxy-fresh", **{"depproxy.manifest.freshness_seconds": "300"})
        try:
            fresh_group = self.new_group(fresh, "fresh")
            fresh_url = (
                f"{fresh.url}/v2/{fresh_group}/dependency_proxy/containers/{SMALL_REPO}"
                f"/manifests/{TAG}"
            )
            fresh_headers = {
                "Authorization": f"Bearer {fresh.token(fresh_group, SMALL_REPO)}",
                "Accept": MANIFEST_ACCEPT,
            }
            for connections in levels:
                self.wrk(
                    "depproxy manifest, freshness 300",
                    fresh_url,
                    fresh_headers,
                    connections,
                    fresh.server.log_path,
                )
        finally:
            fresh.server.stop()

        # At -c16 this may stall the process for the DB pool timeout (see docs/benchmarks.md).
        for connections in levels:
            self.wrk(
                "depproxy manifest, freshness 0",
                f"{base}/manifests/{TAG}",
                {**auth, "Accept": MANIFEST_ACCEPT},
                connections,
                proxy_log,
            )

    # 4: memory ------------------------------------------------------------------------------

    def memory(self) -> None:
        """RSS of a fresh depproxy process tree while a ``--huge-mb`` blob is pulled cold."""
        proxy = self.start_proxy("proxy-rss")
        try:
            dest = self.workdir / "pulled"
            warmup = self.new_group(proxy, "warmup")
            # Warm the process (imports, SQL compilation caches, a first fill) before the baseline.
            harness.timed_pull(proxy.ref(warmup, f"{SMALL_REPO}:{TAG}"), dest, creds=PULLER)
            pid = proxy.server.process.pid
            baseline = harness.settled_rss_kib(pid)
            group = self.new_group(proxy, "huge")
            with (
                step(f"cold pull of the {self.args.huge_mb} MiB image, sampling RSS"),
                harness.RssSampler(pid) as sampler,
            ):
                seconds = harness.timed_pull(
                    proxy.ref(group, f"{HUGE_REPO}:{TAG}"), dest, creds=PULLER
                ).seconds
                # The fill commits (fsync, rename, row) after the client has its last byte.
                deadline = time.monotonic() + 120
                while proxy.cached_blobs(group) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.results.memory = report.Memory(
                blob_mib=self.args.huge_mb,
                baseline_kib=baseline,
                peak_kib=sampler.peak_kib,
                samples=len(sampler.samples),
                pull_seconds=seconds,
            )
            log(
                f"  baseline {baseline / 1024:.1f} MiB, peak {sampler.peak_kib / 1024:.1f} MiB,"
                f" {len(sampler.samples)} samples, pull {seconds:.1f}s"
            )
        finally:
            proxy.server.stop()


def run(args: argparse.Namespace, command: str) -> report.Results:
    """Every benchmark, with every process stopped and the work directory removed at the end."""
    for tool in ("docker-registry", "skopeo", "nginx", "wrk"):
        harness.require_binary(tool)
    with contextlib.ExitStack() as stack:
        bench = Bench(args, stack)
        bench.results.command = command
        bench.results.facts = harness.machine_facts()
        bench.results.facts["code"] = harness.code_version(ROOT)
        started = time.monotonic()
        bench.start_upstream()
        proxy = bench.start_proxy("proxy")
        bench.pulls(proxy)
        if args.py_spy is not None:
            bench.profile(proxy, args.py_spy.resolve())
        bench.throughput(proxy)
        proxy.server.stop()
        bench.memory()
        bench.results.runtime_seconds = time.monotonic() - started
        bench.results.facts["load average at end"] = harness.load_average()
        return bench.results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, print the table, write the docs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.run", *argv])
    previous: Callable[..., object] | int | None = signal.signal(signal.SIGTERM, _sigterm)
    try:
        results = run(args, command)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.text_table(results))
    if not args.no_docs:
        report.update_docs(args.docs, results)
        log(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
