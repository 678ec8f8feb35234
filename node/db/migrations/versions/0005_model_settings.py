"""Model settings: an admin can switch a model off (who and when recorded).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 08:25:26.808187
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_settings",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("changed_by", sa.String(length=64), nullable=False),
        sa.Column("changed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_model_settings")),
    )


def downgrade() -> None:
    op.drop_table("model_settings")
