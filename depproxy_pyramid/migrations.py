"""The add-on's own schema migrations: always these, whatever Alembic set-up a host has."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

TABLE_PREFIX = "depproxy_"
# A table of our own, so a host's `alembic_version` in a shared database is never touched.
VERSION_TABLE = "depproxy_alembic_version"


def script_location() -> str:
    """The migrations folder: inside the installed package, or top-level in a source checkout."""
    packaged = Path(__file__).with_name("alembic")
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "alembic")


def alembic_config(connection) -> Config:
    config = Config()
    config.set_main_option("script_location", script_location())
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()
