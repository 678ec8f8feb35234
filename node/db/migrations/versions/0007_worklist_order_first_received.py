"""Worklist order: waiting time counts from the first instance received, not the last.

``ix_studies_worklist`` follows the order the worklist now reads in.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 09:00:00.000000
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_worklist")
        batch_op.create_index(
            "ix_studies_worklist", ["priority", "key_score", "first_received_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_worklist")
        batch_op.create_index(
            "ix_studies_worklist", ["priority", "key_score", "last_received_at"], unique=False
        )
