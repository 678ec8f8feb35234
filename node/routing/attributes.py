"""What rules see of a study: the headers of its stored images, grouped by series.

Headers are read with ``stop_before_pixels`` (pixel data is never needed to route).
Values are kept as text, one string per value, as a rule compares them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
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
    texts = [str(v) for v in elem.value] if elem.VM > 1 else [str(elem.value)]
    if elem.VR == "PN":
        return tuple(_person_name(t) for t in texts)
    return tuple(texts)


def _person_name(text: str) -> str:
    """``SMITH^JOHN^^^`` as ``SMITH^JOHN``: empty trailing components and groups carry
    nothing (PS3.5 6.2, PN), and a rule should not have to spell them."""
    return "=".join(group.rstrip("^") for group in text.split("=")).rstrip("=")


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


class _LaterImages(Collection[Header]):
    """The headers of a series' images after the first, read when first iterated.

    Most rules are decided by the first image (:func:`node.routing.match.series_matches`),
    so a 2000-image CT series costs one read, not 2000. An image whose file cannot
    be read (purged meanwhile, damaged) is skipped.
    """

    def __init__(self, paths: list[Path], calling_ae_title: str, derived: Header) -> None:
        self._paths = paths
        self._calling_ae_title = calling_ae_title
        self._derived = derived
        self._read: list[Header] = []
        self._next = 0  # index in _paths of the next file to read

    def __len__(self) -> int:
        """Images stored (an unreadable one counts; iteration skips it)."""
        return len(self._paths)

    def __iter__(self) -> Iterator[Header]:
        index = 0
        while True:
            if index < len(self._read):
                yield self._read[index]
                index += 1
            elif self._next < len(self._paths):
                path = self._paths[self._next]
                self._next += 1
                try:
                    ds = _read(path)
                except (OSError, InvalidDicomError, ValueError):
                    continue
                self._read.append(
                    _complete(dataset_values(ds, self._calling_ae_title), self._derived)
                )
            else:
                return

    def __contains__(self, item: object) -> bool:
        return any(item == header for header in self)


def study_series_attributes(
    session: Session, store: InstanceStore, study_id: int
) -> list[SeriesAttributes]:
    """One :class:`SeriesAttributes` per series of the study, in the order received.

    A rule matches when one image of a series meets it, so every stored image of a
    series counts (image-level attributes such as ViewPosition or ImageType differ
    between the images of one series); the first readable image is read now, the
    others when a rule needs them. An image whose file cannot be read is skipped;
    ``CallingAETitle`` is the AE that sent the study. A series whose files retention
    purged is left out (a late instance can re-open a purged study; it is routed on
    what is still here). Raises :class:`StorageError` when no image of a kept series
    reads, or when nothing is left.
    """
    study = session.get(Study, study_id)
    if study is None:
        raise StorageError(f"no study with id {study_id}")
    series_rows = session.execute(
        select(Series.id, Series.series_instance_uid)
        .where(Series.study_id == study_id)
        .order_by(Series.id)
    ).all()
    firsts: list[tuple[str, Header, list[Path]]] = []
    sop_classes: list[str] = []
    for series_id, series_uid in series_rows:
        rows = session.execute(
            select(Instance.path, Instance.sop_class_uid)
            .where(Instance.series_id == series_id, Instance.purged_at.is_(None))
            .order_by(Instance.id)
        ).all()
        if not rows:
            continue
        sop_classes.extend(row.sop_class_uid for row in rows)
        paths = [store.path(row.path) for row in rows]
        first: Header | None = None
        last_error = "no instances"
        for index, path in enumerate(paths):
            try:
                first = dataset_values(_read(path), study.calling_ae_title)
            except (OSError, InvalidDicomError, ValueError) as exc:
                last_error = f"{rows[index].path}: {type(exc).__name__}"
                continue
            firsts.append((series_uid, first, paths[index + 1 :]))
            break
        if first is None:
            raise StorageError(f"cannot read a header of series {series_uid}: {last_error}")
    if not firsts:
        raise StorageError("no instance of the study is stored (none received, or all purged)")
    study_level = _study_level([h for _, h, _ in firsts], sop_classes)
    out = []
    for series_uid, first, later in firsts:
        derived = _series_level(study_level, 1 + len(later))
        out.append(
            SeriesAttributes(
                series_uid,
                _complete(first, derived),
                _LaterImages(later, study.calling_ae_title, derived),
            )
        )
    return out


def file_series_attributes(path: Path, calling_ae_title: str = "") -> list[SeriesAttributes]:
    """Attributes of a DICOM file, or of each series in a folder of DICOM files.

    For a folder, files that are not DICOM are skipped and every file read of a
    series counts, as every stored image does for a study. Raises ``OSError`` or
    ``InvalidDicomError`` for a file that cannot be read, ``FileNotFoundError`` for a
    folder without DICOM files.
    """
    by_series: dict[str, list[Header]] = {}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        try:
            ds = _read(file)
        except (InvalidDicomError, OSError, ValueError):
            if not path.is_dir():
                raise
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        by_series.setdefault(uid, []).append(dataset_values(ds, calling_ae_title))
    if not by_series:
        raise FileNotFoundError(f"no DICOM files under {path}")
    everything = [h for headers in by_series.values() for h in headers]
    study_level = _study_level(
        [headers[0] for headers in by_series.values()],
        [v for h in everything for v in h.get("SOPClassUID", ())],
    )
    out = []
    for uid, headers in by_series.items():
        derived = _series_level(study_level, len(headers))
        completed = [_complete(h, derived) for h in headers]
        out.append(SeriesAttributes(uid, completed[0], tuple(completed[1:])))
    return out


def _study_level(first_headers: list[Header], sop_classes: list[str]) -> dict[str, tuple[str, ...]]:
    """The query keys a C-FIND SCP computes for a study (PS3.4 C.6.1.1.4, C.6.1.1.5).

    Images rarely carry them, so a rule naming one would never match. Modality is
    the same for every image of a series (PS3.3 C.7.3.1): the first ones suffice.
    """
    return {
        "ModalitiesInStudy": _distinct([v for h in first_headers for v in h.get("Modality", ())]),
        "SOPClassesInStudy": _distinct(sop_classes),
        "NumberOfStudyRelatedSeries": (str(len(first_headers)),),
        "NumberOfStudyRelatedInstances": (str(len(sop_classes)),),
    }


def _series_level(study_level: Header, images: int) -> Header:
    return {**study_level, "NumberOfSeriesRelatedInstances": (str(images),)}


def _complete(header: Header, derived: Header) -> Header:
    """``header`` with the derived query keys it lacks; a value an image carries is kept."""
    missing = {k: v for k, v in derived.items() if not any(x.strip() for x in header.get(k, ()))}
    return {**header, **missing} if missing else header


def _distinct(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in values if v.strip()))
