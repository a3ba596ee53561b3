"""Alembic environment of the add-on's own schema.

`depproxy-admin CONFIG_URI initdb` hands in a connection to the add-on's database. For
`alembic -c development.ini revision --autogenerate` the database comes from the ini file's app
settings (`depproxy.sqlalchemy.url`, else `sqlalchemy.url`).
"""

from alembic import context
from pyramid.paster import get_appsettings, setup_logging

from depproxy_pyramid.migrations import TABLE_PREFIX, VERSION_TABLE
from depproxy_pyramid.models import Base, engine_from_settings

config = context.config


def _ours(name, type_, parent_names) -> bool:
    # A host portal may share the database: its tables are none of our business.
    return type_ != "table" or name.startswith(TABLE_PREFIX)


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_name=_ours,
        # SQLite alters tables by copying them; batch mode does that for us.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    setup_logging(config.config_file_name)
    engine = engine_from_settings(get_appsettings(config.config_file_name))
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()
