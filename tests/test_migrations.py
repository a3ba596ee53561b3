"""The schema exists only through Alembic: upgrade and downgrade on SQLite and PostgreSQL."""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from depproxy_pyramid.migrations import (
    LEGACY_TABLES,
    VERSION_TABLE,
    current_revision,
    downgrade,
    upgrade,
)
from depproxy_pyramid.models import Base, Group, get_engine
from depproxy_pyramid.upstream import MANIFEST_ACCEPT
from tests.conftest import Database

HEAD = "0007"
TABLES = {
    "depproxy_groups",
    "depproxy_users",
    "depproxy_memberships",
    "depproxy_personal_access_tokens",
    "depproxy_deploy_tokens",
    "depproxy_group_settings",
    "depproxy_upstream_credentials",
    "depproxy_image_ttl_policies",
    "depproxy_blobs",
    "depproxy_manifests",
    "depproxy_tags",
    "depproxy_listings",
    "depproxy_audit_events",
    "depproxy_leases",
}


def test_upgrade_matches_models_and_downgrade_empties(empty_database_url):
    engine = get_engine({"sqlalchemy.url": empty_database_url})
    try:
        upgrade(engine)
        with engine.connect() as connection:
            assert set(sa.inspect(connection).get_table_names()) == TABLES | {VERSION_TABLE}
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            assert compare_metadata(context, Base.metadata) == []
        assert current_revision(engine) == HEAD
        downgrade(engine, "base")
        with engine.connect() as connection:
            assert set(sa.inspect(connection).get_table_names()) == {VERSION_TABLE}
        upgrade(engine)
        assert current_revision(engine) == HEAD
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


def _legacy_columns(table: str) -> list[sa.Column]:
    """Columns 0.1 had that are gone: one upstream credential per group, in its settings."""
    if table != "depproxy_group_settings":
        return []
    return [
        sa.Column("upstream_username", sa.String(255)),
        sa.Column("upstream_password_encrypted", sa.String(1024)),
    ]


# Columns added since 0.1, which its tables did not have.
ADDED_SINCE_0_1 = {"depproxy_tags": {"accept"}, "depproxy_manifests": {"image_size"}}


def _create_legacy_schema(connection: sa.Connection) -> None:
    """Version 0.1's tables: today's columns under the old names, versioned in alembic_version."""
    legacy = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        if table.name not in OLD_NAMES:
            continue
        columns = _legacy_columns(table.name)
        for column in table.columns:
            if column.name in ADDED_SINCE_0_1.get(table.name, ()):
                continue
            references = [
                sa.ForeignKey(
                    f"{OLD_NAMES[key.column.table.name]}.{key.column.name}", ondelete="CASCADE"
                )
                for key in column.foreign_keys
            ]
            columns.append(
                sa.Column(
                    column.name,
                    column.type,
                    *references,
                    primary_key=column.primary_key,
                    nullable=column.nullable,
                )
            )
        sa.Table(OLD_NAMES[table.name], legacy, *columns)
    legacy.create_all(connection)
    connection.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
    connection.execute(sa.text("INSERT INTO alembic_version VALUES ('0001')"))


OLD_NAMES = {new: old for old, new in LEGACY_TABLES.items()}


def test_a_version_0_1_database_is_adopted_with_every_row(empty_database_url):
    engine = get_engine({"sqlalchemy.url": empty_database_url})
    now = datetime.now(UTC)
    try:
        with engine.begin() as connection:
            _create_legacy_schema(connection)
            connection.execute(
                sa.text(
                    "INSERT INTO groups (id, parent_id, path, name, visibility, created_at) "
                    "VALUES (7, NULL, 'acme', 'acme', 'private', :now), "
                    "(9, 7, 'acme/web', 'web', 'private', :now)"
                ),
                {"now": now},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO users (id, username, password_hash, is_admin, is_active, "
                    "created_at) VALUES (3, 'alice', 'scrypt$x', false, true, :now)"
                ),
                {"now": now},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO memberships (id, group_id, user_id, role, created_at) "
                    "VALUES (1, 9, 3, 30, :now)"
                ),
                {"now": now},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO dependency_proxy_blobs (id, group_id, digest, size, "
                    "content_type, storage_key, status, created_at, updated_at, read_at) VALUES "
                    "(5, 9, 'sha256:ab', 2, 'application/octet-stream', '9/blobs/ab', "
                    "'default', :now, :now, :now)"
                ),
                {"now": now},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO dependency_proxy_group_settings (group_id, enabled, "
                    "upstream_username, upstream_password_encrypted, updated_at) VALUES "
                    "(7, true, 'bot', 'sealed-password', :now), (9, true, NULL, NULL, :now)"
                ),
                {"now": now},
            )

        upgrade(engine, default_registry="mirror.example:5000")

        with engine.connect() as connection:
            assert set(sa.inspect(connection).get_table_names()) == TABLES | {VERSION_TABLE}
            assert connection.execute(
                sa.text("SELECT id, parent_id, path FROM depproxy_groups ORDER BY id")
            ).all() == [(7, None, "acme"), (9, 7, "acme/web")]
            assert connection.execute(
                sa.text("SELECT group_id, user_id, role FROM depproxy_memberships")
            ).all() == [(9, 3, 30)]
            assert connection.execute(
                sa.text("SELECT id, storage_key FROM depproxy_blobs")
            ).all() == [(5, "9/blobs/ab")]
            # 0.1's single credential now belongs to the default upstream only.
            assert connection.execute(
                sa.text(
                    "SELECT group_id, registry_host, username, password_encrypted "
                    "FROM depproxy_upstream_credentials"
                )
            ).all() == [(7, "mirror.example:5000", "bot", "sealed-password")]
        assert current_revision(engine) == HEAD
        # New rows get ids after the adopted ones.
        manager, session = Database(empty_database_url).session()
        with manager:
            group = Group(path="next", name="next")
            session.add(group)
            session.flush()
            assert group.id > 9
        upgrade(engine)  # and once adopted, upgrading again changes nothing
        assert current_revision(engine) == HEAD
    finally:
        engine.dispose()


