"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27 23:53:26.421311
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "depproxy_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column(
            "visibility",
            sa.Enum("public", "private", name="visibility", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["depproxy_groups.id"],
            name=op.f("fk_depproxy_groups_parent_id_depproxy_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_depproxy_groups")),
        sa.UniqueConstraint("path", name=op.f("uq_depproxy_groups_path")),
    )
    with op.batch_alter_table("depproxy_groups", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_depproxy_groups_parent_id"), ["parent_id"], unique=False
        )

    op.create_table(
        "depproxy_users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=255), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_depproxy_users")),
        sa.UniqueConstraint("username", name=op.f("uq_depproxy_users_username")),
    )
    op.create_table(
        "depproxy_blobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=135), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("storage_key", sa.String(length=512), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "default",
                "pending_destruction",
                "processing",
                "error",
                name="cachestatus",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["depproxy_groups.id"],
            name=op.f("fk_depproxy_blobs_group_id_depproxy_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_depproxy_blobs")),
        sa.UniqueConstraint("group_id", "digest", name=op.f("uq_depproxy_blobs_group_id")),
    )
    with op.batch_alter_table("depproxy_blobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_depproxy_blobs_group_status_read", ["group_id", "status", "read_at"], unique=False
        )

    op.create_table(
        "depproxy_deploy_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("username", sa.String(length=255), nullable=False),
        sa.Column("token_digest", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["depproxy_groups.id"],
            name=op.f("fk_depproxy_deploy_tokens_group_id_depproxy_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_depproxy_deploy_tokens")),
        sa.UniqueConstraint("token_digest", name=op.f("uq_depproxy_deploy_tokens_token_digest")),
        sa.UniqueConstraint("username", name=op.f("uq_depproxy_deploy_tokens_username")),
    )
    with op.batch_alter_table("depproxy_deploy_tokens", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_depproxy_deploy_tokens_group_id"), ["group_id"], unique=False
        )

    op.create_table(
        "depproxy_group_settings",
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("upstream_username", sa.String(length=255), nullable=True),
        sa.Column("upstream_password_encrypted", sa.String(length=1024), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["depproxy_groups.id"],
            name=op.f("fk_depproxy_group_settings_group_id_depproxy_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", name=op.f("pk_depproxy_group_settings")),
    )
    op.create_table(
        "depproxy_image_ttl_policies",
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("ttl_days", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["depproxy_groups.id"],
            name=op.f("fk_depproxy_image_ttl_policies_group_id_depproxy_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", name=op.f("pk_depproxy_image_ttl_policies")),
    )
    op.create_table(
        "depproxy_manifests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("image", sa.String(length=255), nullable=False),
        sa.Column("digest", sa.String(length=135), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("storage_key", sa.String(length=512), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "default",
                "pending_destruction",
                "processing",
                "error",
                name="cachestatus",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["depproxy_groups.id"],
            name=op.f("fk_depproxy_manifests_group_id_depproxy_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_depproxy_manifests")),
        sa.UniqueConstraint(
            "group_id", "image", "digest", name=op.f("uq_depproxy_manifests_group_id")
        ),
    )
    with op.batch_alter_table("depproxy_manifests", schema=None) as batch_op:
        batch_op.create_index(
            "ix_depproxy_manifests_group_status_read",
            ["group_id", "status", "read_at"],
            unique=False,
        )

    op.create_table(
        "depproxy_memberships",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["depproxy_groups.id"],
            name=op.f("fk_depproxy_memberships_group_id_depproxy_groups"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["depproxy_users.id"],
            name=op.f("fk_depproxy_memberships_user_id_depproxy_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_depproxy_memberships")),
        sa.UniqueConstraint("group_id", "user_id", name=op.f("uq_depproxy_memberships_group_id")),
    )
    with op.batch_alter_table("depproxy_memberships", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_depproxy_memberships_user_id"), ["user_id"], unique=False
        )

    op.create_table(
        "depproxy_personal_access_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("token_digest", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["depproxy_users.id"],
            name=op.f("fk_depproxy_personal_access_tokens_user_id_depproxy_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_depproxy_personal_access_tokens")),
        sa.UniqueConstraint(
            "token_digest", name=op.f("uq_depproxy_personal_access_tokens_token_digest")
        ),
    )
    with op.batch_alter_table("depproxy_personal_access_tokens", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_depproxy_personal_access_tokens_user_id"), ["user_id"], unique=False
        )

    op.create_table(
        "depproxy_tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("image", sa.String(length=255), nullable=False),
        sa.Column("tag", sa.String(length=128), nullable=False),
        sa.Column("digest", sa.String(length=135), nullable=False),
        sa.Column("revalidated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["depproxy_groups.id"],
            name=op.f("fk_depproxy_tags_group_id_depproxy_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_depproxy_tags")),
        sa.UniqueConstraint("group_id", "image", "tag", name=op.f("uq_depproxy_tags_group_id")),
    )


def downgrade() -> None:
    op.drop_table("depproxy_tags")
    with op.batch_alter_table("depproxy_personal_access_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_depproxy_personal_access_tokens_user_id"))

    op.drop_table("depproxy_personal_access_tokens")
    with op.batch_alter_table("depproxy_memberships", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_depproxy_memberships_user_id"))

    op.drop_table("depproxy_memberships")
    with op.batch_alter_table("depproxy_manifests", schema=None) as batch_op:
        batch_op.drop_index("ix_depproxy_manifests_group_status_read")

    op.drop_table("depproxy_manifests")
    op.drop_table("depproxy_image_ttl_policies")
    op.drop_table("depproxy_group_settings")
    with op.batch_alter_table("depproxy_deploy_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_depproxy_deploy_tokens_group_id"))

    op.drop_table("depproxy_deploy_tokens")
    with op.batch_alter_table("depproxy_blobs", schema=None) as batch_op:
        batch_op.drop_index("ix_depproxy_blobs_group_status_read")

    op.drop_table("depproxy_blobs")
    op.drop_table("depproxy_users")
    with op.batch_alter_table("depproxy_groups", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_depproxy_groups_parent_id"))

    op.drop_table("depproxy_groups")
