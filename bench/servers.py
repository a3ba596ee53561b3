"""One-off comparison of WSGI servers for depproxy, to choose the serving stack on measurements.

Usage (from the repository root; gunicorn goes into the virtualenv only, it is not a project
dependency)::

    .venv/bin/pip install gunicorn
    .venv/bin/python -m bench.servers                       # --big-mb 200 --wrk-seconds 10
    .venv/bin/python -m bench.servers --big-mb 20 --wrk-seconds 2   # smoke run

The same app, database and cache (SQLite, filesystem storage, filled once through ``pserve``)
under: waitress through the project's runner (``egg:depproxy-pyramid#main``, threads = 64),
gunicorn ``gthread`` with 1 worker × 64 threads, and with 2 workers × 32 threads. For each:
``wrk -c4`` and ``-c16`` on a cached manifest by digest and on a cached ``--small-mb`` MiB blob;
then, while ``--holders`` clients hold ``Range: bytes=0-`` GETs of the cached ``--big-mb`` MiB
blob without reading, how long ``GET /v2/`` on a new connection takes (it should answer within
1 s); and the server's RSS at the end. It prints a table; docs/benchmarks.md explains it.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python bench/servers.py`: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench import harness  # noqa: E402
from bench.run import BIG_REPO, MANIFEST_ACCEPT, TAG, log, step  # noqa: E402
from tests.proxy import PROXY_MARKER, PULLER, Proxy, start_proxy  # noqa: E402
from tests.server import BIN, ServerProcess, free_port  # noqa: E402
from tests.support.registry import skopeo_pull  # noqa: E402

SMALL_REPO = "bench/small"
ANSWER_WITHIN_SECONDS = 1.0


@dataclass(frozen=True)
class Candidate:
    """A way to serve the app: a label and the command line for an ini file and a port."""

    label: str
    kind: str  # "waitress" or "gunicorn"
    workers: int
    threads: int

    def server(self, ini: Path, workdir: Path) -> ServerProcess:
        """The server process (not started) on a free port, logging into ``workdir``."""
        port = free_port()
        log_path = workdir / f"{self.label.replace(' ', '_')}.log"
        if self.kind == "waitress":
            return ServerProcess(_ini_with(ini, workdir, port, self.threads), port, log_path)
        gunicorn = BIN / "gunicorn"
        if not gunicorn.exists():
            raise RuntimeError("gunicorn not found: .venv/bin/pip install gunicorn")
        command = [str(gunicorn), "--paste", str(ini), "--bind", f"127.0.0.1:{port}"]
        command += ["--worker-class", "gthread", "--workers", str(self.workers)]
        # Like waitress's channel_timeout in the ini: a long blob must not get a worker killed.
        command += ["--threads", str(self.threads), "--timeout", "600"]
        return ServerProcess(None, port, log_path, command=command)


CANDIDATES = (
    Candidate("waitress (pserve runner) 64 threads", "waitress", 1, 64),
    Candidate("gunicorn gthread 1x64", "gunicorn", 1, 64),
    Candidate("gunicorn gthread 2x32", "gunicorn", 2, 32),
)


def _ini_with(ini: Path, workdir: Path, port: int, threads: int) -> Path:
    """A copy of ``ini`` whose ``[server:main]`` listens on ``port`` with ``threads`` threads."""
    config = configparser.ConfigParser(interpolation=None)
    config.optionxform = str  # type: ignore[assignment,method-assign]  # keep keys' case
    config.read(ini)
    config["server:main"]["listen"] = f"127.0.0.1:{port}"
    config["server:main"]["threads"] = str(threads)
    copy = workdir / f"waitress-{threads}.ini"
    with copy.open("w") as handle:
        config.write(handle)
    return copy


@dataclass(frozen=True)
class Outcome:
    """What one candidate measured."""

    label: str
    wrk: dict[str, harness.WrkResult]  # by "<what> -c<N>"
    v2_seconds: float | None  # None: no answer within the client's timeout
    rss_mib: float


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.servers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--big-mb", type=int, default=200, help="blob the holders ask for")
    parser.add_argument("--small-mb", type=int, default=4, help="blob of the wrk benchmark")
    parser.add_argument("--wrk-seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--holders", type=int, default=16, help="clients that do not read")
    parser.add_argument("--tmpdir", type=Path, default=None, help="parent of the work directory")
    return parser.parse_args(argv)


@contextlib.contextmanager
def holding(url: str, headers: dict[str, str], clients: int) -> Iterator[None]:
    """``clients`` connections that send a GET for ``url`` and never read the answer."""
    host, _, rest = url.removeprefix("http://").partition("/")
    address, port = host.split(":")
    lines = [f"GET /{rest} HTTP/1.1", f"Host: {host}", "Range: bytes=0-"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    sockets: list[socket.socket] = []
    try:
        for _ in range(clients):
            sock = socket.create_connection((address, int(port)), timeout=10)
            sockets.append(sock)
            sock.sendall(request)
        # Let the server start answering until the sockets' buffers are full.
        time.sleep(1.0)
        for sock in sockets:
            # Peeking leaves the answer unread; a holder that got an error holds nothing.
            status = sock.recv(12, socket.MSG_PEEK)
            if status not in (b"HTTP/1.1 206", b"HTTP/1.1 200"):
                raise RuntimeError(f"a holder's GET {url} was answered {status!r}")
        yield
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class Target:
    """A cached resource: its path under the server's URL and the headers a GET needs."""

    path: str
    headers: dict[str, str]


