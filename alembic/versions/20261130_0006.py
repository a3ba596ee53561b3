"""what pulling a cached image moves, for the pages and the API

Rows cached before this have none; an index never has one (its platforms' manifests do).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("depproxy_manifests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_size", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("depproxy_manifests", schema=None) as batch_op:
        batch_op.drop_column("image_size")
