"""Deterministic identities of everything the node writes back (STYLE.md rule 6).

A UID we create is a hash of what it was derived from (source UIDs, model name and
version, the kind of output) under the configured UID root, so re-processing a study
yields the same UIDs and PACS replaces the earlier results instead of filing
duplicates. UIDs follow PS3.5 9.1 (digits and dots, no leading zeros, <= 64 chars);
`pydicom.uid.generate_uid` with ``entropy_srcs`` gives exactly that: a SHA-512 of the
sources, as a decimal number, truncated to fit after the root.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

#: Fixed series number and description per output kind (STYLE.md rule 6).
SERIES: Final[dict[str, tuple[int, str]]] = {
    "seg": (9101, "AI lung segmentation"),
    "sr": (9102, "AI pneumonia triage report"),
    "sc": (9103, "AI heatmap - NOT FOR DIAGNOSIS"),
}

#: Longest root that still leaves room for a hash with some entropy (PS3.5 9.1: 64).
_MAX_ROOT_LENGTH = 40


def derive_uid(root: str, *parts: str) -> str:
    """A UID under `root` that depends on `parts` only (PS3.5 9.1).

    Each part is length-prefixed before hashing, so ``("ab", "c")`` and ``("a", "bc")``
    give different UIDs.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part to hash")
    if not root.endswith(".") or len(root) > _MAX_ROOT_LENGTH:
        raise ValueError(f"UID root must end with '.' and be <= {_MAX_ROOT_LENGTH} characters")
    return str(generate_uid(prefix=root, entropy_srcs=[f"{len(p)}:{p}" for p in parts]))


@dataclass(frozen=True)
class SourceFrame:
    """One analysed frame of a stored source instance, as identity sees it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    frame_number: int

    @classmethod
    def of(cls, source: Dataset, frame_number: int) -> SourceFrame:
        return cls(
            str(source.StudyInstanceUID),
            str(source.SeriesInstanceUID),
            str(source.SOPInstanceUID),
            int(frame_number),
        )

    @property
    def key(self) -> str:
        return f"{self.sop_instance_uid}#{self.frame_number}"


def series_uid(root: str, kind: str, source: SourceFrame, *models: str) -> str:
    """Series Instance UID of output `kind` for the source series, per model set."""
    return study_series_uid(root, kind, [source], *models)


def study_series_uid(root: str, kind: str, frames: Sequence[SourceFrame], *models: str) -> str:
    """Series Instance UID of output `kind` covering every source series of `frames`.

    For an object about a whole study (the SR): it depends on the study and the set of
    its analysed series, per model set. With a single source series it is exactly
    `series_uid`, so such studies keep the UIDs earlier versions gave them.
    """
    studies = {f.study_instance_uid for f in frames}
    if len(studies) != 1:
        raise ValueError("a study-level series is derived from frames of one study")
    series = sorted({f.series_instance_uid for f in frames})
    return derive_uid(root, "series", kind, *studies, *series, *models)


def instance_uid(root: str, kind: str, frames: Sequence[SourceFrame], *models: str) -> str:
    """SOP Instance UID of output `kind` derived from the analysed frames, per model set."""
    keys = sorted({f.key for f in frames})
    return derive_uid(root, "instance", kind, *keys, "|", *models)
