"""The schema exists only through Alembic: upgrade and downgrade on SQLite and PostgreSQL."""

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from depproxy_pyramid.migrations import VERSION_TABLE, current_revision, downgrade, upgrade
from depproxy_pyramid.models import Base, get_engine

TABLES = {
    "depproxy_groups",
    "depproxy_users",
    "depproxy_memberships",
    "depproxy_personal_access_tokens",
    "depproxy_deploy_tokens",
    "depproxy_group_settings",
    "depproxy_image_ttl_policies",
    "depproxy_blobs",
    "depproxy_manifests",
    "depproxy_tags",
}


def test_upgrade_matches_models_and_downgrade_empties(empty_database_url):
    engine = get_engine({"sqlalchemy.url": empty_database_url})
    try:
        upgrade(engine)
        with engine.connect() as connection:
            assert set(sa.inspect(connection).get_table_names()) == TABLES | {VERSION_TABLE}
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            assert compare_metadata(context, Base.metadata) == []
        assert current_revision(engine) == "0001"
        downgrade(engine, "base")
        with engine.connect() as connection:
            assert set(sa.inspect(connection).get_table_names()) == {VERSION_TABLE}
        upgrade(engine)
        assert current_revision(engine) == "0001"
    finally:
        engine.dispose()


def test_every_table_index_and_constraint_name_is_prefixed():
    """So the add-on can share a database with a host whose names follow the same convention."""
    for table in Base.metadata.tables.values():
        assert table.name.startswith("depproxy_")
        for constraint in table.constraints:
            assert "depproxy_" in str(constraint.name), (table.name, constraint.name)
        for index in table.indexes:
            assert "depproxy_" in str(index.name), (table.name, index.name)
