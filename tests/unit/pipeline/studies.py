"""Studies for the pipeline tests: a queued row as routing leaves it, or instances received."""

from __future__ import annotations

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from node.catalog import Catalog
from node.config import Destination
from node.db.models import Study, StudyStatus
from node.db.types import utcnow
from node.ingest.inspect import InstanceHeader
from node.storage import InstanceStore, StoredFile, digest

#: A PACS that gets the results and, the node sitting in front of it, the original images.
PACS = Destination(name="PACS", ae_title="PACS", host="127.0.0.1", port=104, send_original=True)
#: Rules that send radiographs and CT to the classifier, and everything to PACS.
TO_PACS = """
format = 1
[[rule]]
name = "to-pacs"
priority = "routine"
models = ["pneumonia-triage"]
destinations = ["PACS"]
[rule.match]
Modality = ["CR", "DX", "CT"]
"""


def queued_study(sessions: sessionmaker[Session], uid: str, models: list[str]) -> int:
    """Insert a study routed to ``models`` and queued; return its id."""
    now = utcnow()
    with sessions.begin() as session:
        study = Study(
            study_instance_uid=uid,
            calling_ae_title="CR1",
            status=StudyStatus.QUEUED,
            priority=0,
            version=1,
            modalities="CR",
            first_received_at=now,
            last_received_at=now,
            queued_at=now,
            routing_models=models,
            routing_series=[],
        )
        session.add(study)
        session.flush()
        return study.id


def receive(
    sessions: sessionmaker[Session], store: InstanceStore, ds: Dataset, *, write: bool = True
) -> str:
    """Catalogue ``ds`` as the SCP would, its file in ``store`` (unless ``write`` is false).

    Returns the file's path relative to the store.
    """
    header = InstanceHeader(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        modality=str(ds.Modality),
    )
    rel = store.instance_relpath(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    path = store.path(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    if not write:
        path.unlink()
    Catalog(sessions).record_instance(header, StoredFile(rel, len(data), digest(data)), "MODALITY")
    return rel
