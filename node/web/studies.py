"""One study as the study page shows it, and the radiologist's read / reviewed marks.

The models here are pydantic so that the REST API documents them as they are.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import requests
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import ClusterSettings
from node.db.dialects import insert_for
from node.db.models import Export, Finding, Instance, Priority, Series, Study, StudyMark
from node.db.types import utcnow
from node.storage import InstanceStore
from node.web.audit import AuditTrail
from node.worklist import Marks, marks_of

log = logging.getLogger(__name__)

Mark = Literal["read", "reviewed"]
OverlayKind = Literal["mask", "heatmap"]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class InstanceOut(_Out):
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    #: When the retention policy deleted the image file (None: still stored).
    purged_at: datetime | None = None
    has_mask: bool = False
    has_heatmap: bool = False


class SeriesOut(_Out):
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part_examined: str | None
    instance_count: int
    instances: list[InstanceOut] = []


class FindingOut(_Out):
    sop_instance_uid: str | None
    frame_number: int | None
    model_name: str
    model_version: str
    kind: str
    label: str | None
    probability: float | None
    lung_area_mm2: float | None
    inference_ms: float | None
    created_at: datetime


class ExportOut(_Out):
    id: int
    destination: str
    kind: str
    sop_instance_uid: str
    state: str
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None


class StudyOut(_Out):
    study_instance_uid: str
    patient_name: str | None
    patient_id: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modalities: str
    status: str
    status_reason: str | None
    priority: str
    version: int
    first_received_at: datetime
    finished_at: datetime | None
    #: When the retention policy deleted the received images (findings stay).
    purged_at: datetime | None = None
    routing_rule: str | None
    rule_set_version: int | None
    key_finding: str | None
    key_score: float | None
    read_at: datetime | None
    #: The first to mark it read / reviewed; ``readers`` / ``reviewers`` name everyone.
    read_by: str | None
    reviewed_at: datetime | None
    reviewed_by: str | None
    readers: list[str] = []
    reviewers: list[str] = []
    series: list[SeriesOut]
    findings: list[FindingOut]
    exports: list[ExportOut]


def study_detail(session: Session, study_instance_uid: str) -> StudyOut | None:
    """The study with its series, instances, findings, deliveries and marks (6 statements)."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        return None
    series = session.scalars(
        select(Series).where(Series.study_id == study.id).order_by(Series.series_number, Series.id)
    ).all()
    instances = session.scalars(
        select(Instance)
        .where(Instance.study_id == study.id)
        .order_by(Instance.instance_number, Instance.id)
    ).all()
    findings = session.scalars(
        select(Finding)
        .where(Finding.study_id == study.id, Finding.study_version == study.version)
        .order_by(Finding.sop_instance_uid.is_not(None), Finding.model_name, Finding.id)
    ).all()
    exports = session.scalars(
        select(Export).where(Export.study_id == study.id).order_by(Export.destination, Export.kind)
    ).all()
    marks = marks_of(session, [study.id]).get(study.id, Marks())
    masks = {f.sop_instance_uid for f in findings if f.mask_path}
    heatmaps = {f.sop_instance_uid for f in findings if f.heatmap_path}
    by_series: dict[int, list[InstanceOut]] = {}
    for i in instances:
        out = InstanceOut.model_validate(i)
        out.has_mask = i.sop_instance_uid in masks
        out.has_heatmap = i.sop_instance_uid in heatmaps
        by_series.setdefault(i.series_id, []).append(out)
    series_out = []
    for s in series:
        item = SeriesOut.model_validate(s)
        item.instances = by_series.get(s.id, [])
        series_out.append(item)
    return StudyOut(
        study_instance_uid=study.study_instance_uid,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
        patient_birth_date=study.patient_birth_date,
        patient_sex=study.patient_sex,
        accession_number=study.accession_number,
        study_date=study.study_date,
        study_description=study.study_description,
        modalities=study.modalities,
        status=str(study.status),
        status_reason=study.status_reason,
        priority=Priority(study.priority).name.lower(),
        version=study.version,
        first_received_at=study.first_received_at,
        finished_at=study.finished_at,
        purged_at=study.purged_at,
        routing_rule=study.routing_rule,
        rule_set_version=study.rule_set_version,
        key_finding=study.key_finding,
        key_score=study.key_score,
        read_at=study.read_at,
        read_by=study.read_by,
        reviewed_at=study.reviewed_at,
        reviewed_by=study.reviewed_by,
        readers=marks.readers,
        reviewers=marks.reviewers,
        series=series_out,
        findings=[FindingOut.model_validate(f) for f in findings],
        exports=[ExportOut.model_validate(e) for e in exports],
    )


def mark(session: Session, study_instance_uid: str, what: Mark, user_name: str) -> bool:
    """Record that ``user_name`` read (or reviewed, and so read) the study; False if no
    such study.

    Every user's mark is kept (a ``StudyMark``; marking again adds nothing); the study's
    ``read_by`` / ``reviewed_by`` keep the first.
    """
    # Locked: of two users marking at once, the first to commit stays read_by.
    study = session.scalar(
        select(Study).where(Study.study_instance_uid == study_instance_uid).with_for_update()
    )
    if study is None:
        return False
    now = utcnow()
    for kind in ("read", "reviewed") if what == "reviewed" else ("read",):
        session.execute(
            insert_for(session, StudyMark)
            .values(study_id=study.id, mark=kind, user_name=user_name, marked_at=now)
            .on_conflict_do_nothing(index_elements=["study_id", "mark", "user_name"])
        )
    if study.read_at is None:
        study.read_at, study.read_by = now, user_name
    if what == "reviewed" and study.reviewed_at is None:
        study.reviewed_at, study.reviewed_by = now, user_name
    study.updated_at = now  # a new name on the worklist: open worklists reload
    return True


