"""the audit log

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 11:45:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "depproxy_audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("group_path", sa.String(length=255), nullable=True),
        sa.Column("target", sa.String(length=255), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_depproxy_audit_events")),
    )
    op.create_index(
        "ix_depproxy_audit_events_created_at", "depproxy_audit_events", ["created_at"]
    )
    op.create_index(
        "ix_depproxy_audit_events_group_path",
        "depproxy_audit_events",
        ["group_path", "created_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_depproxy_audit_events_group_path", table_name="depproxy_audit_events")
    op.drop_index("ix_depproxy_audit_events_created_at", table_name="depproxy_audit_events")
    op.drop_table("depproxy_audit_events")
