"""a tag's cached answer per set of accepted manifest types

A registry answers a tag by the client's Accept (a platform manifest to a client that takes no
manifest list), so `depproxy_tags` is keyed by the Accept header that asked upstream, too. The
rows already there were all asked for with the four types, and keep that key; so do rows a
server of the previous version writes during a rolling upgrade (the column's default).

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-30 11:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ALL_FOUR = (
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)
UNIQUE = "uq_depproxy_tags_group_id"

tags = sa.table("depproxy_tags", sa.column("accept", sa.String(255)))


def upgrade() -> None:
    with op.batch_alter_table("depproxy_tags", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("accept", sa.String(length=255), server_default=ALL_FOUR, nullable=False)
        )
        batch_op.drop_constraint(UNIQUE, type_="unique")
        batch_op.create_unique_constraint(UNIQUE, ["group_id", "image", "tag", "accept"])


def downgrade() -> None:
    # One row per tag again: the answers to narrower Accept headers go (the next such pull
    # would be served the answer to all four types).
    op.execute(tags.delete().where(tags.c.accept != ALL_FOUR))
    with op.batch_alter_table("depproxy_tags", schema=None) as batch_op:
        batch_op.drop_constraint(UNIQUE, type_="unique")
        batch_op.create_unique_constraint(UNIQUE, ["group_id", "image", "tag"])
        batch_op.drop_column("accept")
