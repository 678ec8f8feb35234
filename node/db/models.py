"""The study catalogue: studies, series, instances, quarantined data.

Attributes are named after their DICOM keywords where they hold one. Patient
attributes are stored (the worklist shows them) but never logged.
Schema changes go through Alembic migrations in ``node/db/migrations``.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from node.db.types import UTCDateTime, utcnow

# Deterministic constraint names so that migrations are portable (SQLite batch mode).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class StudyStatus(enum.StrEnum):
    """Where a study is in the pipeline. Stored as text so the database reads plainly."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    NOT_ROUTED = "not_routed"


class Priority(enum.IntEnum):
    """Worklist urgency; higher sorts first."""

    ROUTINE = 0
    URGENT = 1
    STAT = 2


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    #: Modalities in the study, backslash-separated as in ModalitiesInStudy.
    modalities: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16))

    status: Mapped[StudyStatus] = mapped_column(String(16), default=StudyStatus.RECEIVING)
    status_reason: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(SmallInteger, default=Priority.ROUTINE)
    #: Incremented each time an instance re-opens a study that had completed.
    version: Mapped[int] = mapped_column(Integer, default=1)
    series_count: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)

    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # -- routing (decided when the study completes) --------------------------------
    #: Priority the matching rule gave; ``priority`` may be raised by model results.
    base_priority: Mapped[int] = mapped_column(SmallInteger, default=Priority.ROUTINE)
    routing_rule: Mapped[str | None] = mapped_column(String(64))
    rule_set_version: Mapped[int | None] = mapped_column(Integer)
    #: Model names the rule asked for, and destination names for the results.
    routing_models: Mapped[list[str] | None] = mapped_column(JSON)
    routing_destinations: Mapped[list[str] | None] = mapped_column(JSON)
    #: Series the rule matched (the worker analyses only these).
    routing_series: Mapped[list[str] | None] = mapped_column(JSON)

    # -- processing ---------------------------------------------------------------------
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Who holds the study while processing, and until when (a lease: a dead worker's
    #: study is handed out again once it expires).
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The key finding for the worklist: label and probability of the triage model.
    key_finding: Mapped[str | None] = mapped_column(String(64))
    key_score: Mapped[float | None] = mapped_column(Float)

    # -- reading (set from the worklist / study page) -----------------------------------
    #: When and by whom (user name) the study was first marked read / reviewed; every
    #: user's mark is a ``StudyMark``.
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    read_by: Mapped[str | None] = mapped_column(String(64))
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reviewed_by: Mapped[str | None] = mapped_column(String(64))

    # -- retention ----------------------------------------------------------------------
    #: When the retention policy deleted the received instance files (findings, results
    #: metadata and the audit trail stay).
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    #: When the row last changed, whatever changed: SQLAlchemy sets it on each INSERT
    #: and UPDATE it builds (ORM flushes and Core ``update(Study)`` alike; hand-written
    #: SQL would have to set it itself). An open worklist polls its max().
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")

    __table_args__ = (
        Index("ix_studies_status_last_received", "status", "last_received_at"),
        Index("ix_studies_worklist", "priority", "key_score", "first_received_at"),
        Index("ix_studies_accession_number", "accession_number"),
        Index("ix_studies_patient_id", "patient_id"),
        # The worklist fingerprint (polled by every open worklist) reads max() of this.
        Index("ix_studies_updated_at", "updated_at"),
        # It read max() of these until updated_at came (0008); some are filtered on
        # elsewhere (dashboard, pipeline), so they stay.
        *(
            Index(f"ix_studies_{column}", column)
            for column in (
                "last_received_at",
                "completed_at",
                "queued_at",
                "started_at",
                "finished_at",
                "read_at",
                "reviewed_at",
            )
        ),
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", order_by="Instance.id"
    )


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    photometric_interpretation: Mapped[str | None] = mapped_column(String(16))
    #: Path of the Part 10 file, relative to ``storage.data_dir``.
    path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The study version this instance arrived in.
    study_version: Mapped[int] = mapped_column(Integer)
    #: Further copies received after the first (kept once, counted here).
    duplicate_count: Mapped[int] = mapped_column(Integer, default=0)
    #: When the retention policy deleted the file at ``path`` (the row stays).
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship(back_populates="instances")


class StudyMark(Base):
    """One user's "read" or "reviewed" mark on a study.

    Every user who marks a study is kept, first first; a user marking it again adds
    nothing (the unique constraint). ``Study.read_by`` / ``reviewed_by`` name the first.
    """

    __tablename__ = "study_marks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    #: "read" or "reviewed".
    mark: Mapped[str] = mapped_column(String(16))
    user_name: Mapped[str] = mapped_column(String(64))
    marked_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        # Also the index that finds a page's marks by study_id.
        UniqueConstraint("study_id", "mark", "user_name", name="uq_study_marks_study_mark_user"),
    )


