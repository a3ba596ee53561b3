import pytest

from depproxy_pyramid import credentials
from depproxy_pyramid.credentials import (
    RecentlyVerified,
    decrypt_secret,
    encrypt_secret,
    hash_password,
    verify_password,
)


def test_password_hashes_verify_only_their_password():
    encoded = hash_password("s3cret")
    assert encoded.startswith("scrypt$")
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)
    assert hash_password("s3cret") != encoded  # salted
    assert not verify_password("s3cret", "scrypt$garbage")
    assert not verify_password("s3cret", "bcrypt$1$2$3$4$5")


@pytest.fixture
def scrypt_calls(monkeypatch):
    calls = []
    real = credentials.verify_password

    def counting(password, encoded):
        calls.append(password)
        return real(password, encoded)

    monkeypatch.setattr(credentials, "verify_password", counting)
    return calls


def test_recently_verified_skips_scrypt_only_for_the_same_pair(scrypt_calls):
    cache = RecentlyVerified()
    encoded = hash_password("right")
    assert cache.verify("right", encoded)
    assert cache.verify("right", encoded)
    assert scrypt_calls == ["right"]
    assert not cache.verify("wrong", encoded)
    assert not cache.verify("wrong", encoded)
    assert scrypt_calls == ["right", "wrong", "wrong"]
    changed = hash_password("right")
    assert cache.verify("right", changed)
    assert len(scrypt_calls) == 4


def test_recently_verified_forgets(scrypt_calls):
    expired = RecentlyVerified(ttl_seconds=-1)
    encoded = hash_password("pw")
    assert expired.verify("pw", encoded) and expired.verify("pw", encoded)
    assert len(scrypt_calls) == 2
    small = RecentlyVerified(max_entries=1)
    other = hash_password("other")
    assert small.verify("pw", encoded) and small.verify("other", other)
    assert small.verify("pw", encoded)
    assert len(scrypt_calls) == 5


def test_upstream_secrets_round_trip_only_under_the_same_key():
    sealed = encrypt_secret("k" * 40, "upstream-password")
    assert "upstream-password" not in sealed
    assert decrypt_secret("k" * 40, sealed) == "upstream-password"
    assert decrypt_secret("other" * 10, sealed) is None
    assert decrypt_secret("k" * 40, sealed[:-4] + "AAAA") is None
