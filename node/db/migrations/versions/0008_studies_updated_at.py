"""``studies.updated_at``: when a study last changed, whatever changed.

The worklist fingerprint reads its max(); the timestamps it read before missed
changes that set none of them (a study not routed, a priority raised, a retry).
Existing rows get the time of the upgrade.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 09:30:00.000000
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(), nullable=True))
    studies = sa.table("studies", sa.column("updated_at", sa.DateTime()))
    # Naive UTC, as the models store it.
    op.execute(studies.update().values(updated_at=datetime.now(UTC).replace(tzinfo=None)))
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.alter_column("updated_at", existing_type=sa.DateTime(), nullable=False)
        batch_op.create_index("ix_studies_updated_at", ["updated_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_updated_at")
        batch_op.drop_column("updated_at")
