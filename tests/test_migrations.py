"""The schema exists only through Alembic: upgrade and downgrade on SQLite and PostgreSQL."""

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from depproxy_pyramid.models import Base, get_engine
from tests.conftest import alembic_config

TABLES = {
    "groups",
    "users",
    "memberships",
    "personal_access_tokens",
    "deploy_tokens",
    "dependency_proxy_group_settings",
    "dependency_proxy_image_ttl_group_policies",
    "dependency_proxy_blobs",
    "dependency_proxy_manifests",
    "dependency_proxy_tags",
}


def test_upgrade_matches_models_and_downgrade_empties(empty_database_url):
    engine = get_engine({"sqlalchemy.url": empty_database_url})
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
        with engine.connect() as connection:
            assert set(sa.inspect(connection).get_table_names()) >= TABLES
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
            assert diff == []
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "base")
        with engine.connect() as connection:
            assert set(sa.inspect(connection).get_table_names()) <= {"alembic_version"}
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
    finally:
        engine.dispose()