def test_group_credentials_move_to_the_default_registry_and_back(empty_database_url):
    engine = get_engine({"sqlalchemy.url": empty_database_url})
    now = datetime.now(UTC)
    try:
        upgrade(engine, "0001")
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO depproxy_groups (id, parent_id, path, name, visibility, "
                    "created_at) VALUES (1, NULL, 'a', 'a', 'private', :now), "
                    "(2, NULL, 'b', 'b', 'private', :now), (3, NULL, 'c', 'c', 'private', :now)"
                ),
                {"now": now},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO depproxy_group_settings (group_id, enabled, upstream_username, "
                    "upstream_password_encrypted, updated_at) VALUES "
                    "(1, true, 'bot', 'sealed', :now), (2, true, NULL, NULL, :now), "
                    "(3, false, '', 'sealed', :now)"
                ),
                {"now": now},
            )

        upgrade(engine)

        rows = "SELECT group_id, registry_host, username, password_encrypted FROM "
        with engine.connect() as connection:
            assert connection.execute(sa.text(rows + "depproxy_upstream_credentials")).all() == [
                (1, "registry-1.docker.io", "bot", "sealed")
            ]
            columns = {
                c["name"] for c in sa.inspect(connection).get_columns("depproxy_group_settings")
            }
            assert columns == {"group_id", "enabled", "updated_at"}
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO depproxy_upstream_credentials (group_id, registry_host, "
                    "username, password_encrypted, updated_at) VALUES "
                    "(2, 'ghcr.io', 'other', 'sealed-too', :now)"
                ),
                {"now": now},
            )

        downgrade(engine, "0001")

        with engine.connect() as connection:
            assert connection.execute(
                sa.text(
                    "SELECT group_id, upstream_username, upstream_password_encrypted "
                    "FROM depproxy_group_settings ORDER BY group_id"
                )
            ).all() == [(1, "bot", "sealed"), (2, None, None), (3, None, None)]
        assert current_revision(engine) == "0001"
    finally:
        engine.dispose()


def test_cached_tags_keep_their_answer_as_the_one_to_all_four_types(empty_database_url):
    engine = get_engine({"sqlalchemy.url": empty_database_url})
    now = datetime.now(UTC)
    schema2 = "application/vnd.docker.distribution.manifest.v2+json"
    try:
        upgrade(engine, "0002")
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO depproxy_groups (id, parent_id, path, name, visibility, "
                    "created_at) VALUES (1, NULL, 'a', 'a', 'private', :now)"
                ),
                {"now": now},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO depproxy_tags (id, group_id, image, tag, digest, "
                    "revalidated_at) VALUES (1, 1, 'library/alpine', 'latest', 'sha256:aa', :now)"
                ),
                {"now": now},
            )

        upgrade(engine)

        rows = "SELECT image, tag, accept, digest FROM depproxy_tags ORDER BY id"
        with engine.begin() as connection:
            assert connection.execute(sa.text(rows)).all() == [
                ("library/alpine", "latest", MANIFEST_ACCEPT, "sha256:aa")
            ]
            # The same tag's answer to a narrower Accept is a row of its own.
            connection.execute(
                sa.text(
                    "INSERT INTO depproxy_tags (id, group_id, image, tag, accept, digest, "
                    "revalidated_at) VALUES "
                    "(2, 1, 'library/alpine', 'latest', :accept, 'sha256:bb', :now)"
                ),
                {"now": now, "accept": schema2},
            )

        downgrade(engine, "0002")

        with engine.connect() as connection:
            assert connection.execute(
                sa.text("SELECT image, tag, digest FROM depproxy_tags")
            ).all() == [("library/alpine", "latest", "sha256:aa")]
        assert current_revision(engine) == "0002"
    finally:
        engine.dispose()
