"""upstream credentials per group and registry host

A group's single upstream credential was sent to whatever registry an image named; it becomes
a credential for the default upstream's host only. `depproxy-admin initdb` names that host
(from `depproxy.upstream.url`); without it, Docker Hub, that setting's default.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DEFAULT_REGISTRY = "registry-1.docker.io"

settings = sa.table(
    "depproxy_group_settings",
    sa.column("group_id", sa.Integer()),
    sa.column("upstream_username", sa.String(255)),
    sa.column("upstream_password_encrypted", sa.String(1024)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)
credentials = sa.table(
    "depproxy_upstream_credentials",
    sa.column("group_id", sa.Integer()),
    sa.column("registry_host", sa.String(255)),
    sa.column("username", sa.String(255)),
    sa.column("password_encrypted", sa.String(1024)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)


def _default_registry() -> str:
    return context.config.attributes.get("depproxy.default_registry") or DEFAULT_REGISTRY


def upgrade() -> None:
    op.create_table(
        "depproxy_upstream_credentials",
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("registry_host", sa.String(length=255), nullable=False),
        sa.Column("username", sa.String(length=255), nullable=False),
        sa.Column("password_encrypted", sa.String(length=1024), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["depproxy_groups.id"],
            name=op.f("fk_depproxy_upstream_credentials_group_id_depproxy_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "group_id", "registry_host", name=op.f("pk_depproxy_upstream_credentials")
        ),
    )
    op.execute(
        credentials.insert().from_select(
            ["group_id", "registry_host", "username", "password_encrypted", "updated_at"],
            sa.select(
                settings.c.group_id,
                sa.cast(sa.literal(_default_registry()), sa.String(255)),
                settings.c.upstream_username,
                settings.c.upstream_password_encrypted,
                settings.c.updated_at,
            ).where(
                settings.c.upstream_username.is_not(None),
                settings.c.upstream_username != "",
                settings.c.upstream_password_encrypted.is_not(None),
            ),
        )
    )
    with op.batch_alter_table("depproxy_group_settings", schema=None) as batch_op:
        batch_op.drop_column("upstream_password_encrypted")
        batch_op.drop_column("upstream_username")


def downgrade() -> None:
    with op.batch_alter_table("depproxy_group_settings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("upstream_username", sa.String(length=255), nullable=True))
        batch_op.add_column(
            sa.Column("upstream_password_encrypted", sa.String(length=1024), nullable=True)
        )
    # Only the default upstream's credentials have a place to go back to.
    default = credentials.alias("default_credentials")
    match = sa.and_(
        default.c.group_id == settings.c.group_id,
        default.c.registry_host == _default_registry(),
    )
    op.execute(
        settings.update().values(
            upstream_username=sa.select(default.c.username).where(match).scalar_subquery(),
            upstream_password_encrypted=(
                sa.select(default.c.password_encrypted).where(match).scalar_subquery()
            ),
        )
    )
    op.drop_table("depproxy_upstream_credentials")