def measure(
    candidate: Candidate,
    ini: Path,
    workdir: Path,
    targets: dict[str, Target],
    args: argparse.Namespace,
) -> Outcome:
    """Start one candidate, run wrk and the holders test on it, stop it."""
    server = candidate.server(ini, workdir)
    try:
        with step(f"starting {candidate.label}"):
            server.start()
        results: dict[str, harness.WrkResult] = {}
        for what in ("manifest", "blob"):
            target = targets[what]
            for connections in (4, 16):
                label = f"{what} -c{connections}"
                with step(f"wrk {candidate.label}: {label}"):
                    results[label] = harness.run_wrk(
                        label,
                        server.url + target.path,
                        target.headers,
                        workdir,
                        threads=2,
                        connections=connections,
                        seconds=args.wrk_seconds,
                    )
                log(f"  {results[label].rps:.0f} req/s, {results[label].errors} errors")
        big = targets["big"]
        with holding(server.url + big.path, big.headers, args.holders):
            started = time.monotonic()
            try:
                requests.get(f"{server.url}/v2/", timeout=10)
                v2: float | None = time.monotonic() - started
            except requests.RequestException:
                v2 = None
        log(f"  /v2/ with {args.holders} holders: " + (f"{v2:.3f}s" if v2 is not None else "none"))
        rss = harness.settled_rss_kib(server.process.pid) / 1024
        return Outcome(candidate.label, results, v2, rss)
    finally:
        server.stop()


def table(outcomes: Sequence[Outcome], holders: int) -> str:
    """Markdown table: one row per candidate."""
    columns = list(outcomes[0].wrk)
    header = ["server", *(f"{c} req/s" for c in columns)]
    header += [f"GET /v2/ with {holders} non-reading holders", "RSS MiB after"]
    rows = []
    for outcome in outcomes:
        cells = [outcome.label]
        for column in columns:
            result = outcome.wrk[column]
            cells.append(
                f"{result.rps:.0f}" + (f" ({result.errors} errors)" if result.errors else "")
            )
        if outcome.v2_seconds is None:
            cells.append("no answer in 10 s")
        else:
            within = outcome.v2_seconds <= ANSWER_WITHIN_SECONDS
            cells.append(f"{outcome.v2_seconds:.3f} s ({'yes' if within else 'NO'})")
        cells.append(f"{outcome.rss_mib:.1f}")
        rows.append(cells)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Fill the cache once, then measure each candidate in turn; print the table."""
    args = parse_args(argv)
    for tool in ("docker-registry", "skopeo", "wrk"):
        harness.require_binary(tool)
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="depproxy-servers-", dir=args.tmpdir))
        stack.callback(harness.remove_tree, workdir)
        stack.callback(harness.remove_skopeo_auth_file)
        upstream = harness.Upstream(workdir / "upstream")
        stack.callback(upstream.stop)
        upstream.start()
        with step(f"pushing {args.big_mb} MiB and {args.small_mb} MiB images"):
            big = upstream.push_big_image(BIG_REPO, TAG, args.big_mb, seed=1)
            small = upstream.push_big_image(SMALL_REPO, TAG, args.small_mb, seed=2)
        proxy_dir = workdir / "proxy"
        database = f"sqlite:///{proxy_dir / 'depproxy.sqlite'}"
        proxy: Proxy = start_proxy(proxy_dir, database, upstream.url)
        stack.callback(proxy.db.engine.dispose)
        stack.callback(proxy.server.stop)
        group = proxy.new_group("bench-servers")
        with step("filling the cache through pserve"):
            for image in (f"{SMALL_REPO}:{TAG}", f"{BIG_REPO}:{TAG}"):
                skopeo_pull(proxy.ref(group, image), workdir / "pulled", creds=PULLER)
                harness.remove_tree(workdir / "pulled")
        # A token outlives the run, and every server checks it against the same database.
        small_auth = {"Authorization": f"Bearer {proxy.token(group, SMALL_REPO)}"}
        big_auth = {"Authorization": f"Bearer {proxy.token(group, BIG_REPO)}"}
        proxy.server.stop()
        small_path = f"/v2/{group}/{PROXY_MARKER}/{SMALL_REPO}"
        targets = {
            "manifest": Target(
                f"{small_path}/manifests/{small.manifest.digest}",
                {**small_auth, "Accept": MANIFEST_ACCEPT},
            ),
            "blob": Target(f"{small_path}/blobs/{small.layers[0].digest}", small_auth),
            "big": Target(
                f"/v2/{group}/{PROXY_MARKER}/{BIG_REPO}/blobs/{big.layers[0].digest}", big_auth
            ),
        }
        outcomes = [
            measure(candidate, proxy.ini, workdir, targets, args) for candidate in CANDIDATES
        ]
    print(f"wrk -t2 -d{args.wrk_seconds}s; manifest by digest; blob of {args.small_mb} MiB")
    print(table(outcomes, args.holders))
    code = harness.code_version(Path(__file__).resolve().parent.parent)
    print(f"load average at end {harness.load_average()}; code: {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
