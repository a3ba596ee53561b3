"""Several depproxy server processes on one database and one storage, behind the shipped nginx.

The deployment of README.md's "Production: nginx in front" scaled out, as tests/test_fleet.py
and bench/fleet.py run it::

    skopeo --TLS--> nginx (deploy/nginx/depproxy.conf) --> pserve x N --> upstream (a relay)
                                                              |    \\
                                                      PostgreSQL    S3 (moto) or a directory

Every process gets the same settings (database, storage, JWT secret, upstream) and a port of
its own; nginx's upstream block lists the ports, nothing else of the shipped file changes.
Each process is started directly (no shell, no runner in between), so its pid is the pid the
app itself sees (`os.getpid()`), and a lease's owner can be mapped to a process and killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.conftest import JWT_SECRET, Database
from tests.proxy import PROXY_MARKER, PULLER, Proxy, database_with_puller
from tests.server import ServerProcess, free_port, write_ini
from tests.support.nginx import Nginx
from tests.support.registry import skopeo
from tests.support_s3 import MotoS3

# The single-flight's lease rows, as the test sees them (the app's model is its own business).
LEASES = sa.table("depproxy_leases", sa.column("key"), sa.column("owner"))
ACCESS_LOGGER = "[depproxy_pyramid.access:"


@dataclass
class Fleet:
    """`members`: the server processes, each addressable on its own port; `front`: nginx."""

    members: list[Proxy]
    front: Nginx
    db: Database
    s3: MotoS3 | None
    bucket: str | None

    def new_group(self, path: str) -> str:
        """A fresh private group the puller belongs to (one database: every member sees it)."""
        return self.members[0].new_group(path)

    def ref(self, group: str, image: str) -> str:
        """`docker://` reference of `image` in `group`'s cache, through nginx."""
        return f"{self.front.host}/{group}/{PROXY_MARKER}/{image}"

    def member_with_pid(self, pid: int) -> Proxy:
        """The member whose server process has `pid`."""
        for member in self.members:
            if member.server.process is not None and member.server.process.pid == pid:
                return member
        pids = [m.server.process.pid for m in self.members if m.server.process is not None]
        raise AssertionError(f"pid {pid} is none of the fleet's processes {pids}")

    def lease_owner(self, key: str) -> str | None:
        """The `owner` of the lease row `key`, or None while there is none."""
        with self.db.engine.connect() as connection:
            return connection.execute(sa.select(LEASES.c.owner).where(LEASES.c.key == key)).scalar()

    def wait_for_lease(self, key: str, timeout: float) -> str:
        """The owner of the lease row `key` once there is one."""
        deadline = time.monotonic() + timeout
        while (owner := self.lease_owner(key)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no row {key!r} in {LEASES.name} within {timeout:.0f}s")
            time.sleep(0.05)
        return owner

    def access_lines(self, member: Proxy) -> list[str]:
        """The access-log lines `member` has written: one per request it answered."""
        text = member.server.log_path.read_text(errors="replace")
        return [line for line in text.splitlines() if ACCESS_LOGGER in line]

    def stored_objects(self) -> dict[str, bytes]:
        """Every object in the fleet's bucket, by key."""
        assert self.s3 is not None and self.bucket is not None, "an S3 fleet"
        client = self.s3.client()
        objects: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                body = client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"]
                objects[item["Key"]] = body.read()
        return objects

    def pending_multipart_uploads(self) -> list[dict[str, Any]]:
        """Multipart uploads begun in the bucket and neither completed nor aborted."""
        assert self.s3 is not None and self.bucket is not None, "an S3 fleet"
        answer = self.s3.client().list_multipart_uploads(Bucket=self.bucket)
        return answer.get("Uploads", [])

    def stop(self) -> None:
        self.front.stop()
        for member in self.members:
            member.server.stop()
        self.db.engine.dispose()


def start_fleet(
    workdir: Path,
    database_url: str,
    upstream_url: str,
    s3: MotoS3 | None,
    size: int = 3,
    s3_settings: Mapping[str, str] | None = None,
    extra_settings: Mapping[str, str] | None = None,
) -> Fleet:
    """`size` server processes and nginx in front, on a new (migrated) database.

    With `s3`, the processes share a bucket of their own made here (`s3_settings` adds
    `depproxy.storage.s3.*` keys); without, they share one storage directory, which nginx's
    internal location serves. `extra_settings` go into every process's ini file as they are.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    db = database_with_puller(database_url)
    https_port = free_port()
    storage = workdir / "storage"
    settings = {
        "sqlalchemy.url": database_url,
        "depproxy.storage": "filesystem",
        "depproxy.storage.path": str(storage),
        "depproxy.jwt.secret": JWT_SECRET,
        "depproxy.upstream.url": upstream_url,
        "depproxy.upstream.read_timeout": "5",
        "depproxy.external_url": f"https://127.0.0.1:{https_port}",
        "depproxy.trusted_proxies": "127.0.0.1",
    }
    bucket = None
    if s3 is not None:
        bucket = f"fleet-{secrets.token_hex(6)}"
        s3.client().create_bucket(Bucket=bucket)
        settings.update(s3.settings(bucket=bucket, **(s3_settings or {})))
    settings.update(extra_settings or {})
    members: list[Proxy] = []
    front: Nginx | None = None
    try:
        for number in range(size):
            port = free_port()
            ini = write_ini(workdir / f"server-{number}.ini", settings, port)
            server = ServerProcess(ini, port, workdir / f"server-{number}.log")
            members.append(Proxy(server, ini, db, storage))
            server.start()
        front = Nginx(workdir / "nginx", [m.server.port for m in members], storage, https_port)
        front.start()
    except BaseException:
        if front is not None:
            front.stop()
        for member in members:
            member.server.stop()
        db.engine.dispose()
        raise
    return Fleet(members, front, db, s3, bucket)


@contextlib.contextmanager
def throwaway_postgres(admin_url: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped on leaving the block.

    For bench/; tests use conftest's `postgres_database` fixture."""
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"depproxy_fleet_{secrets.token_hex(6)}"
    try:
        with engine.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def pull(
    reference: str, dest: Path, cert_dir: Path, attempts: int = 1
) -> subprocess.CompletedProcess[str]:
    """`skopeo copy` of `reference` over TLS into an OCI layout at `dest`, as the puller; the
    last attempt's result, whatever its exit status.

    A failed pull is run again from scratch, up to `attempts` in all, as a CI job is retried:
    a server that dies cuts the blobs it was sending short, and skopeo 1.9's own
    `--retry-times` does not retry that ("happened during read: unexpected EOF").
    """
    args = ["copy", "--quiet", f"--src-cert-dir={cert_dir}"]
    args += ["--dest-oci-accept-uncompressed-layers", f"--src-creds={PULLER[0]}:{PULLER[1]}"]
    for _ in range(attempts):
        shutil.rmtree(dest, ignore_errors=True)
        result = skopeo(*args, f"docker://{reference}", f"oci:{dest}:pulled", check=False)
        if result.returncode == 0:
            break
    return result


def concurrent_pulls(
    reference: str, dests: Sequence[Path], cert_dir: Path, attempts: int = 1
) -> list[subprocess.CompletedProcess[str]]:
    """One `pull` per destination, all at once; their results, in order."""
    with ThreadPoolExecutor(len(dests)) as pool:
        running = [pool.submit(pull, reference, d, cert_dir, attempts) for d in dests]
        return [each.result() for each in running]


def layout_blobs(layout: Path) -> dict[str, str]:
    """The blobs of an OCI layout (the manifest among them): file name -> sha256 of its bytes."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in (layout / "blobs" / "sha256").iterdir()
    }
