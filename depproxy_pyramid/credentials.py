"""Secrets at rest: password hashes, token digests, encrypted upstream passwords."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .caching import MISSING, BoundedCache

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
PERSONAL_TOKEN_PREFIX = "dpat-"
DEPLOY_TOKEN_PREFIX = "dpdt-"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return "$".join(
        [
            "scrypt",
            str(_SCRYPT_N),
            str(_SCRYPT_R),
            str(_SCRYPT_P),
            base64.b64encode(salt).decode(),
            base64.b64encode(digest).decode(),
        ]
    )


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, expected = encoded.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, base64.b64decode(expected))


class RecentlyVerified:
    """Remembers (stored hash, password) pairs that verified, for a few minutes.

    CI fleets log in with the same credentials for every pull; a remembered pair skips the
    deliberately slow scrypt check (about 40 ms of CPU and 16 MiB of memory each). Entries are
    keyed by an HMAC under a per-process key, so the cache holds no password, and a changed
    password hash no longer matches.
    """

    def __init__(self, ttl_seconds: float = 300, max_entries: int = 10_000) -> None:
        self._key = secrets.token_bytes(32)
        self._verified: BoundedCache[bytes, bool] = BoundedCache(max_entries, ttl=ttl_seconds)

    def verify(self, password: str, encoded: str) -> bool:
        key = hmac.new(self._key, f"{encoded}\0{password}".encode(), hashlib.sha256).digest()
        if self._verified.get(key) is not MISSING:
            return True
        if not verify_password(password, encoded):
            return False
        self._verified.put(key, True)
        return True


# Spent on unknown user names so a miss takes as long as a wrong password.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def burn_password_check(password: str) -> None:
    verify_password(password, _DUMMY_HASH)


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """Tokens are high-entropy, so a plain SHA-256 is a safe lookup key for them."""
    return hashlib.sha256(token.encode()).hexdigest()


def _fernet(secret: str) -> Fernet:
    key = hashlib.sha256(b"depproxy-upstream-credentials\0" + secret.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


class Keyring:
    """Upstream passwords at rest: encrypted under the newest secret, readable under any.

    Each secret becomes a Fernet key as version 0.1 derived it from `depproxy.jwt.secret`, so
    its data still decrypts while that secret is listed.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is needed")
        self._fernet = MultiFernet([_fernet(key) for key in keys])

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str | None:
        """None when no key decrypts it (made under another key, or tampered with)."""
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except (InvalidToken, ValueError):
            return None

    def rotate(self, ciphertext: str) -> str | None:
        """The same plaintext encrypted under the newest key; None when no key decrypts it."""
        try:
            return self._fernet.rotate(ciphertext.encode()).decode()
        except (InvalidToken, ValueError):
            return None
