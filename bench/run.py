"""Run every benchmark of depproxy-pyramid once, print the tables, update docs/benchmarks.md.

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python -m bench.run                 # --big-mb 200 --huge-mb 1024 --repeat 3
    .venv/bin/python bench/run.py --big-mb 20 --huge-mb 64 --repeat 1 --wrk-seconds 2 --no-docs

Three servers answer the same token-auth upstream ``docker-registry`` on 127.0.0.1 (see
docs/benchmarks.md): depproxy under its own ``pserve`` runner (the embedded default), depproxy
behind nginx running ``deploy/nginx/depproxy.conf`` as shipped (production, measured over TLS;
cached blobs sent by nginx through X-Accel-Redirect), and ``docker-registry`` in proxy mode.
For each it measures:

1. ``skopeo copy`` of an image with one uncompressed ``--big-mb`` MiB layer, cold and warm,
   interleaved with direct pulls from the upstream, ``--repeat`` rounds;
2. the server's RSS at rest, after those pulls;
3. ``wrk -c4`` on the cached image's manifest by digest, and on its cached layer (plus nginx
   serving the very same file);
4. wall time of ``--clients`` simultaneous warm pulls, ``--repeat`` rounds;
5. (depproxy under ``pserve`` only) peak RSS while it fills a ``--huge-mb`` MiB blob cold.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
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
from tests.proxy import PROXY_MARKER, PULLER, Proxy, start_proxy  # noqa: E402
from tests.server import free_port  # noqa: E402
from tests.support import oci  # noqa: E402
from tests.support.nginx import ACCEL_PREFIX, CONFIG, Nginx  # noqa: E402

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
ACCEL_SETTING = "depproxy.storage.accel_redirect"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--big-mb", type=int, default=200, help="layer of the pull benchmark")
    parser.add_argument("--huge-mb", type=int, default=1024, help="blob of the RSS benchmark")
    parser.add_argument(
        "--small-mb", type=int, default=4, help="image that warms the RSS benchmark's process"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of pulls (and of --clients)")
    parser.add_argument("--clients", type=int, default=16, help="simultaneous warm pulls")
    parser.add_argument("--wrk-seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=4)
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


@dataclasses.dataclass
class Ours:
    """depproxy in one serving stack: its own ``pserve`` process, with or without nginx."""

    key: str
    proxy: Proxy
    front: Nginx | None = None

    @property
    def host(self) -> str:
        """Where clients connect: nginx's HTTPS listener, or the app itself."""
        return self.front.host if self.front else self.proxy.host

    @property
    def url(self) -> str:
        """Base URL clients use: HTTPS through nginx, plain HTTP to the app."""
        return self.front.url if self.front else self.proxy.url

    @property
    def cert_dir(self) -> Path | None:
        """CA certificates skopeo verifies nginx's certificate against (none: plain HTTP)."""
        return self.front.cert_dir if self.front else None

    @property
    def verify(self) -> str | bool:
        """``requests``' ``verify`` for ``url``: the CA that signed nginx's certificate."""
        return str(self.front.ca) if self.front else True

    @property
    def pids(self) -> list[int]:
        """The serving processes (trees): the app, and nginx's master when in front."""
        front = [self.front.process.pid] if self.front else []
        return [self.proxy.server.process.pid, *front]

    def ref(self, group: str, image: str) -> str:
        """``docker://`` reference of ``image`` through this stack, in ``group``'s cache."""
        return f"{self.host}/{group}/{PROXY_MARKER}/{image}"

    def base(self, group: str, repo: str) -> str:
        """``/v2/<name>`` URL of ``repo`` in ``group``'s cache."""
        return f"{self.url}/v2/{group}/{PROXY_MARKER}/{repo}"


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
        self.big: oci.Image | None = None  # the pulled image, once pushed
        self.dist: harness.DistributionProxy | None = None  # warm after the pull rounds
        self.warm_groups: dict[str, str] = {}  # stack key -> group whose cache holds the image
        self._groups = 0

    # Setup ----------------------------------------------------------------------------------

    def start_upstream(self) -> None:
        """Start the token-auth registry and push the three benchmark images."""
        with step("starting upstream docker-registry + token server"):
            self.stack.callback(self.upstream.stop)
            self.upstream.start()
        with step(f"generating and pushing {self.args.big_mb} MiB image"):
            self.big = self.upstream.push_big_image(BIG_REPO, TAG, self.args.big_mb, seed=1)
        with step(f"generating and pushing {self.args.small_mb} MiB image"):
            self.upstream.push_big_image(SMALL_REPO, TAG, self.args.small_mb, seed=2)
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

    def start_embedded(self) -> Ours:
        """depproxy as the embedded default runs: ``pserve`` (waitress) answers clients."""
        return Ours("pserve", self.start_proxy("proxy"))

    def start_production(self) -> Ours:
        """depproxy behind nginx with the shipped file, as README.md's production section says.

        The front is the one ``tests/test_nginx_front.py`` runs: TLS on its HTTPS listener
        (plain HTTP only redirects), with a certificate from a CA made for the run.
        """
        https_port = free_port()
        proxy = self.start_proxy(
            "proxy-front",
            **{
                "depproxy.external_url": f"https://127.0.0.1:{https_port}",
                "depproxy.trusted_proxies": "127.0.0.1",
                ACCEL_SETTING: ACCEL_PREFIX,
            },
        )
        front = Nginx(self.workdir / "front", [proxy.server.port], proxy.storage, https_port)
        self.stack.callback(front.stop)
        with step(f"starting nginx with {CONFIG.relative_to(ROOT)}"):
            front.start()
        self.results.facts["front"] = (
            f"{CONFIG.relative_to(ROOT)} as shipped, over TLS; {ACCEL_SETTING} = {ACCEL_PREFIX}"
        )
        return Ours("nginx", proxy, front)

    def new_group(self, proxy: Proxy, kind: str) -> str:
        """A fresh private group (an empty cache) the puller belongs to."""
        self._groups += 1
        return proxy.new_group(f"bench-{kind}-{self._groups}")

    def start_distribution(self, name: str) -> harness.DistributionProxy:
        """docker-registry in proxy mode on fresh storage, in front of the upstream."""
        dist = harness.DistributionProxy(self.workdir / name, self.upstream.url)
        self.stack.callback(dist.stop)
        return dist.start()

    def check_offload(self, ours: Ours) -> None:
        """The app behind nginx must answer a cached blob with X-Accel-Redirect.

        Otherwise the production figures would measure blobs passing through Python.
        """
        assert self.big is not None
        group = self.warm_groups[ours.key]
        proxy = ours.proxy
        url = f"{proxy.url}/v2/{group}/{PROXY_MARKER}/{BIG_REPO}/blobs/{self.big.layers[0].digest}"
        auth = {"Authorization": f"Bearer {proxy.token(group, BIG_REPO)}"}
        with requests.get(url, headers=auth, stream=True, timeout=30) as answer:
            header = answer.headers.get("X-Accel-Redirect")
        if not header:
            raise RuntimeError(
                f"{ACCEL_SETTING} is set but the app answered a cached blob without "
                "X-Accel-Redirect: the production figures would not measure production"
            )
        log(f"  the app offloads cached blobs: X-Accel-Redirect: {header}")

    # 1: pulls -------------------------------------------------------------------------------

    def pulls(self, stacks: Sequence[Ours]) -> None:
        """Direct, each of ours cold/warm, distribution cold/warm; interleaved, ``--repeat``×.

        Each round has fresh caches: new groups for depproxy, a new distribution instance on
        empty storage. The last round's caches stay warm for what follows.
        """
        timings: dict[str, harness.Timings] = {"direct": harness.Timings("direct")}
        dest = self.workdir / "pulled"
        image = f"{BIG_REPO}:{TAG}"
        for run in range(1, self.args.repeat + 1):
            with step(f"pull round {run}/{self.args.repeat}"):
                timings["direct"].pulls.append(
                    harness.timed_pull(
                        f"{self.upstream.host}/{image}", dest, server_pids=[self.upstream.pid]
                    )
                )
                for ours in stacks:
                    group = self.warm_groups[ours.key] = self.new_group(ours.proxy, ours.key)
                    for state in ("cold", "warm"):
                        timings.setdefault(f"{ours.key}_{state}", harness.Timings(ours.key))
                        timings[f"{ours.key}_{state}"].pulls.append(
                            harness.timed_pull(
                                ours.ref(group, image),
                                dest,
                                creds=PULLER,
                                server_pids=ours.pids,
                                cert_dir=ours.cert_dir,
                            )
                        )
                if self.dist is not None:
                    self.dist.stop()
                    harness.remove_tree(self.dist.workdir)
                self.dist = self.start_distribution(f"dist-{run}")
                for state in ("cold", "warm"):
                    timings.setdefault(f"distribution_{state}", harness.Timings("distribution"))
                    timings[f"distribution_{state}"].pulls.append(
                        harness.timed_pull(
                            f"{self.dist.host}/{image}", dest, server_pids=[self.dist.pid]
                        )
                    )
                log("  " + ", ".join(f"{name} {t.seconds[-1]:.2f}s" for name, t in timings.items()))
        self.results.pulls = timings

    def profile(self, proxy: Proxy, output: Path) -> None:
        """py-spy of depproxy during an extra cold pull, not counted in the pull table."""
        group = self.new_group(proxy, "profile")
        with step("extra cold pull under py-spy"), harness.PySpy(proxy.server.process.pid, output):
            harness.timed_pull(
                proxy.ref(group, f"{BIG_REPO}:{TAG}"), self.workdir / "pulled", creds=PULLER
            )
        self.results.profile = harness.top_frames(output)

    # 2: RSS at rest -------------------------------------------------------------------------

    def rss_at_rest(self, stacks: Sequence[Ours]) -> None:
        """Each server's RSS once idle after the pull rounds (app and nginx counted apart)."""
        assert self.dist is not None, "pulls() first"
        time.sleep(1)
        for ours in stacks:
            app = harness.settled_rss_kib(ours.proxy.server.process.pid)
            front = harness.settled_rss_kib(ours.front.process.pid) if ours.front else 0
            self.results.rss[ours.key] = report.Resting(app, front)
        self.results.rss["distribution"] = report.Resting(harness.settled_rss_kib(self.dist.pid))
        log(
            "  "
            + ", ".join(f"{key} {rss.total_mib:.1f} MiB" for key, rss in self.results.rss.items())
        )

    # 3: throughput --------------------------------------------------------------------------

    def wrk(
        self,
        label: str,
        url: str,
        headers: dict[str, str],
        server_log: Path | None = None,
        warmup: int = 20,
        timeout: int = 2,
        verify: str | bool = True,
    ) -> harness.WrkResult:
        """One wrk run after ``warmup`` sequential GETs; counts pool timeouts in the log.

        ``verify``: the CA for an HTTPS ``url`` (wrk itself does not verify certificates).
        """
        connections = self.args.wrk_connections
        with requests.Session() as session:
            for _ in range(warmup):
                with session.get(
                    url, headers=headers, timeout=60, stream=True, verify=verify
                ) as answer:
                    if answer.status_code != 200:
                        raise RuntimeError(f"{label}: GET {url} answered {answer.status_code}")
                    for _chunk in answer.iter_content(harness.MIB):
                        pass
        log_offset = server_log.stat().st_size if server_log else 0
        label = f"{label} (-c{connections})"
        with step(f"wrk {label}"):
            result = harness.run_wrk(
                label,
                url,
                headers,
                self.workdir,
                threads=min(self.args.wrk_threads, connections),
                connections=connections,
                seconds=self.args.wrk_seconds,
                timeout=timeout,
            )
        if server_log is not None:
            result = self._check_recovery(result, url, headers, server_log, log_offset, verify)
        log(
            f"  {result.rps:.0f} req/s, {result.gb_per_s:.2f} GB/s, {result.errors} errors"
            + (f"; {result.note}" if result.note else "")
        )
        return result

    @staticmethod
    def _check_recovery(
        result: harness.WrkResult,
        url: str,
        headers: dict[str, str],
        server_log: Path,
        log_offset: int,
        verify: str | bool,
    ) -> harness.WrkResult:
        """Time one GET right after wrk, and count DB pool timeouts the run caused.

        A server that stalled under wrk (requests stuck waiting for a database connection)
        answers only once those give up, after SQLAlchemy's 30 s pool timeout.
        """
        started = time.monotonic()
        with requests.get(url, headers=headers, timeout=120, stream=True, verify=verify) as answer:
            for _chunk in answer.iter_content(harness.MIB):
                pass
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

    def throughput(self, stacks: Sequence[Ours]) -> None:
        """Cached manifest by digest, then the cached big layer (and nginx sending its file)."""
        assert self.big is not None and self.dist is not None, "pulls() first"
        manifest, layer = self.big.manifest.digest, self.big.layers[0].digest
        # A 200 MiB answer may take longer than wrk's default 2 s per request at -c4.
        blob_timeout = 60
        for ours in stacks:
            group = self.warm_groups[ours.key]
            auth = {"Authorization": f"Bearer {ours.proxy.token(group, BIG_REPO)}"}
            base, app_log = ours.base(group, BIG_REPO), ours.proxy.server.log_path
            self.results.manifest[ours.key] = self.wrk(
                f"{report.STACKS[ours.key]}: manifest by digest",
                f"{base}/manifests/{manifest}",
                {**auth, "Accept": MANIFEST_ACCEPT},
                app_log,
                verify=ours.verify,
            )
            self.results.blob[ours.key] = self.wrk(
                f"{report.STACKS[ours.key]}: cached blob",
                f"{base}/blobs/{layer}",
                auth,
                app_log,
                warmup=2,
                timeout=blob_timeout,
                verify=ours.verify,
            )
        dist_base = f"{self.dist.url}/v2/{BIG_REPO}"
        self.results.manifest["distribution"] = self.wrk(
            f"{report.STACKS['distribution']}: manifest by digest",
            f"{dist_base}/manifests/{manifest}",
            {"Accept": MANIFEST_ACCEPT},
        )
        self.results.blob["distribution"] = self.wrk(
            f"{report.STACKS['distribution']}: cached blob",
            f"{dist_base}/blobs/{layer}",
            {},
            warmup=2,
            timeout=blob_timeout,
        )
        embedded = stacks[0].proxy
        group = self.warm_groups[stacks[0].key]
        nginx = harness.StaticNginx(self.workdir / "nginx")
        # The very file depproxy serves, linked rather than copied.
        os.link(
            embedded.storage / str(embedded.group_id(group)) / "blobs" / "sha256" / layer[7:],
            nginx.html / "blob",
        )
        self.stack.callback(nginx.stop)
        nginx.start()
        try:
            self.results.blob["nginx_static"] = self.wrk(
                f"{report.STACKS['nginx_static']}: the same file",
                f"{nginx.url}/blob",
                {},
                warmup=2,
                timeout=blob_timeout,
            )
        finally:
            nginx.stop()

    # 4: simultaneous pulls ------------------------------------------------------------------

    def concurrency(self, stacks: Sequence[Ours]) -> None:
        """``--clients`` simultaneous warm pulls per server, interleaved, ``--repeat`` rounds."""
        assert self.dist is not None, "pulls() first"
        image, dest = f"{BIG_REPO}:{TAG}", self.workdir / "pulled"
        clients = self.args.clients
        for run in range(1, self.args.repeat + 1):
            with step(f"{clients} simultaneous warm pulls, round {run}/{self.args.repeat}"):
                for ours in stacks:
                    ref = ours.ref(self.warm_groups[ours.key], image)
                    seconds = harness.concurrent_pulls(
                        ref, dest, clients, creds=PULLER, cert_dir=ours.cert_dir
                    )
                    self.results.concurrent.setdefault(ours.key, []).append(seconds)
                seconds = harness.concurrent_pulls(f"{self.dist.host}/{image}", dest, clients)
                self.results.concurrent.setdefault("distribution", []).append(seconds)
                log(
                    "  "
                    + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in self.results.concurrent.items())
                )

    # 5: memory ------------------------------------------------------------------------------

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
        stacks = [bench.start_embedded(), bench.start_production()]
        bench.pulls(stacks)
        bench.check_offload(stacks[1])
        bench.rss_at_rest(stacks)
        if args.py_spy is not None:
            bench.profile(stacks[0].proxy, args.py_spy.resolve())
        bench.throughput(stacks)
        bench.concurrency(stacks)
        assert bench.dist is not None
        bench.dist.stop()
        for ours in stacks:
            if ours.front:
                ours.front.stop()
            ours.proxy.server.stop()
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
