"""Run a real CNCF distribution (``docker-registry``) as the upstream for proxy tests.

Using the real registry, rather than a mock, keeps the proxy honest about the
Registry API details (401 challenges, digests, media types, HEAD, Range). The
registry authenticates with :mod:`tests.support.token_server` and is seeded with
``skopeo copy`` from layouts built by :mod:`tests.support.oci`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from tests.server import free_port, stop_process
from tests.support.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    ImageIndex,
)
from tests.support.token_server import TokenServer

SERVICE = "test-registry"
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])
_ACCESS_LOG = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def require_binary(name: str) -> str:
    """Return the path of a required tool, failing loudly (CI installs it) if absent."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name!r} not found on PATH: the upstream-registry tests need it "
            "(Debian packages: docker-registry, skopeo)"
        )
    return path


@functools.cache
def _empty_auth_file() -> str:
    fd, path = tempfile.mkstemp(prefix="depproxy-skopeo-auth-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        out.write('{"auths": {}}')
    return path


def skopeo(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run skopeo isolated from the host's auth and registry config.

    ``--tls-verify=false`` style flags are the caller's job; an empty auth file keeps
    host credentials from leaking into "anonymous" pulls.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["REGISTRY_AUTH_FILE"] = _empty_auth_file()
    result = subprocess.run(
        [require_binary("skopeo"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)} failed:\n{result.stderr}")
    return result


def skopeo_pull(
    reference: str,
    dest: Path,
    creds: tuple[str, str] | None = None,
    all: bool = False,  # named after skopeo's --all
    check: bool = True,
    cert_dir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Pull ``host:port/repo:ref`` into an OCI layout at ``dest``: over plain HTTP, or over
    TLS verified against the CA certificates (``*.crt``) in ``cert_dir``.

    This is a complete client pull (manifest, config and every layer, digests verified),
    so it is how tests exercise a registry or the proxy end to end.
    """
    tls = f"--src-cert-dir={cert_dir}" if cert_dir else "--src-tls-verify=false"
    # Keep big uncompressed layers uncompressed: gzip'ing them would only cost time.
    args = ["copy", "--quiet", tls, "--dest-oci-accept-uncompressed-layers"]
    if creds is not None:
        args.append(f"--src-creds={creds[0]}:{creds[1]}")
    else:
        args.append("--src-no-creds")
    if all:
        args.append("--all")
    return skopeo(*args, f"docker://{reference}", f"oci:{dest}:pulled", check=check)


class RegistryClient:
    """Minimal Registry API client doing the Bearer-token dance, for assertions in tests."""

    def __init__(
        self,
        base_url: str,
        username: str | None = None,
        password: str = "",
        token_url: str | None = None,
    ) -> None:
        """``token_url`` overrides the challenge's realm, e.g. to bypass a faulty relay."""
        self.base_url = base_url.rstrip("/")
        self.auth = (username, password) if username is not None else None
        self.token_url = token_url
        self.session = requests.Session()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send a request, fetching a token for the challenged scope on 401 and retrying."""
        url = f"{self.base_url}{path}"
        kwargs.setdefault("timeout", 30)
        response = self.session.request(method, url, **kwargs)
        challenge = response.headers.get("WWW-Authenticate", "")
        if response.status_code != 401 or not challenge.lower().startswith("bearer "):
            return response
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.pop("realm")
        params.pop("error", None)
        token = self.session.get(self.token_url or realm, params=params, auth=self.auth, timeout=30)
        token.raise_for_status()
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {token.json()['token']}"}
        return self.session.request(method, url, headers=headers, **kwargs)

    def manifest(self, repo: str, ref: str, method: str = "GET") -> requests.Response:
        """Fetch a manifest accepting every media type the proxy has to support."""
        return self.request(
            method, f"/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT}
        )

    def digest_of(self, repo: str, ref: str) -> str:
        """The ``Docker-Content-Digest`` the registry reports for ``repo:ref``."""
        response = self.manifest(repo, ref, method="HEAD")
        response.raise_for_status()
        return response.headers["Docker-Content-Digest"]

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload a small blob (a POST, then one PUT with the whole body); its digest."""
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        started = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        started.raise_for_status()
        location = started.headers["Location"].removeprefix(self.base_url)
        separator = "&" if "?" in location else "?"
        done = self.request(
            "PUT",
            f"{location}{separator}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        done.raise_for_status()
        return digest

    def push_manifest(self, repo: str, reference: str, content: bytes, media_type: str) -> str:
        """PUT a manifest or index under a tag or digest; the digest the registry reports."""
        response = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            data=content,
            headers={"Content-Type": media_type},
        )
        response.raise_for_status()
        return response.headers["Docker-Content-Digest"]


class Registry:
    """A ``docker-registry`` process with token auth; restartable on the same port and storage."""

    def __init__(
        self,
        workdir: Path,
        token_server: TokenServer,
        port: int | None = None,
        realm: str | None = None,
    ) -> None:
        """``realm`` defaults to the token server; pass a relay's ``/token`` URL to put
        token requests through a relay too."""
        self.binary = require_binary("docker-registry")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token_server = token_server
        self.realm = realm or token_server.realm
        self.port = port or free_port()
        self.storage = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self._log_offset = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as used in ``docker://`` references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL of the registry, bypassing any relay."""
        return f"http://{self.host}"

    @property
    def running(self) -> bool:
        """Whether the registry process is alive."""
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> None:
        # JSON is valid YAML, so no YAML library is needed.
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                # A fixed secret keeps upload state valid across restarts.
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "auth": {
                "token": {
                    "realm": self.realm,
                    "service": SERVICE,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(self.token_server.cert_path),
                }
            },
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 20) -> None:
        """Start the process and wait until ``/v2/`` answers with the 401 challenge."""
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"docker-registry exited; see {self.log_path}")
            try:
                if requests.get(f"{self.url}/v2/", timeout=1).status_code == 401:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not come up in {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        """Terminate the process (storage stays, so :meth:`start` serves the same content)."""
        stop_process(self._process)
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        self.start()

    def reset_counts(self) -> None:
        """Make :meth:`count_requests` ignore access-log lines written so far."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

    def count_requests(self, method: str, path_regex: str) -> int:
        """Count access-log lines with ``method`` whose path matches ``path_regex`` (search).

        The log is written asynchronously; prefer the relay's exact counters.
        """
        pattern = re.compile(path_regex)
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            text = log.read().decode(errors="replace")
        return sum(
            1
            for match in _ACCESS_LOG.finditer(text)
            if match["method"] == method and pattern.search(match["path"])
        )

    def seed(
        self,
        layout_dir: Path,
        tag_ref: str,
        repo: str,
        tag: str,
        fmt: str | None = None,
        all: bool = False,  # named after skopeo's --all
    ) -> str:
        """Push ``oci:layout_dir:tag_ref`` to ``repo:tag`` as admin; return the pushed digest.

        Without ``fmt`` digests are preserved (so the layout's digests are the registry's,
        and big uncompressed layers are not gzip'd); ``fmt="v2s2"`` converts to Docker
        media types (a Docker manifest list when combined with ``all``).
        """
        policy = self.token_server.policy
        args = [
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"--dest-creds={policy.admin_username}:{policy.admin_password}",
        ]
        args += [f"--format={fmt}"] if fmt else ["--preserve-digests"]
        if all:
            args.append("--all")
        skopeo(*args, f"oci:{layout_dir}:{tag_ref}", f"docker://{self.host}/{repo}:{tag}")
        return self.admin_client().digest_of(repo, tag)

    def seed_image(
        self, image: Image | ImageIndex, repo: str, tag: str, fmt: str | None = None
    ) -> str:
        """Push a generated image or index (all platforms) to ``repo:tag``."""
        return self.seed(
            image.layout, image.tag, repo, tag, fmt=fmt, all=isinstance(image, ImageIndex)
        )

    def admin_client(self) -> RegistryClient:
        """A client talking to the registry directly with admin rights."""
        policy = self.token_server.policy
        return RegistryClient(
            self.url, policy.admin_username, policy.admin_password, self.token_server.realm
        )
