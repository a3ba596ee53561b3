"""Fleet-wide leases on SQLite and PostgreSQL: one owner at a time, taken over once expired,
renewed while held, waited for until they end."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from depproxy_pyramid.models import Lease
from depproxy_pyramid.services import leases as leases_module
from depproxy_pyramid.services.leases import LEASE_SECONDS, RENEW_SECONDS, Leases


def row(database, key: str) -> Lease | None:
    with database.session_factory() as session:
        return session.scalar(select(Lease).where(Lease.key == key))


def expire(database, key: str) -> None:
    with database.session_factory() as session, session.begin():
        session.execute(
            update(Lease)
            .where(Lease.key == key)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def test_one_owner_at_a_time_until_released(database):
    leases, other_process = Leases(database.session_factory), Leases(database.session_factory)
    held = leases.try_acquire("blob:one")
    assert held is not None
    assert other_process.try_acquire("blob:one") is None
    assert leases.try_acquire("blob:one") is None  # also for another request of this process
    stored = row(database, "blob:one")
    # The owner names the host and process, for an operator looking at a stuck fetch.
    assert stored.owner.split(":")[1] == str(os.getpid())
    assert stored.expires_at > datetime.now(UTC) + timedelta(seconds=LEASE_SECONDS - 2)

    held.release()
    assert row(database, "blob:one") is None
    again = other_process.try_acquire("blob:one")
    assert again is not None
    again.release()


def test_an_expired_lease_is_taken_over_once(database):
    dead = Leases(database.session_factory).try_acquire("blob:dead")
    expire(database, "blob:dead")
    contenders = [Leases(database.session_factory) for _ in range(8)]
    with ThreadPoolExecutor(len(contenders)) as pool:
        taken = pool.map(lambda contender: contender.try_acquire("blob:dead"), contenders)
        won = [lease for lease in taken if lease is not None]
    assert len(won) == 1
    assert row(database, "blob:dead").owner == won[0].owner
    # The dead owner's release, should it come after all, leaves the new owner's lease alone.
    dead.release()
    assert row(database, "blob:dead").owner == won[0].owner
    won[0].release()


def test_concurrent_first_takers_get_one_lease(database):
    contenders = [Leases(database.session_factory) for _ in range(8)]
    with ThreadPoolExecutor(len(contenders)) as pool:
        taken = pool.map(lambda contender: contender.try_acquire("blob:race"), contenders)
        won = [lease for lease in taken if lease is not None]
    assert len(won) == 1
    won[0].release()


def test_a_held_lease_is_renewed_and_a_released_one_is_not(database, monkeypatch):
    monkeypatch.setattr(leases_module, "RENEW_SECONDS", 0.2)
    leases = Leases(database.session_factory)
    held, released = leases.try_acquire("blob:kept"), leases.try_acquire("blob:gone")
    first = row(database, "blob:kept").expires_at
    released.release()
    time.sleep(0.5)
    assert row(database, "blob:kept").expires_at > first
    assert row(database, "blob:gone") is None
    held.release()
    assert RENEW_SECONDS * 3 < LEASE_SECONDS  # a missed renewal or two is no takeover


def test_waiting_ends_when_the_lease_ends_or_expires(database):
    leases = Leases(database.session_factory)
    held = leases.try_acquire("blob:wait")
    threading.Timer(0.3, held.release).start()
    started = time.monotonic()
    Leases(database.session_factory).wait_until_free("blob:wait")
    assert 0.25 < time.monotonic() - started < 5

    leases.try_acquire("blob:expiring")
    threading.Timer(0.3, expire, (database, "blob:expiring")).start()
    started = time.monotonic()
    Leases(database.session_factory).wait_until_free("blob:expiring")
    assert 0.25 < time.monotonic() - started < 5
