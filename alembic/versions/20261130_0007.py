"""fleet-wide single-flight leases; objects looked up by storage key

Blobs and manifests are now stored once by digest, whichever groups pulled them, so a fill
looks for an object another group stored, and cleanup asks whether any row still uses a key.
Rows written before keep their per-group keys.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 14:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "depproxy_leases",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=300), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_depproxy_leases")),
    )
    op.create_index("ix_depproxy_blobs_storage_key", "depproxy_blobs", ["storage_key"])
    op.create_index("ix_depproxy_manifests_storage_key", "depproxy_manifests", ["storage_key"])


def downgrade() -> None:
    op.drop_index("ix_depproxy_manifests_storage_key", table_name="depproxy_manifests")
    op.drop_index("ix_depproxy_blobs_storage_key", table_name="depproxy_blobs")
    op.drop_table("depproxy_leases")
