"""Pipeline: routing decision and processing lease on studies, findings, rule set versions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 07:21:32.625687
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "rule_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rule_sets")),
        sa.UniqueConstraint("version", name=op.f("uq_rule_sets_version")),
    )
    op.create_table(
        "findings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("frame_number", sa.Integer(), nullable=True),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=True),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("lung_area_px", sa.Integer(), nullable=True),
        sa.Column("lung_area_mm2", sa.Float(), nullable=True),
        sa.Column("heatmap_path", sa.String(length=255), nullable=True),
        sa.Column("mask_path", sa.String(length=255), nullable=True),
        sa.Column("inference_ms", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_findings_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
    )
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_findings_study_id"), ["study_id"], unique=False)
        batch_op.create_index(
            "ix_findings_study_version", ["study_id", "study_version"], unique=False
        )

    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "base_priority", sa.SmallInteger(), nullable=False, server_default=sa.text("0")
            )
        )
        batch_op.add_column(sa.Column("routing_rule", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("rule_set_version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("routing_models", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("routing_destinations", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("routing_series", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("key_finding", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("key_score", sa.Float(), nullable=True))
        batch_op.drop_index(batch_op.f("ix_studies_worklist"))
        batch_op.create_index(
            "ix_studies_worklist", ["priority", "key_score", "last_received_at"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_worklist")
        batch_op.create_index(
            batch_op.f("ix_studies_worklist"), ["priority", "last_received_at"], unique=False
        )
        batch_op.drop_column("key_score")
        batch_op.drop_column("key_finding")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("lease_owner")
        batch_op.drop_column("attempts")
        batch_op.drop_column("routing_series")
        batch_op.drop_column("routing_destinations")
        batch_op.drop_column("routing_models")
        batch_op.drop_column("rule_set_version")
        batch_op.drop_column("routing_rule")
        batch_op.drop_column("base_priority")

    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_index("ix_findings_study_version")
        batch_op.drop_index(batch_op.f("ix_findings_study_id"))

    op.drop_table("findings")
    op.drop_table("rule_sets")
