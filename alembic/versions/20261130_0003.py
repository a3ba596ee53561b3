"""the last tag lists and referrers upstream gave, per group and image

Served when upstream fails, as cached manifests are.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 11:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "depproxy_listings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("image", sa.String(length=255), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("tags", "referrers", name="listingkind", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("query", sa.String(length=300), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["depproxy_groups.id"],
            name=op.f("fk_depproxy_listings_group_id_depproxy_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_depproxy_listings")),
        sa.UniqueConstraint(
            "group_id", "image", "kind", "query", name=op.f("uq_depproxy_listings_group_id")
        ),
    )


def downgrade() -> None:
    op.drop_table("depproxy_listings")
