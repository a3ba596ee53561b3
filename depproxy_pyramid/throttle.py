"""Bounds on sign-in abuse: failed sign-ins per user name and per client address, and how many
slow password checks run at once.

The state lives in the process: each server process counts on its own, so N processes allow up
to N times the configured failures, and a restart forgets them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from pyramid.request import Request
from zope.interface import Interface, implementer

from .addresses import Address, client_address
from .settings import Settings

log = logging.getLogger(__name__)

# Each tracked key costs a few hundred bytes: this caps the memory at a few MiB per log.
MAX_TRACKED_KEYS = 10_000
MAX_KEY_LENGTH = 256
# How long a sign-in waits for a password-check slot before it is refused.
PASSWORD_CHECK_WAIT_SECONDS = 2.0
BUSY_RETRY_AFTER_SECONDS = 1
# Where the security policy leaves a refusal for the token view to answer.
SIGN_IN_REFUSAL = "depproxy.sign_in_refusal"
_ATTEMPT = "depproxy.sign_in_attempt"

Clock = Callable[[], float]
T = TypeVar("T")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _malloc_trim()


def _check_and_give_back_memory(check: Callable[..., T], *args: object) -> T:
    try:
        return check(*args)
    finally:
        # scrypt's 16 MiB would otherwise stay with the thread's malloc arena: resident
        # memory grows by about 30 MiB per checking thread and never shrinks (a few ms).
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)


class SignInRefused(Exception):
    """A sign-in turned away before its password was checked; answered with a 429."""

    def __init__(self, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.message = message


class FailureLog:
    """When each key failed, within a sliding window; a key is blocked at `max_failures`.

    At most `max_keys` keys are tracked: past that, the key whose last failure is oldest is
    forgotten first.
    """

    def __init__(
        self,
        max_failures: int,
        window_seconds: float,
        max_keys: int = MAX_TRACKED_KEYS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self.max_keys = max_keys
        self.clock = clock
        # Only the newest `max_failures` times of a key are kept: older ones cannot matter.
        self._failures: OrderedDict[str, tuple[float, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, key: str, now: float | None = None) -> int | None:
        """Whole seconds until `key` may try again, or None when it may try now."""
        now = self.clock() if now is None else now
        with self._lock:
            times = self._failures.get(key, ())
        if len(times) < self.max_failures:
            return None
        reopens = times[-self.max_failures] + self.window
        return max(1, math.ceil(reopens - now)) if reopens > now else None

    def record(self, key: str, now: float | None = None) -> bool:
        """Count a failure of `key` at `now`; True when this one reached the limit."""
        now = self.clock() if now is None else now
        with self._lock:
            recent = tuple(t for t in self._failures.pop(key, ()) if t > now - self.window)
            times = (*recent, now)[-self.max_failures :]
            self._failures[key] = times
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
        return len(recent) < self.max_failures <= len(times)

    def forgive(self, key: str, when: float) -> None:
        """Take back the failure recorded for `key` at `when`, if it is still there."""
        with self._lock:
            times = list(self._failures.get(key, ()))
            if when in times:
                times.remove(when)
                self._failures[key] = tuple(times)


def account_key(username: str) -> str:
    # Case-folded: a source that matches names without regard to case must not give an
    # attacker a fresh allowance per spelling.
    return "user:" + username.casefold()[:MAX_KEY_LENGTH]


def address_key(address: Address | None) -> str:
    if address is None:
        return "address:unknown"
    if isinstance(address, ipaddress.IPv6Address):
        # One IPv6 host usually has a whole /64 to pick addresses from.
        return f"address:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"address:{address}"


@dataclass
class _Attempt:
    # None for a credential without a user name (an API token): the address alone counts.
    account: str | None
    address: str
    # When its password check counted it as a failure in advance, if it did.
    counted_at: float | None = None


class ISignInGuard(Interface):
    """The process's sign-in limits (see `SignInGuard`)."""


