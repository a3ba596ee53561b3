"""Processes and measurements the benchmark is built from.

Everything here starts a real process on a free 127.0.0.1 port and knows how to stop it:
the token-auth upstream ``docker-registry`` (reusing ``tests.support``), ``docker-registry`` in
pull-through proxy mode, ``nginx`` serving a file, ``wrk``, ``skopeo`` pulls, and a sampler of a
process tree's resident set size from ``/proc``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.server import free_port, stop_process
from tests.support import oci
from tests.support.nginx import NginxProcess
from tests.support.registry import Registry, require_binary, skopeo_pull
from tests.support.token_server import TokenServer

MIB = 1 << 20


# Upstream: token server + docker-registry with token auth -------------------------------------


class Upstream:
    """A real ``docker-registry`` behind the test token server (anonymous pull of public repos).

    No relay sits in between: the proxies and the direct pulls talk to the registry itself.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.token_server = TokenServer(workdir / "token")
        self.registry = Registry(workdir / "registry", self.token_server)

    @property
    def url(self) -> str:
        """Base URL of the registry."""
        return self.registry.url

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` of the registry, for ``docker://`` references."""
        return self.registry.host

    @property
    def pid(self) -> int:
        """Process id of the running registry."""
        process = getattr(self.registry, "_process", None)
        return process.pid if process is not None else 0

    def start(self) -> Upstream:
        """Start the token server and the registry."""
        # Clients closing keep-alive connections make http.server print tracebacks; not news.
        httpd = getattr(self.token_server, "_httpd", None)
        if httpd is not None:
            httpd.handle_error = lambda request, client_address: None
        self.token_server.start()
        self.registry.start()
        return self

    def stop(self) -> None:
        """Stop the registry, then the token server."""
        self.registry.stop()
        self.token_server.stop()

    def push_big_image(self, repo: str, tag: str, size_mb: int, seed: int) -> oci.Image:
        """Generate an image with one uncompressed ``size_mb`` MiB layer and push it.

        The generated layout is deleted afterwards; digests are preserved by the push.
        """
        layout = self.workdir / "layouts" / f"{repo.replace('/', '_')}-{tag}"
        image = oci.write_big_image(layout, tag=tag, size_mb=size_mb, seed=seed)
        try:
            self.registry.seed_image(image, repo, tag)
        finally:
            remove_tree(layout)
        return image


# docker-registry in proxy mode ------------------------------------------------------------------


class DistributionProxy:
    """CNCF distribution's pull-through cache (``proxy: remoteurl:``) on fresh storage.

    It has no auth of its own and reaches the upstream anonymously through its token server.
    """

    def __init__(self, workdir: Path, remote_url: str) -> None:
        self.binary = require_binary("docker-registry")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = workdir / "config.yml"
        self.log_path = workdir / "registry.log"
        self.process: subprocess.Popen[bytes] | None = None
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(workdir / "storage")},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
            "proxy": {"remoteurl": remote_url},
        }
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, for ``docker://`` references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://{self.host}"

    @property
    def pid(self) -> int:
        """The registry's process id (it must be running)."""
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20) -> DistributionProxy:
        """Start and wait until ``/v2/`` answers."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        wait_http(self.process, f"{self.url}/v2/", timeout, self.log_path)
        return self

    def stop(self) -> None:
        """Stop the process (idempotent)."""
        stop_process(self.process)
        self.process = None


# nginx ------------------------------------------------------------------------------------------


class StaticNginx(NginxProcess):
    """nginx serving files from ``PREFIX/html``: what a static file costs to send.

    The same main file as the production front (``tests.support.nginx``), with one plain-HTTP
    server whose root is that directory.
    """

    def __init__(self, prefix: Path) -> None:
        self.html = prefix / "html"
        self.html.mkdir(parents=True)
        port = free_port()
        super().__init__(
            prefix, f"    server {{ listen 127.0.0.1:{port}; root {self.html}; }}", port
        )


# Process helpers --------------------------------------------------------------------------------


def wait_http(process: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
    """Wait until ``url`` answers any HTTP status; stop the process and raise on failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited early; see {log}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.05)
    stop_process(process)
    raise RuntimeError(f"{url} did not answer within {timeout}s; see {log}")


def remove_skopeo_auth_file() -> None:
    """Delete the empty auth file ``tests.support.registry`` made for this process's skopeo."""
    from tests.support import registry

    make = getattr(registry, "_empty_auth_file", None)
    if make is not None and make.cache_info().currsize:
        Path(make()).unlink(missing_ok=True)
        make.cache_clear()


def remove_tree(path: Path) -> None:
    """``rm -rf`` without following symlinks; missing paths are fine."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


# Pulls ------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (its exited threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Pull:
    """One measured pull: wall time, CPU of the serving process, CPU of skopeo."""

    seconds: float
    server_cpu: float
    client_cpu: float


def servers_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds used so far by the process trees of ``pids`` (nginx's workers included)."""
    return sum(cpu_seconds(each) for pid in pids for each in tree_pids(pid))


def timed_pull(
    reference: str,
    dest: Path,
    creds: tuple[str, str] | None = None,
    server_pids: Sequence[int] = (),
    cert_dir: Path | None = None,
) -> Pull:
    """Wall seconds of one ``skopeo copy docker://REF oci:DEST`` into a fresh directory.

    Over TLS, verified against ``cert_dir``'s CA certificates, when that is given.
    Also records the CPU seconds used meanwhile by the ``server_pids`` trees (the registry or
    cache that answers, with its front) and by skopeo. The destination is removed and dirty
    pages flushed (``sync``) afterwards, outside the timed part, so that one pull's writeback
    does not slow the next.
    """
    remove_tree(dest)
    server_before = servers_cpu_seconds(server_pids)
    client_before = _children_cpu_seconds()
    started = time.perf_counter()
    try:
        skopeo_pull(reference, dest, creds=creds, cert_dir=cert_dir)
        seconds = time.perf_counter() - started
        server = servers_cpu_seconds(server_pids) - server_before
        return Pull(seconds, server, _children_cpu_seconds() - client_before)
    finally:
        remove_tree(dest)
        os.sync()


def concurrent_pulls(
    reference: str,
    dest: Path,
    clients: int,
    creds: tuple[str, str] | None = None,
    cert_dir: Path | None = None,
) -> float:
    """Wall seconds until ``clients`` simultaneous pulls of ``reference`` have all finished.

    Each skopeo writes its own directory under ``dest``; all are removed and synced afterwards,
    outside the timed part. ``cert_dir`` as for ``timed_pull``.
    """
    remove_tree(dest)
    dest.mkdir(parents=True)
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(clients) as pool:
            done = [
                pool.submit(skopeo_pull, reference, dest / str(n), creds, cert_dir=cert_dir)
                for n in range(clients)
            ]
            for each in done:
                each.result()
        return time.perf_counter() - started
    finally:
        remove_tree(dest)
        os.sync()


@dataclass
class Timings:
    """Repeated measurements of one pull scenario."""

    label: str
    pulls: list[Pull] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        """Wall seconds of every run, in order."""
        return [pull.seconds for pull in self.pulls]

    @property
    def median(self) -> float:
        """Median wall seconds."""
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        """Fastest run in wall seconds."""
        return min(self.seconds)

    @property
    def server_cpu(self) -> float:
        """Median CPU seconds of the serving process."""
        return statistics.median(pull.server_cpu for pull in self.pulls)

    @property
    def client_cpu(self) -> float:
        """Median CPU seconds of skopeo."""
        return statistics.median(pull.client_cpu for pull in self.pulls)


# wrk --------------------------------------------------------------------------------------------

WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """What ``wrk`` measured for one URL."""

    label: str
    requests: int
    bytes: int
    seconds: float
    errors: int  # socket errors, timeouts and non-2xx/3xx answers
    p50_ms: float
    p99_ms: float
    connections: int = 0
    note: str = ""

    @property
    def rps(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mib_per_s(self) -> float:
        """Response bytes (headers included) per second, in MiB."""
        return self.bytes / self.seconds / MIB if self.seconds else 0.0

    @property
    def gb_per_s(self) -> float:
        """Response bytes (headers included) per second, in GB (10^9 bytes)."""
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


def run_wrk(
    label: str,
    url: str,
    headers: Mapping[str, str],
    script_dir: Path,
    threads: int = 2,
    connections: int = 16,
    seconds: int = 10,
    timeout: int = 2,
) -> WrkResult:
    """Run ``wrk -tT -cC -dDs`` against ``url`` and parse its summary (via a Lua hook).

    ``timeout`` is wrk's per-request timeout: a request slower than it counts as an error.
    """
    script = script_dir / "summary.lua"
    script.write_text(WRK_SCRIPT)
    args = [require_binary("wrk"), f"-t{threads}", f"-c{connections}", f"-d{seconds}s"]
    args += [f"--timeout={timeout}s"]
    args += ["--latency", "-s", str(script)]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    result = subprocess.run(
        [*args, url], capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    match = re.search(r"^WRKJSON (\{.*\})$", result.stdout, re.MULTILINE)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    data = json.loads(match.group(1))
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        label,
        data["requests"],
        data["bytes"],
        data["duration_us"] / 1e6,
        errors,
        data["p50_us"] / 1000,
        data["p99_us"] / 1000,
        connections,
    )


# RSS sampling -----------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
        except OSError:
            continue
    return found


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        queue += _children(current)
    return pids


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(pid: int) -> int:
    """Summed VmRSS of ``pid`` and its descendants, in KiB."""
    return sum(rss_kib(each) for each in tree_pids(pid))


class RssSampler:
    """Samples a process tree's RSS on a thread every ``interval`` seconds while active."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (t, main KiB, tree KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            main = rss_kib(self.pid)
            tree = main + sum(rss_kib(child) for child in tree_pids(self.pid)[1:])
            self.samples.append((time.monotonic() - started, main, tree))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_kib(self) -> int:
        """Highest tree RSS seen."""
        return max(sample[2] for sample in self.samples)


def settled_rss_kib(pid: int, samples: int = 10, interval: float = 0.05) -> int:
    """Median tree RSS over a short quiet period: the baseline before a measurement."""
    values: list[int] = []
    for _ in range(samples):
        values.append(tree_rss_kib(pid))
        time.sleep(interval)
    return int(statistics.median(values))


# Profiling --------------------------------------------------------------------------------------


def py_spy_binary() -> str | None:
    """``py-spy`` from PATH or next to this interpreter (``pip install py-spy``), if any."""
    local = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(local) if local.exists() else None)


class PySpy:
    """``py-spy record --format raw`` of one process while the ``with`` block runs."""

    def __init__(self, pid: int, output: Path, rate: int = 200) -> None:
        binary = py_spy_binary()
        if binary is None:
            raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
        self.args = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--threads"]
        self.args += ["--nonblocking", "--format", "raw", "--output", str(output)]
        self.output = output
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PySpy:
        self.process = subprocess.Popen(
            self.args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(1.0)  # attaching takes a moment
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_process(self.process)


def top_frames(collapsed: Path, count: int = 12) -> list[tuple[float, str]]:
    """Share of samples per innermost frame (own time) in py-spy's collapsed-stack output."""
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        own[stack.split(";")[-1]] += int(samples)
        total += int(samples)
    return [(100 * n / total, frame) for frame, n in own.most_common(count)] if total else []


# Machine facts ----------------------------------------------------------------------------------


def command_output(args: Sequence[str]) -> str:
    """First line of a command's combined output, or "n/a"."""
    try:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0] if text else "n/a"


def code_version(root: Path) -> str:
    """``git describe``-like id of the code measured, flagging uncommitted package changes."""
    commit = command_output(["git", "-C", str(root), "log", "-1", "--format=%h %ci %s"])
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "depproxy_pyramid"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return commit + (" (plus uncommitted changes in depproxy_pyramid/)" if dirty else "")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as in ``uptime``."""
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def machine_facts() -> dict[str, str]:
    """CPU, cores, memory, kernel, tool versions and the date, for the report."""
    cpu = "n/a"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    free = subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout
    return {
        "date": command_output(["date", "-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        "load average at start": load_average(),
        "cpu": cpu,
        "nproc": command_output(["nproc"]),
        "free -h": free.rstrip(),
        "kernel": command_output(["uname", "-sr"]),
        "docker-registry": command_output(["docker-registry", "--version"]),
        "skopeo": command_output(["skopeo", "--version"]),
        "nginx": command_output(["nginx", "-v"]),
        "wrk": command_output(["wrk", "--version"]).split(" Copyright")[0],
    }
