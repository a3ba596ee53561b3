"""The proxy under test as a real `pserve` process in front of the test upstream."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from sqlalchemy import delete, func, select

from depproxy_pyramid.credentials import (
    DEPLOY_TOKEN_PREFIX,
    PERSONAL_TOKEN_PREFIX,
    hash_password,
    new_token,
    token_digest,
)
from depproxy_pyramid.models import (
    CachedBlob,
    CachedManifest,
    CachedTag,
    DeployToken,
    Group,
    Membership,
    PersonalAccessToken,
    ProxySettings,
    Role,
    User,
    Visibility,
)
from tests.conftest import Database, app_settings, migrate
from tests.server import ServerProcess, admin, free_port, write_ini

PULLER = ("puller", "puller-password-1")
PROXY_MARKER = "dependency_proxy/containers"


@dataclass
class Proxy:
    server: ServerProcess
    ini: Path
    db: Database
    storage: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def new_group(self, path: str, *, enabled: bool = True) -> str:
        """A fresh private group with the puller as a developer: its own empty cache."""
        manager, session = self.db.session()
        with manager:
            puller = session.scalar(select(User).where(User.username == PULLER[0]))
            group = Group(path=path, name=path, visibility=Visibility.PRIVATE)
            group.proxy_settings = ProxySettings(enabled=enabled)
            session.add(group)
            session.add(Membership(group=group, user=puller, role=Role.DEVELOPER))
        return path

    def personal_access_token(self) -> tuple[str, str]:
        """Basic credentials of a fresh `read_registry` personal access token of the puller."""
        secret = new_token(PERSONAL_TOKEN_PREFIX)
        manager, session = self.db.session()
        with manager:
            puller = session.scalar(select(User).where(User.username == PULLER[0]))
            session.add(
                PersonalAccessToken(
                    user=puller,
                    name=f"t-{secret[-8:]}",
                    token_digest=token_digest(secret),
                    scopes="read_registry",
                )
            )
        return PULLER[0], secret

    def deploy_token(self, group: str) -> tuple[str, str]:
        """Basic credentials of a fresh `read_registry` deploy token of `group`."""
        secret = new_token(DEPLOY_TOKEN_PREFIX)
        username = f"deploy-{secret[-10:].lower()}"
        manager, session = self.db.session()
        with manager:
            session.add(
                DeployToken(
                    group=session.scalar(select(Group).where(Group.path == group)),
                    name=username,
                    username=username,
                    token_digest=token_digest(secret),
                    scopes="read_registry",
                )
            )
        return username, secret

    def ref(self, group: str, image: str) -> str:
        return f"{self.host}/{group}/{PROXY_MARKER}/{image}"

    def group_id(self, group: str) -> int:
        manager, session = self.db.session()
        with manager:
            return session.scalar(select(Group.id).where(Group.path == group))

    def cached_blobs(self, group: str) -> int:
        manager, session = self.db.session()
        with manager:
            return session.scalar(
                select(func.count())
                .select_from(CachedBlob)
                .join(Group, Group.id == CachedBlob.group_id)
                .where(Group.path == group)
            )

    def cached_manifests(self, group: str) -> int:
        manager, session = self.db.session()
        with manager:
            return session.scalar(
                select(func.count())
                .select_from(CachedManifest)
                .join(Group, Group.id == CachedManifest.group_id)
                .where(Group.path == group)
            )

    def stored_blob_files(self, group: str) -> list[Path]:
        """The files holding the group's cached blobs (shared with any other group that has
        pulled the same ones)."""
        manager, session = self.db.session()
        with manager:
            keys = session.scalars(
                select(CachedBlob.storage_key)
                .join(Group, Group.id == CachedBlob.group_id)
                .where(Group.path == group)
            ).all()
        return sorted(self.storage / key for key in keys if (self.storage / key).is_file())

    def set_upstream_credentials(
        self, group: str, username: str, password: str, *registry: str
    ) -> subprocess.CompletedProcess:
        """`depproxy-admin proxy credentials` for the group, the password on stdin."""
        registry_args = ["--registry", *registry] if registry else []
        return admin(
            self.ini,
            "proxy",
            "credentials",
            group,
            *registry_args,
            "--username",
            username,
            stdin=password + "\n",
        )

    def empty_cache(self) -> None:
        """Forget every group's cached blobs and manifests, rows and stored objects: objects are
        shared by digest, so a test that needs a cold pull must not find another test's."""
        manager, session = self.db.session()
        with manager:
            for model in (CachedTag, CachedManifest, CachedBlob):
                session.execute(delete(model))
        for kind in ("blobs", "manifests"):
            shutil.rmtree(self.storage / kind, ignore_errors=True)

    def spool_files(self) -> list[Path]:
        return sorted((self.storage / ".tmp").glob("*"))

    def token(self, group: str, image: str, credentials=PULLER) -> str:
        answer = requests.get(
            f"{self.url}/jwt/auth",
            params={
                "service": "dependency_proxy",
                "scope": f"repository:{group}/{PROXY_MARKER}/{image}:pull",
            },
            auth=credentials,
            timeout=10,
        )
        answer.raise_for_status()
        return answer.json()["token"]

    def get(
        self, group: str, image: str, kind: str, reference: str, method: str = "GET", **kw
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token(group, image)}", **kw.pop("headers", {})}
        if kind == "manifests":
            headers.setdefault(
                "Accept",
                ", ".join(
                    [
                        "application/vnd.oci.image.index.v1+json",
                        "application/vnd.oci.image.manifest.v1+json",
                        "application/vnd.docker.distribution.manifest.list.v2+json",
                        "application/vnd.docker.distribution.manifest.v2+json",
                    ]
                ),
            )
        return requests.request(
            method,
            f"{self.url}/v2/{group}/{PROXY_MARKER}/{image}/{kind}/{reference}",
            headers=headers,
            timeout=kw.pop("timeout", 60),
            **kw,
        )


@contextmanager
def running_proxy(
    workdir: Path, database_url: str, upstream_url: str, **extra: str
) -> Iterator[Proxy]:
    """A proxy of a test's own, with settings of its own, stopped when the test is done."""
    proxy = start_proxy(workdir, database_url, upstream_url, **extra)
    try:
        yield proxy
    finally:
        proxy.server.stop()


def database_with_puller(database_url: str) -> Database:
    """The database migrated, with the puller as a user (a member of no group yet)."""
    migrate(database_url)
    db = Database(database_url)
    manager, session = db.session()
    with manager:
        session.add(User(username=PULLER[0], password_hash=hash_password(PULLER[1])))
    return db


def start_proxy(
    workdir: Path,
    database_url: str,
    upstream_url: str,
    app_use: str = "egg:depproxy-pyramid",
    server_options: Mapping[str, str] | None = None,
    **extra: str,
) -> Proxy:
    workdir.mkdir(parents=True, exist_ok=True)
    db = database_with_puller(database_url)
    settings = app_settings(
        database_url,
        workdir / "storage",
        **{
            "depproxy.upstream.url": upstream_url,
            "depproxy.upstream.read_timeout": "5",
            "depproxy.external_url": "",
            **extra,
        },
    )
    port = free_port()
    ini = write_ini(
        workdir / "proxy.ini", settings, port, app_use=app_use, server_options=server_options
    )
    server = ServerProcess(ini, port, workdir / "proxy.log").start()
    return Proxy(server, ini, db, workdir / "storage")
