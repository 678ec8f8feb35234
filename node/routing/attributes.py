"""What rules see of a study: the headers of its stored images, grouped by series.

Headers are read with ``stop_before_pixels`` (pixel data is never needed to route).
Values are kept as text, one string per value, as a rule compares them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import Instance, Series, Study
from node.errors import StorageError
from node.routing.keywords import CALLING_AE_TITLE
from node.routing.match import Header, SeriesAttributes
from node.storage import InstanceStore

_OPAQUE = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})


def _text_values(elem: pydicom.DataElement) -> tuple[str, ...]:
    if elem.VR == "SQ":
        return (f"[{len(elem.value)} items]",) if elem.value else ()
    if elem.VR in _OPAQUE or isinstance(elem.value, bytes | bytearray):
        return (f"[{len(elem.value)} bytes]",) if elem.value else ()
    if elem.VM == 0 or elem.value is None:
        return ()
    if elem.VM > 1:
        return tuple(str(v) for v in elem.value)
    return (str(elem.value),)


def dataset_values(ds: Dataset, calling_ae_title: str) -> dict[str, tuple[str, ...]]:
    """Keyword -> values of the top-level (and file meta) elements of ``ds``."""
    values: dict[str, tuple[str, ...]] = {}
    elements: Iterable[pydicom.DataElement] = ds
    meta = getattr(ds, "file_meta", None)
    for elem in [*(meta or []), *elements]:
        if elem.keyword:
            values[elem.keyword] = _text_values(elem)
    values[CALLING_AE_TITLE] = (calling_ae_title.strip(),) if calling_ae_title.strip() else ()
    return values


def _read(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def study_series_attributes(
    session: Session, store: InstanceStore, study_id: int
) -> list[SeriesAttributes]:
    """One :class:`SeriesAttributes` per series of the study, in the order received.

    Every stored image of a series is read (in the order received): image-level
    attributes such as ViewPosition or ImageType differ between the images of one
    series, and a rule matches when one image meets it. An image whose file cannot
    be read is skipped; ``CallingAETitle`` is the AE that sent the study. A series
    whose files retention purged is left out (a late instance can re-open a purged
    study; it is routed on what is still here). Raises :class:`StorageError` when
    no image of a kept series reads, or when nothing is left.
    """
    study = session.get(Study, study_id)
    if study is None:
        raise StorageError(f"no study with id {study_id}")
    read: list[tuple[str, list[Header]]] = []
    series_rows = session.execute(
        select(Series.id, Series.series_instance_uid)
        .where(Series.study_id == study_id)
        .order_by(Series.id)
    ).all()
    for series_id, series_uid in series_rows:
        paths = session.scalars(
            select(Instance.path)
            .where(Instance.series_id == series_id, Instance.purged_at.is_(None))
            .order_by(Instance.id)
        ).all()
        if not paths:
            continue
        headers: list[Header] = []
        last_error = "no instances"
        for rel in paths:
            try:
                headers.append(dataset_values(_read(store.path(rel)), study.calling_ae_title))
            except (OSError, InvalidDicomError, ValueError) as exc:
                last_error = f"{rel}: {type(exc).__name__}"
        if not headers:
            raise StorageError(f"cannot read a header of series {series_uid}: {last_error}")
        read.append((series_uid, headers))
    if not read:
        raise StorageError("no instance of the study is stored (none received, or all purged)")
    return with_query_attributes(read)


def file_series_attributes(path: Path, calling_ae_title: str = "") -> list[SeriesAttributes]:
    """Attributes of a DICOM file, or of each series in a folder of DICOM files.

    For a folder, files that are not DICOM are skipped and every file read of a
    series counts, as every stored image does for a study. Raises ``OSError`` or
    ``InvalidDicomError`` for a file that cannot be read, ``FileNotFoundError`` for a
    folder without DICOM files.
    """
    if not path.is_dir():
        ds = _read(path)
        uid = str(ds.get("SeriesInstanceUID", ""))
        return with_query_attributes([(uid, [dataset_values(ds, calling_ae_title)])])
    by_series: dict[str, list[Header]] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            ds = _read(file)
        except (InvalidDicomError, OSError, ValueError):
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        by_series.setdefault(uid, []).append(dataset_values(ds, calling_ae_title))
    if not by_series:
        raise FileNotFoundError(f"no DICOM files under {path}")
    return with_query_attributes(list(by_series.items()))


def with_query_attributes(series: list[tuple[str, list[Header]]]) -> list[SeriesAttributes]:
    """The series, each image's header completed with what a C-FIND SCP computes.

    ``ModalitiesInStudy``, ``SOPClassesInStudy`` and the ``NumberOf...Related...``
    counts (PS3.4 C.6.1.1.4, C.6.1.1.5) are query keys; images rarely carry them,
    so a rule naming one would never match. They are derived from the images read;
    a value an image does carry is kept.
    """
    everything = [h for _, headers in series for h in headers]
    study: Header = {
        "ModalitiesInStudy": _distinct(everything, "Modality"),
        "SOPClassesInStudy": _distinct(everything, "SOPClassUID"),
        "NumberOfStudyRelatedSeries": (str(len(series)),),
        "NumberOfStudyRelatedInstances": (str(len(everything)),),
    }
    out = []
    for uid, headers in series:
        derived = {**study, "NumberOfSeriesRelatedInstances": (str(len(headers)),)}
        completed = [
            {**h, **{k: v for k, v in derived.items() if not any(x.strip() for x in h.get(k, ()))}}
            for h in headers
        ]
        out.append(SeriesAttributes(uid, completed[0], tuple(completed[1:])))
    return out


def _distinct(headers: list[Header], keyword: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for h in headers for v in h.get(keyword, ()) if v.strip()))