@implementer(ISignInGuard)
class SignInGuard:
    """Failed sign-ins per user name and per client address, and the password-check slots.

    A password check counts as a failure from the moment it starts, and is taken back when it
    succeeds: checks running side by side cannot overshoot the limit between them.

    The checks run on `password_checks` threads of the guard's own, which give the memory of
    each check back afterwards: spread over every server thread, each thread kept what its last
    check allocated.
    """

    def __init__(
        self,
        max_failures: int,
        window_seconds: float,
        password_checks: int,
        trusted_proxies: tuple[str, ...] = (),
        clock: Clock = time.monotonic,
        wait_seconds: float = PASSWORD_CHECK_WAIT_SECONDS,
    ) -> None:
        self.accounts = FailureLog(max_failures, window_seconds, clock=clock)
        self.addresses = FailureLog(max_failures, window_seconds, clock=clock)
        self.trusted_proxies = trusted_proxies
        self.wait_seconds = wait_seconds
        self._clock = clock
        self._slots = threading.BoundedSemaphore(password_checks)
        self._checkers = ThreadPoolExecutor(password_checks, "depproxy-password-check")
        # Checking both limits and counting against both is one step.
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> SignInGuard:
        return cls(
            settings.auth_max_failures,
            settings.auth_failure_window_seconds,
            settings.auth_password_check_concurrency,
            settings.trusted_proxies,
        )

    def _refusal(self, attempt: _Attempt, now: float) -> SignInRefused | None:
        waits = [
            wait
            for wait in (
                (
                    self.accounts.retry_after(attempt.account, now)
                    if attempt.account is not None
                    else None
                ),
                self.addresses.retry_after(attempt.address, now),
            )
            if wait is not None
        ]
        if not waits:
            return None
        retry_after = max(waits)
        return SignInRefused(
            retry_after,
            "too many failed sign-ins for this user name or from this address; "
            f"retry in {retry_after} seconds",
        )

    def check(self, request: Request, username: str | None) -> None:
        """Raise SignInRefused when this user name or address is over its limit; a sign-in
        without a user name (a token alone) is limited by its address only."""
        attempt = _Attempt(
            account_key(username) if username is not None else None,
            address_key(client_address(request, self.trusted_proxies)),
        )
        request.environ[_ATTEMPT] = attempt
        refusal = self._refusal(attempt, self._clock())
        if refusal is not None:
            raise refusal

    def settle(self, request: Request, succeeded: bool) -> None:
        """The outcome of the attempt `check` let through."""
        attempt: _Attempt | None = request.environ.get(_ATTEMPT)
        if attempt is None:
            return
        if attempt.counted_at is not None:
            if succeeded:
                if attempt.account is not None:
                    self.accounts.forgive(attempt.account, attempt.counted_at)
                self.addresses.forgive(attempt.address, attempt.counted_at)
        elif not succeeded:
            self._count(attempt, self._clock())

    def _count(self, attempt: _Attempt, now: float) -> None:
        if attempt.account is not None and self.accounts.record(attempt.account, now):
            log.warning("sign-in limit reached for %s; refusing it for a while", attempt.account)
        if self.addresses.record(attempt.address, now):
            log.warning("sign-in limit reached for %s; refusing it for a while", attempt.address)

    def password_check(self, request: Request, check: Callable[..., T], *args: object) -> T:
        """`check(*args)` once one of the password-check slots is free.

        SignInRefused when none frees up soon, or when the limits were reached while this
        request waited for one.
        """
        if not self._slots.acquire(timeout=self.wait_seconds):
            raise SignInRefused(
                BUSY_RETRY_AFTER_SECONDS, "too many sign-ins at once; retry in a moment"
            )
        try:
            attempt: _Attempt | None = request.environ.get(_ATTEMPT)
            if attempt is not None and attempt.counted_at is None:
                with self._lock:
                    now = self._clock()
                    refusal = self._refusal(attempt, now)
                    if refusal is not None:
                        raise refusal
                    self._count(attempt, now)
                    attempt.counted_at = now
            return self._checkers.submit(_check_and_give_back_memory, check, *args).result()
        finally:
            self._slots.release()


def sign_in_guard(request: Request) -> SignInGuard:
    return request.registry.getUtility(ISignInGuard)


def password_check(request: Request, check: Callable[..., T], *args: object) -> T:
    """`check(*args)`, a deliberately slow password check, within the process's bounds.

    The add-on's own accounts use it; a host's account source may too. It raises
    SignInRefused, which the add-on's security policy answers with a 429.
    """
    return sign_in_guard(request).password_check(request, check, *args)
