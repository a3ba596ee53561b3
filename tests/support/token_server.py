"""A small Docker token-auth server (distribution docs/spec/auth/token.md) for tests.

The real ``docker-registry`` delegates authorisation to it, so the proxy under test
goes through the same 401 -> token -> retry dance as against Docker Hub. The policy
copies Docker Hub's: anonymous pull of public repositories, credentials needed for
repositories under a private prefix (missing credentials get a token with no access),
bad credentials get 401, and only the admin user may push.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import threading
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ISSUER = "depproxy-test-token-issuer"
TOKEN_TTL = 300


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """Key ID as docker/libtrust computes it, which distribution 2.8 matches ``kid`` against.

    SHA-256 of the DER SubjectPublicKeyInfo, truncated to 240 bits, base32-encoded
    and split into 12 groups of 4 characters joined by ':'.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered, for tests to assert on."""

    account: str | None
    service: str | None
    scopes: tuple[str, ...]
    status: int
    granted: tuple[dict[str, Any], ...] = ()


@dataclass
class TokenPolicy:
    """Who may do what: Docker Hub-like anonymous pull plus private repositories."""

    private_prefix: str = "private/"
    username: str = "puller"
    password: str = "puller-secret"
    admin_username: str = "admin"
    admin_password: str = "admin-secret"

    def check_user(self, username: str, password: str) -> bool:
        """Whether the Basic credentials are valid."""
        users = {self.username: self.password, self.admin_username: self.admin_password}
        return users.get(username) == password

    def allowed(self, account: str | None, repository: str, action: str) -> bool:
        """Whether ``account`` (None for anonymous) may perform ``action`` on ``repository``."""
        if account == self.admin_username:
            return True
        if action != "pull":
            return False
        if repository.startswith(self.private_prefix):
            return account is not None
        return True


def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """Split ``type:name:actions``; names may contain ':' (registry host with port)."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not (sep and sep2 and name):
        return None
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Threaded HTTP token server on a free 127.0.0.1 port, with its signing material."""

    def __init__(self, workdir: Path, policy: TokenPolicy | None = None) -> None:
        self.policy = policy or TokenPolicy()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Public so tests can forge tokens (bad kid, expired) the registry must reject.
        self.signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = libtrust_key_id(self.signing_key.public_key())
        self.cert_path = self.workdir / "token-cert.pem"
        self.cert_path.write_bytes(self._certificate().public_bytes(serialization.Encoding.PEM))
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        """The URL the registry sends clients to in ``WWW-Authenticate``."""
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def issuer(self) -> str:
        """The ``iss`` claim the registry must be configured to trust."""
        return ISSUER

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot of every token request answered so far."""
        with self._lock:
            return list(self._requests)

    def count(self) -> int:
        """How many token requests were answered since the last reset."""
        with self._lock:
            return len(self._requests)

    def reset(self) -> None:
        """Forget logged requests."""
        with self._lock:
            self._requests.clear()

    def grant(self, account: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        """The ``access`` claim: requested repository actions that the policy allows."""
        access = []
        for scope in scopes:
            parsed = _parse_scope(scope)
            if parsed is None or parsed[0] != "repository":
                continue
            kind, name, actions = parsed
            granted = [a for a in actions if self.policy.allowed(account, name, a)]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        return access

    def issue(
        self, account: str | None, service: str | None, access: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Return the JSON body of a token response carrying an RS256 JWT."""
        now = dt.datetime.now(dt.UTC)
        claims = {
            "iss": ISSUER,
            "sub": account or "",
            "aud": service or "",
            "exp": int(now.timestamp()) + TOKEN_TTL,
            "nbf": int(now.timestamp()) - 10,
            "iat": int(now.timestamp()),
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = jwt.encode(
            claims, self.signing_key, algorithm="RS256", headers={"kid": self.key_id}
        )
        return {
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_TTL,
            "issued_at": now.isoformat().replace("+00:00", "Z"),
        }

    def _log(self, entry: TokenRequest) -> None:
        with self._lock:
            self._requests.append(entry)

    def _certificate(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "depproxy test token signer")])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.signing_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(self.signing_key, hashes.SHA256())
        )

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path != "/token":
                    self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})
                    return
                query = parse_qs(url.query)
                service = query.get("service", [None])[0]
                scopes = [s for value in query.get("scope", []) for s in value.split(" ")]
                valid, account = self._authenticate()
                if not valid:
                    server._log(TokenRequest(account, service, tuple(scopes), 401))
                    self._reply(
                        HTTPStatus.UNAUTHORIZED,
                        {"details": "incorrect username or password"},
                        {"WWW-Authenticate": f'Basic realm="{server.realm}"'},
                    )
                    return
                access = server.grant(account, scopes)
                server._log(TokenRequest(account, service, tuple(scopes), 200, tuple(access)))
                self._reply(HTTPStatus.OK, server.issue(account, service, access))

            def _authenticate(self) -> tuple[bool, str | None]:
                """``(valid, username)``; anonymous requests are valid with no username."""
                header = self.headers.get("Authorization")
                if header is None:
                    return True, None
                scheme, _, value = header.partition(" ")
                try:
                    decoded = base64.b64decode(value, validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    return False, None
                username, sep, password = decoded.partition(":")
                valid = scheme.lower() == "basic" and bool(sep)
                return valid and server.policy.check_user(username, password), username or None

            def _reply(
                self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                """Keep pytest output clean; requests are logged in ``server.requests``."""

        return Handler