def mark_and_audit(
    sessions: sessionmaker[Session],
    audit: AuditTrail,
    study_instance_uid: str,
    *,
    what: Mark,
    user_name: str,
    client_address: str | None,
) -> bool:
    """Mark the study (see :func:`mark`) and record who did it in the audit trail."""
    with sessions.begin() as session:
        if not mark(session, study_instance_uid, what, user_name):
            return False
    audit.record(
        user_name,
        f"study.{what}",
        study_instance_uid=study_instance_uid,
        client_address=client_address,
    )
    return True


class InstanceLocation(BaseModel):
    """Where one stored instance is: its file, its series, whether retention removed it."""

    model_config = ConfigDict(frozen=True)

    path: str
    series_instance_uid: str
    purged: bool


def instance_file(
    session: Session, study_instance_uid: str, sop_instance_uid: str
) -> InstanceLocation | None:
    """The stored file (relative to the data directory) of an instance of this study."""
    row = session.execute(
        select(Instance.path, Series.series_instance_uid, Instance.purged_at)
        .join(Study, Study.id == Instance.study_id)
        .join(Series, Series.id == Instance.series_id)
        .where(
            Study.study_instance_uid == study_instance_uid,
            Instance.sop_instance_uid == sop_instance_uid,
        )
    ).first()
    if row is None:
        return None
    return InstanceLocation(
        path=row.path, series_instance_uid=row.series_instance_uid, purged=row.purged_at is not None
    )


def overlay_file(
    session: Session, study_instance_uid: str, sop_instance_uid: str, kind: OverlayKind
) -> str | None:
    """Path of the current mask or heatmap array (.npy) of one image, if the models made one."""
    column = Finding.mask_path if kind == "mask" else Finding.heatmap_path
    return session.scalar(
        select(column)
        .join(Study, Study.id == Finding.study_id)
        .where(
            Study.study_instance_uid == study_instance_uid,
            Finding.study_version == Study.version,
            Finding.sop_instance_uid == sop_instance_uid,
            column.is_not(None),
        )
        .order_by(Finding.frame_number)
        .limit(1)
    )


class ResultFileMissing(Exception):
    """A result file is neither on this host's disk nor obtainable from the node."""


@contextlib.contextmanager
def result_file(
    store: InstanceStore, cluster: ClusterSettings, relative_path: str, *, timeout: float = 30.0
) -> Iterator[Path]:
    """A readable local copy of a worker result file (heatmap or mask .npy).

    On the node's own disk it is read in place. A web role on another host
    (``cluster.node_url`` set) fetches it from the node's internal API with the
    cluster token into a temporary file, removed when the block ends.
    """
    if store.exists(relative_path):
        yield store.path(relative_path)
        return
    if not cluster.node_url:
        raise ResultFileMissing(relative_path)
    url = f"{cluster.node_url.rstrip('/')}/internal/v1/files/{quote(relative_path)}"
    try:
        response = requests.get(
            url, headers={"Authorization": f"Bearer {cluster.token}"}, timeout=timeout
        )
    except requests.RequestException as exc:
        log.warning("result file %s: node unreachable (%s)", relative_path, type(exc).__name__)
        raise ResultFileMissing(relative_path) from None
    if response.status_code != 200:
        log.warning("result file %s: node answered HTTP %d", relative_path, response.status_code)
        raise ResultFileMissing(relative_path)
    with tempfile.NamedTemporaryFile(suffix=Path(relative_path).suffix) as tmp:
        tmp.write(response.content)
        tmp.flush()
        yield Path(tmp.name)


@contextlib.contextmanager
def instance_copy(
    store: InstanceStore,
    cluster: ClusterSettings,
    study_instance_uid: str,
    sop_instance_uid: str,
    where: InstanceLocation,
    *,
    timeout: float = 30.0,
) -> Iterator[Path]:
    """A readable local copy of a stored instance, for rendering it.

    On the node's own disk it is read in place. A web role on another host
    (``cluster.node_url`` set) retrieves it by DICOMweb WADO-RS from the node,
    like a worker does, into a temporary file removed when the block ends.
    """
    if store.exists(where.path):
        yield store.path(where.path)
        return
    if not cluster.node_url:
        raise ResultFileMissing(where.path)
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {cluster.token}"
    client = DICOMwebClient(
        url=f"{cluster.node_url.rstrip('/')}/dicomweb", session=session, timeout=timeout
    )
    client.set_http_retry_params(retry=False)  # a page waits for an image, not for retries
    try:
        ds = client.retrieve_instance(
            study_instance_uid,
            where.series_instance_uid,
            sop_instance_uid,
            media_types=(("application/dicom", "*"),),
        )
    except (requests.RequestException, OSError) as exc:
        log.warning(
            "instance sop_instance_uid=%s: node did not deliver it (%s)",
            sop_instance_uid,
            type(exc).__name__,
        )
        raise ResultFileMissing(where.path) from None
    finally:
        session.close()
    with tempfile.NamedTemporaryFile(suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
        tmp.flush()
        yield Path(tmp.name)
