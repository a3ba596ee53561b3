"""Fleet-wide single-flight: who fetches something from upstream, agreed through the database.

Every process and node shares the database, so a row in `depproxy_leases` names the one
process fetching a blob or manifest; the others wait for it to finish and then serve what it
stored. The owner renews its leases while it works; a crashed owner stops renewing, its lease
expires after `LEASE_SECONDS`, and a waiting process takes it over. A lease only decides who
asks upstream: what is committed is verified either way, so two owners (one taking over from
a process that was merely slow) store the same bytes twice, never different ones.

Expiry is judged by each node's clock, which is why the lease lasts several renewal periods:
clocks kept by NTP differ by milliseconds.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from ..models import Lease

log = logging.getLogger(__name__)

LEASE_SECONDS = 10.0
RENEW_SECONDS = LEASE_SECONDS / 4
# How often a waiting process looks again: quick at first, a fetch of a manifest or a small
# layer takes tens of milliseconds; then slower, a large layer takes minutes.
FIRST_POLL_SECONDS = 0.05
LAST_POLL_SECONDS = 0.5
_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


class HeldLease:
    """A lease this process holds until `release`."""

    def __init__(self, leases: Leases, key: str, owner: str) -> None:
        self._leases = leases
        self.key = key
        self.owner = owner

    def release(self) -> None:
        self._leases.release(self)


class Leases:
    """The leases of one process: taking them, renewing them in the background, waiting for
    other processes' leases to end."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory
        # The pid in the middle lets an operator (or a test) find the process doing a fetch.
        self._process = f"{socket.gethostname()}:{os.getpid()}"
        self._held: dict[str, HeldLease] = {}
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def try_acquire(self, key: str) -> HeldLease | None:
        """The lease on `key`, when no other live owner holds it; None otherwise."""
        owner = f"{self._process}:{secrets.token_hex(4)}"
        now = datetime.now(UTC)
        expires_at = now + timedelta(seconds=LEASE_SECONDS)
        with self._session_factory() as session, session.begin():
            insert = _INSERTS[session.get_bind().dialect.name]
            # Not a plain INSERT: PostgreSQL would log each lost race as an error.
            inserted = session.scalar(
                insert(Lease)
                .values(key=key, owner=owner, expires_at=expires_at)
                .on_conflict_do_nothing(index_elements=[Lease.key])
                .returning(Lease.key)
            )
        if inserted is None:
            # Held, or left by a dead owner: take it over only if it has expired, in one
            # conditional update so that of several processes trying, one wins.
            with self._session_factory() as session, session.begin():
                taken = session.execute(
                    update(Lease)
                    .where(Lease.key == key, Lease.expires_at < now)
                    .values(owner=owner, expires_at=expires_at)
                    .execution_options(synchronize_session=False)
                ).rowcount
            if not taken:
                return None
            log.warning("took over the expired lease on %s: its owner stopped renewing it", key)
        lease = HeldLease(self, key, owner)
        with self._lock:
            self._held[owner] = lease
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_forever, name="lease-renewer", daemon=True
                )
                self._renewer.start()
        return lease

    def release(self, lease: HeldLease) -> None:
        with self._lock:
            self._held.pop(lease.owner, None)
        try:
            with self._session_factory() as session, session.begin():
                session.execute(
                    delete(Lease).where(Lease.key == lease.key, Lease.owner == lease.owner)
                )
        except Exception:
            # It expires on its own; waiters then take over and find the work done.
            log.exception("could not release the lease on %s", lease.key)

    def wait_until_free(self, key: str) -> None:
        """Return when the lease on `key` is gone or has expired."""
        pause = FIRST_POLL_SECONDS
        while True:
            with self._session_factory() as session:
                expires_at = session.scalar(select(Lease.expires_at).where(Lease.key == key))
            if expires_at is None or expires_at < datetime.now(UTC):
                return
            time.sleep(pause)
            pause = min(pause * 2, LAST_POLL_SECONDS)

    def _renew_forever(self) -> None:
        while True:
            time.sleep(RENEW_SECONDS)
            with self._lock:
                owners = list(self._held)
            if not owners:
                continue
            expires_at = datetime.now(UTC) + timedelta(seconds=LEASE_SECONDS)
            try:
                with self._session_factory() as session, session.begin():
                    session.execute(
                        update(Lease)
                        .where(Lease.owner.in_(owners))
                        .values(expires_at=expires_at)
                        .execution_options(synchronize_session=False)
                    )
            except Exception:
                log.exception("could not renew %d leases; retrying", len(owners))
