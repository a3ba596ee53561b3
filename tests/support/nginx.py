"""A real nginx running the shipped `deploy/nginx/depproxy.conf`, in a private prefix.

The file is rendered for the test by replacing the values an operator edits (the app's
addresses, the storage root, certificate and key, listen ports, server name, access log) and
nothing else; a value missing from the file fails the render, so the tests never exercise a
configuration that silently drifted from the shipped one. nginx runs in the foreground as
`nginx -p PREFIX -c nginx.conf`, where nginx.conf is what Debian's would be around the file:
its worker and sendfile defaults, an `events` block and an `http` block that includes it. The
certificate is signed by a CA made here, which clients are given to verify against. The
benchmark (bench/) runs this same front, and its static-file nginx on `NginxProcess`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.server import ROOT, ServerProcess, free_port

CONFIG = ROOT / "deploy" / "nginx" / "depproxy.conf"
# The storage location nginx's internal location serves; the app's accel_redirect setting.
ACCEL_PREFIX = "/_depproxy/storage/"
# The app's servers as the shipped file lists them, one line per process.
SHIPPED_APP_SERVERS = "".join(f"    server 127.0.0.1:{port};\n" for port in (6543, 6544, 6545))


def render(text: str, substitutions: dict[str, str]) -> str:
    """`text` with each key replaced by its value; every key must occur in it."""
    for old, new in substitutions.items():
        if old not in text:
            raise RuntimeError(
                f"{old!r} not found in {CONFIG}: the file no longer has the value the tests "
                "(and the operator instructions at its top) expect to replace"
            )
        text = text.replace(old, new)
    return text


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signs for `127.0.0.1` and `localhost`.

    Returns the CA certificate, the server certificate and the server key paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("depproxy test CA"))
        .issuer_name(_name("depproxy test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path = directory / "ca.pem", directory / "server.pem"
    key_path = directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def nginx_binary() -> str:
    """Debian's nginx, or a clear error naming the package to install."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(binary, os.X_OK):
        raise RuntimeError("nginx not found: bin/test installs it (Debian package nginx-light)")
    return binary


class NginxProcess(ServerProcess):
    """nginx in the foreground from `prefix`, with `http` as the content of its `http` block.

    The main file around it keeps Debian's nginx.conf defaults that bear on serving (worker
    processes and connections, sendfile) and moves its temporary paths into the prefix.
    """

    def __init__(self, prefix: Path, http: str, port: int) -> None:
        binary = nginx_binary()
        prefix.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        temp = prefix / "temp"
        temp.mkdir()
        # Run as root, nginx's workers would switch to `nobody`, which cannot enter pytest's
        # private (0700) temporary directories where the storage lives.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(
            f"{user}pid {prefix / 'nginx.pid'};\n"
            "error_log stderr info;\n"
            "worker_processes auto;\n"
            "events { worker_connections 768; }\n"
            "http {\n"
            "    sendfile on;\n"
            "    tcp_nopush on;\n"
            # Debian's nginx.conf sets these paths under /var/lib/nginx; the test keeps its own.
            f"    client_body_temp_path {temp / 'body'};\n"
            f"    proxy_temp_path {temp / 'proxy'};\n"
            f"    fastcgi_temp_path {temp / 'fastcgi'};\n"
            f"    uwsgi_temp_path {temp / 'uwsgi'};\n"
            f"    scgi_temp_path {temp / 'scgi'};\n"
            f"{http}\n"
            "}\n"
        )
        super().__init__(
            None,
            port,
            prefix / "nginx.log",
            command=[
                binary,
                "-p", str(prefix),
                "-e", "stderr",
                "-c", str(prefix / "nginx.conf"),
                "-g", "daemon off;",
            ],
        )  # fmt: skip


class Nginx(NginxProcess):
    """nginx with the shipped file, in front of the app's processes at `app_ports`, serving
    `storage` (the filesystem storage's root; unused with S3)."""

    def __init__(
        self,
        prefix: Path,
        app_ports: Sequence[int],
        storage: Path,
        https_port: int | None = None,
    ) -> None:
        prefix.mkdir(parents=True, exist_ok=True)
        self.ca, cert, key = write_certificates(prefix / "tls")
        # Clients of the containers/image family read CA certificates from `*.crt` in a
        # directory (--cert-dir, --src-cert-dir).
        self.cert_dir = prefix / "certs.d"
        self.cert_dir.mkdir()
        shutil.copy(self.ca, self.cert_dir / "ca.crt")
        self.https_port, self.http_port = https_port or free_port(), free_port()
        self.access_log_path = prefix / "access.log"
        rendered = render(
            CONFIG.read_text(),
            {
                SHIPPED_APP_SERVERS: "".join(
                    f"    server 127.0.0.1:{port};\n" for port in app_ports
                ),
                "/var/lib/depproxy/storage/": f"{storage}/",
                "/etc/ssl/certs/depproxy.pem": str(cert),
                "/etc/ssl/private/depproxy.key": str(key),
                "listen 443 ssl": f"listen 127.0.0.1:{self.https_port} ssl",
                "listen 80;": f"listen 127.0.0.1:{self.http_port};",
                "server_name registry.example.com": "server_name localhost",
                "/var/log/nginx/depproxy.access.log": str(self.access_log_path),
            },
        )
        (prefix / "depproxy.conf").write_text(rendered)
        super().__init__(prefix, f"    include {prefix / 'depproxy.conf'};", self.https_port)
        self.url = f"https://127.0.0.1:{self.https_port}"
        self.host = f"127.0.0.1:{self.https_port}"

    def answers(self) -> bool:
        try:
            requests.get(f"{self.url}/v2/", timeout=1, verify=str(self.ca))
        except requests.ConnectionError:
            return False
        return True

    def get(self, path: str, method: str = "GET", **kw) -> requests.Response:
        """A request over HTTPS, verified against the test CA."""
        return requests.request(
            method, f"{self.url}{path}", verify=str(self.ca), timeout=kw.pop("timeout", 60), **kw
        )

    def access_log(self) -> list[str]:
        return self.access_log_path.read_text().splitlines()