class QuarantinedInstance(Base):
    """A received dataset that was refused; its bytes are kept under ``quarantine/``."""

    __tablename__ = "quarantined_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    #: Affected SOP Class/Instance UID from the C-STORE request (not trusted).
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: When the retention policy deleted the quarantined file (the row stays).
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Finding(Base):
    """One model result: per image (``sop_instance_uid`` set) or for the whole study.

    Written by the worker in one transaction per study version, replacing any
    earlier findings of that version, so a task that runs twice leaves one result.
    """

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    #: None for the study-level summary of a model.
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    frame_number: Mapped[int | None] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    #: "classification" or "segmentation".
    kind: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(64))
    probability: Mapped[float | None] = mapped_column(Float)
    lung_area_px: Mapped[int | None] = mapped_column(Integer)
    lung_area_mm2: Mapped[float | None] = mapped_column(Float)
    #: Paths relative to ``storage.data_dir`` of the heatmap / mask arrays (.npy).
    heatmap_path: Mapped[str | None] = mapped_column(String(255))
    mask_path: Mapped[str | None] = mapped_column(String(255))
    inference_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_findings_study_version", "study_id", "study_version"),)


class RuleSet(Base):
    """A version of the routing rules document, as an admin saved it."""

    __tablename__ = "rule_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    content: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    #: Exactly one version is active; rollback activates an older one.
    active: Mapped[bool] = mapped_column(Boolean, default=False)


class ExportState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Export(Base):
    """Delivery of one DICOM object to one destination.

    Result objects have deterministic SOP Instance UIDs, so re-processing a study
    updates the same row (back to pending) instead of adding a second delivery.
    """

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(String(64))
    #: seg | sr | sc | original
    kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    #: Part 10 file, relative to ``storage.data_dir``.
    path: Mapped[str] = mapped_column(String(255))
    state: Mapped[ExportState] = mapped_column(String(16), default=ExportState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Last C-STORE status (None: no response, e.g. association refused) and error text.
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: Start of the current retry window (creation, or a manual retry).
    retry_started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_exports_destination_sop"),
        Index("ix_exports_due", "state", "next_attempt_at"),
    )


class Role(enum.StrEnum):
    """What a web user may do: radiologists read, admins also configure the node."""

    RADIOLOGIST = "radiologist"
    ADMIN = "admin"


class User(Base):
    """A person who logs in to the web application (``triage-node users add``)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: Argon2id hash in PHC string format (pwdlib); never the password.
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WebSession(Base):
    """One login to the web application, so that it can end on the server.

    The signed cookie carries a random session id; this row holds only its SHA-256
    (a copy of the table does not let anyone sign in). A session is ended by setting
    ``revoked_at``: at logout, and for all of a user's sessions when the user is
    disabled or gets a new password.
    """

    __tablename__ = "web_sessions"

    #: SHA-256 (hex) of the session id in the cookie.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    #: The user's last request, to the minute (written at most once a minute).
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """One access to patient data or one change to the node, by a user.

    Rows are only ever inserted: the table is the audit trail admins browse and export.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    user_name: Mapped[str] = mapped_column(String(64), index=True)
    #: Dotted verb, e.g. ``worklist.view``, ``study.view``, ``rules.save``.
    action: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    #: Free text without patient data (filters used, version numbers, outcome).
    detail: Mapped[str | None] = mapped_column(Text)
    client_address: Mapped[str | None] = mapped_column(String(64))


class ModelSetting(Base):
    """An admin's switch for one model: a disabled model is not run by the workers.

    No row means enabled (the default for a model the node has never been told about).
    """

    __tablename__ = "model_settings"

    #: The model's registry name, e.g. ``pneumonia-triage``.
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    changed_by: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
