"""Retention: when received instance files and quarantined files were purged.

Rows stay (findings, results metadata and the audit trail refer to them); only the
files go, and ``purged_at`` says when.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TABLES = ("studies", "instances", "quarantined_instances")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("purged_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    for table in reversed(_TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("purged_at")
