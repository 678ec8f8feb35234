"""Model settings: an admin can switch a model off (who and when recorded).

Also indexes for the worklist fingerprint: each max() it reads is one index lookup.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 08:25:26.808187
"""

import sqlalchemy as sa
from alembic import op

_FINGERPRINT_COLUMNS = (
    "last_received_at",
    "completed_at",
    "queued_at",
    "started_at",
    "finished_at",
    "read_at",
    "reviewed_at",
)

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
    with op.batch_alter_table("studies", schema=None) as batch_op:
        for column in _FINGERPRINT_COLUMNS:
            batch_op.create_index(f"ix_studies_{column}", [column], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        for column in _FINGERPRINT_COLUMNS:
            batch_op.drop_index(f"ix_studies_{column}")
    op.drop_table("model_settings")
