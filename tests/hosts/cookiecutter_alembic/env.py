"""The cookiecutter host's own migrations, with Alembic's default `alembic_version` table."""

from alembic import context

from tests.hosts.cookiecutter import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
