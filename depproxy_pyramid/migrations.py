"""The add-on's own schema migrations: always these, whatever Alembic set-up a host has."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

TABLE_PREFIX = "depproxy_"
# A table of our own, so a host's `alembic_version` in a shared database is never touched.
VERSION_TABLE = "depproxy_alembic_version"
# Version 0.1 named its tables without the prefix and kept its revision in `alembic_version`.
# In foreign-key order: parents first.
LEGACY_TABLES = {
    "groups": "depproxy_groups",
    "users": "depproxy_users",
    "memberships": "depproxy_memberships",
    "personal_access_tokens": "depproxy_personal_access_tokens",
    "deploy_tokens": "depproxy_deploy_tokens",
    "dependency_proxy_group_settings": "depproxy_group_settings",
    "dependency_proxy_image_ttl_group_policies": "depproxy_image_ttl_policies",
    "dependency_proxy_blobs": "depproxy_blobs",
    "dependency_proxy_manifests": "depproxy_manifests",
    "dependency_proxy_tags": "depproxy_tags",
}
LEGACY_REVISION = "0001"


def script_location() -> str:
    """The migrations folder: inside the installed package, or top-level in a source checkout."""
    packaged = Path(__file__).with_name("alembic")
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "alembic")


def alembic_config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", script_location())
    config.attributes["connection"] = connection
    return config


def upgrade(engine: sa.Engine, revision: str = "head", default_registry: str | None = None) -> None:
    """Migrate the add-on's tables to `revision`, adopting a version 0.1 database first.

    `default_registry` is the default upstream's host: a group's single upstream credential of
    revision 0001 becomes a credential for it (Docker Hub when not given).
    """
    with engine.begin() as connection:
        config = alembic_config(connection)
        config.attributes["depproxy.default_registry"] = default_registry
        if _is_legacy(connection):
            command.upgrade(config, LEGACY_REVISION)
            _adopt_legacy_tables(connection)
        command.upgrade(config, revision)


def downgrade(engine: sa.Engine, revision: str, default_registry: str | None = None) -> None:
    with engine.begin() as connection:
        config = alembic_config(connection)
        config.attributes["depproxy.default_registry"] = default_registry
        command.downgrade(config, revision)


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def _is_legacy(connection: sa.Connection) -> bool:
    tables = set(sa.inspect(connection).get_table_names())
    if VERSION_TABLE in tables or not {"alembic_version", *LEGACY_TABLES} <= tables:
        return False
    version = sa.table("alembic_version", sa.column("version_num"))
    revisions = connection.execute(sa.select(version.c.version_num)).scalars().all()
    return revisions == [LEGACY_REVISION]


def _adopt_legacy_tables(connection: sa.Connection) -> None:
    """Move 0.1's rows, ids included, into the prefixed tables of the same shape; drop the old."""
    metadata = sa.MetaData()
    for old_name, new_name in LEGACY_TABLES.items():
        old = sa.Table(old_name, metadata, autoload_with=connection)
        new = sa.Table(new_name, metadata, autoload_with=connection)
        rows = sa.select(*old.columns).order_by(*old.primary_key.columns)
        connection.execute(new.insert().from_select([c.name for c in old.columns], rows))
        if connection.dialect.name == "postgresql" and "id" in new.columns:
            # Copied ids bypass the sequence: move it past them.
            connection.execute(
                sa.select(
                    sa.func.setval(
                        sa.func.pg_get_serial_sequence(new_name, "id"),
                        sa.func.coalesce(sa.func.max(new.c.id), 1),
                        sa.func.max(new.c.id).is_not(None),
                    )
                )
            )
    for old_name in reversed(LEGACY_TABLES):
        metadata.tables[old_name].drop(connection)
    sa.Table("alembic_version", metadata, autoload_with=connection).drop(connection)
