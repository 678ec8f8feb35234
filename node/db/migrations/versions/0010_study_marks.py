"""``study_marks``: every user who marked a study read or reviewed, not only the last.

Existing marks (``studies.read_by`` / ``reviewed_by``) are copied over; from now on
those columns name the first reader and reviewer.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25 23:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_marks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("mark", sa.String(length=16), nullable=False),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("marked_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_study_marks_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_marks")),
        sa.UniqueConstraint(
            "study_id", "mark", "user_name", name=op.f("uq_study_marks_study_mark_user")
        ),
    )
    studies = sa.table(
        "studies",
        *(sa.column(c) for c in ("id", "read_by", "read_at", "reviewed_by", "reviewed_at")),
    )
    marks = sa.table(
        "study_marks", *(sa.column(c) for c in ("study_id", "mark", "user_name", "marked_at"))
    )
    for mark in ("read", "reviewed"):
        by, at = studies.c[f"{mark}_by"], studies.c[f"{mark}_at"]
        op.execute(
            marks.insert().from_select(
                ["study_id", "mark", "user_name", "marked_at"],
                sa.select(studies.c.id, sa.literal(mark, sa.String(16)), by, at).where(
                    by.is_not(None), at.is_not(None)
                ),
            )
        )


def downgrade() -> None:
    op.drop_table("study_marks")
