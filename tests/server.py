"""The proxy as a real server process started from an ini file, as an operator would run it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition, timeout: float = 15) -> None:
    """Return once `condition()` is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def stop_process(process: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM the process group `process` was started in, then SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_ini(
    path: Path,
    settings: Mapping[str, str],
    port: int,
    app_use: str = "egg:depproxy-pyramid",
    extra_sections: str = "",
    server_options: Mapping[str, str] | None = None,
) -> Path:
    """An ini file as an operator writes one: the server runs with the runner's defaults
    unless `server_options` says otherwise."""
    app = "\n".join(f"{key} = {value}" for key, value in settings.items())
    server = "\n".join(f"{key} = {value}" for key, value in (server_options or {}).items())
    path.write_text(
        f"""[app:main]
use = {app_use}
{app}
{extra_sections}
[server:main]
use = egg:depproxy-pyramid#main
listen = 127.0.0.1:{port}
{server}

[loggers]
keys = root, depproxy_pyramid

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARN
handlers = console

[logger_depproxy_pyramid]
level = INFO
handlers =
qualname = depproxy_pyramid

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(asctime)s %(levelname)-5.5s [%(name)s:%(threadName)s] %(message)s
"""
    )
    return path


def admin(ini: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "depproxy-admin"), str(ini), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


class ServerProcess:
    """`pserve INI` (or another command serving on `port`) in its own process group; stopped
    with SIGTERM, then SIGKILL."""

    def __init__(
        self,
        ini: Path | None,
        port: int,
        log_path: Path,
        command: list[str] | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.ini = ini
        self.command = command or [str(BIN / "pserve"), str(ini)]
        self.environment = environment or {}
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> ServerProcess:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("already started: a second process would be left running")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child for its lifetime
        self.process = subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # The repository root on the path: test hosts live in the `tests` package.
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT),
                **self.environment,
            },
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited early:\n{self.log()}")
            if self.answers():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.command[0]} did not answer within {timeout}s:\n{self.log()}")

    def answers(self) -> bool:
        """Whether the server answers HTTP yet (any status will do)."""
        try:
            requests.get(f"{self.url}/v2/", timeout=1)
        # A server may accept connections before it can answer (gunicorn's workers boot after
        # the master listens).
        except (requests.ConnectionError, requests.Timeout):
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        """The log once it holds `text`. An access line is written when its response's body is
        done, just after the client has the last byte: a test reading it must wait."""
        wait_for(lambda: text in self.log_path.read_text(errors="replace"), timeout)
        return self.log()

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
