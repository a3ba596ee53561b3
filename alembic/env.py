"""Alembic runs against the database named by the app's own ini file (`sqlalchemy.url`)."""

from alembic import context
from pyramid.paster import get_appsettings, setup_logging

from depproxy_pyramid.models import Base, get_engine

config = context.config
if config.config_file_name and not config.attributes.get("connection"):
    setup_logging(config.config_file_name)


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    settings = get_appsettings(config.config_file_name)
    engine = get_engine(settings)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters tables by copying them; batch mode does that for us.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
