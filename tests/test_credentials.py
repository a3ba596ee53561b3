import base64
import hashlib

import pytest
from cryptography.fernet import Fernet

from depproxy_pyramid import credentials
from depproxy_pyramid.credentials import (
    Keyring,
    RecentlyVerified,
    hash_password,
    verify_password,
)

OLD, NEW = "old-secret-" + "o" * 30, "new-secret-" + "n" * 30


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
    sealed = Keyring(["k" * 40]).encrypt("upstream-password")
    assert "upstream-password" not in sealed
    assert Keyring(["k" * 40]).decrypt(sealed) == "upstream-password"
    assert Keyring(["other" * 10]).decrypt(sealed) is None
    assert Keyring(["k" * 40]).decrypt(sealed[:-4] + "AAAA") is None
    assert Keyring(["k" * 40]).decrypt("not a token") is None


def test_the_newest_key_encrypts_and_every_listed_key_decrypts():
    under_old = Keyring([OLD]).encrypt("pw-old")
    both = Keyring([NEW, OLD])
    assert both.decrypt(under_old) == "pw-old"
    under_new = both.encrypt("pw-new")
    assert Keyring([NEW]).decrypt(under_new) == "pw-new"
    assert Keyring([OLD]).decrypt(under_new) is None


def test_rotate_re_encrypts_under_the_newest_key_or_says_it_cannot():
    under_old = Keyring([OLD]).encrypt("pw")
    rotated = Keyring([NEW, OLD]).rotate(under_old)
    assert rotated is not None and rotated != under_old
    assert Keyring([NEW]).decrypt(rotated) == "pw"
    assert Keyring([NEW]).rotate(under_old) is None


def test_version_0_1_ciphertexts_decrypt_while_the_jwt_secret_is_listed():
    jwt_secret = "jwt-secret-" + "j" * 30
    # Exactly how 0.1 sealed a group's upstream password under depproxy.jwt.secret.
    key = hashlib.sha256(b"depproxy-upstream-credentials\0" + jwt_secret.encode()).digest()
    sealed = Fernet(base64.urlsafe_b64encode(key)).encrypt(b"pw-0.1").decode()
    assert Keyring([jwt_secret]).decrypt(sealed) == "pw-0.1"
    assert Keyring([NEW, jwt_secret]).decrypt(sealed) == "pw-0.1"
    assert Keyring([NEW]).decrypt(sealed) is None


def test_a_keyring_needs_a_key():
    with pytest.raises(ValueError, match="at least one"):
        Keyring([])
