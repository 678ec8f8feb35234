"""Which stored images a model applies to: declarative selectors, one per kind of input.

A selector is data (sets of DICOM values), so what a model accepts can be read, listed
on a page and tested without running anything. It judges the header only: callers pass
a dataset read with ``stop_before_pixels=True``, and whether the pixels decode is
`workers.pixels.read_frames`' question.

Chest radiograph rules, and why:

* Modality CR or DX and the CR or DX *For Presentation* SOP Class. DX *For Processing*
  images (PS3.3 C.8.11.1.1.1) are raw detector data not meant for display; the models
  learnt from displayed radiographs, so those are left out on purpose.
* Grayscale, single frame: the chest IODs are MONOCHROME1/2 (PS3.3 C.8.1.2,
  C.8.11.3.1.1) and a chest film is one frame.
* BodyPartExamined (PS3.16 Annex L, e.g. CHEST) decides when present. When it is
  absent or empty, which many CR readers leave it, a chest word in StudyDescription,
  SeriesDescription or ProtocolName is accepted instead; with neither, the image is
  not assumed to be a chest.
* Lateral and oblique views are excluded: the models saw frontal views. View Position
  is Type 2 in CR and often empty, so two other header statements count as well: a
  View Code Sequence code for a lateral or oblique view (CID 4010 DX View, SNOMED CT or
  its legacy SRT code), and Patient Orientation whose row direction (first value,
  PS3.3 C.7.6.1.1.1) has an anterior or posterior component (A\\F, P\\F; LP for an
  oblique): a frontal view's rows run left-right. An image none of these three calls
  lateral or oblique is taken as frontal, an empty View Position included.

Reasons name the attribute and its coded value, never free text from the header, so
they can be logged (free-text descriptions may carry patient details).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from models.registry import CLASSIFIER_NAME, SEGMENTER_NAME
from node.errors import NodeError

#: Computed Radiography Image Storage (PS3.4 B.5).
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
#: Digital X-Ray Image Storage - For Presentation.
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
#: Digital X-Ray Image Storage - For Processing (not selected, see module docstring).
DX_IMAGE_STORAGE_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"

_WORD = re.compile(r"[A-Z]+")


class UnknownModel(NodeError):
    """No selector is defined for the named model."""


@dataclass(frozen=True)
class ImageSelector:
    """The header values an image must have for a model to apply to it.

    Comparisons ignore case and surrounding spaces. ``description_words`` are whole
    words looked for in StudyDescription, SeriesDescription and ProtocolName, used only
    when BodyPartExamined is absent or empty.
    """

    name: str
    modalities: frozenset[str]
    sop_class_uids: frozenset[str]
    body_parts: frozenset[str]
    description_words: frozenset[str]
    photometric_interpretations: frozenset[str] = frozenset({"MONOCHROME1", "MONOCHROME2"})
    exclude_view_positions: frozenset[str] = frozenset()
    #: (coding scheme designator, code value) of View Code Sequence codes excluded.
    exclude_view_codes: frozenset[tuple[str, str]] = frozenset()
    #: Letters that exclude an image when in Patient Orientation's row direction.
    exclude_row_directions: frozenset[str] = frozenset()
    max_frames: int = 1

    def applies_to(self, ds: Dataset) -> bool:
        """True if the model applies to the image whose header is `ds`."""
        return self.why_not(ds) is None

    def why_not(self, ds: Dataset) -> str | None:
        """Why the model does not apply to `ds`, or None when it does."""
        reason = self._mismatch(ds)
        return f"{self.name}: {reason}" if reason else None

    def _mismatch(self, ds: Dataset) -> str | None:
        modality = _text(ds, "Modality")
        if modality not in self.modalities:
            return f"Modality {modality or '(absent)'} is not one of {_list(self.modalities)}"
        sop_class = _text(ds, "SOPClassUID")
        if sop_class not in self.sop_class_uids:
            return f"SOP Class {_sop_class_name(sop_class)} is not accepted"
        photometric = _text(ds, "PhotometricInterpretation")
        if photometric not in self.photometric_interpretations:
            return f"Photometric Interpretation {photometric or '(absent)'} is not grayscale"
        frames = _frames(ds)
        if frames is None or frames > self.max_frames:
            return f"Number of Frames {ds.get('NumberOfFrames')} is more than {self.max_frames}"
        view = _text(ds, "ViewPosition")
        if view in self.exclude_view_positions:
            return f"ViewPosition {view} is excluded"
        code = _view_code(ds)
        if code in self.exclude_view_codes:
            return f"ViewCodeSequence ({code[0]}, {code[1]}) is excluded (lateral or oblique)"
        rows = _text(ds, "PatientOrientation")
        if self.exclude_row_directions.intersection(rows):
            return (
                f"PatientOrientation row direction {rows} is excluded "
                "(anterior/posterior: lateral or oblique)"
            )
        body_part = _text(ds, "BodyPartExamined")
        if body_part:
            if body_part not in self.body_parts:
                return f"BodyPartExamined {body_part} is not one of {_list(self.body_parts)}"
            return None
        if not self._described(ds):
            return (
                "BodyPartExamined absent and no description names "
                f"one of {_list(self.description_words)}"
            )
        return None

    def _described(self, ds: Dataset) -> bool:
        for keyword in ("StudyDescription", "SeriesDescription", "ProtocolName"):
            if self.description_words.intersection(_WORD.findall(_text(ds, keyword))):
                return True
        return False


#: CID 4010 DX View codes of lateral and oblique views: SNOMED CT to its legacy SNOMED
#: RT (SRT) code, as in pydicom's `pydicom.sr` tables (a test checks them there).
_LATERAL_OR_OBLIQUE_VIEWS: Mapping[str, str] = {
    "399067008": "R-102CD",  # lateral
    "399173006": "R-10236",  # left lateral
    "399198007": "R-10232",  # right lateral
    "399260004": "R-10224",  # medial-lateral
    "399352003": "R-10228",  # lateral-medial
    "260427002": "R-40783",  # lateral oblique
    "260426006": "R-40782",  # medial oblique
    "399182000": "R-102C1",  # oblique
    "399184004": "R-10238",  # left oblique
    "399236003": "R-10234",  # right oblique
    "399135007": "R-10220",  # left anterior oblique
    "399356000": "R-40985",  # right anterior oblique
    "399006002": "R-10212",  # left posterior oblique
    "399038007": "R-10210",  # right posterior oblique
    "399059000": "R-10216",  # postero-anterior oblique
    "399312000": "R-10208",  # antero-posterior oblique
    "399368009": "R-10226",  # medio-lateral oblique
    "399099002": "R-10230",  # latero-medial oblique
}

#: Frontal chest radiographs: the input of both chest models.
CHEST_RADIOGRAPH = ImageSelector(
    name="chest radiograph",
    modalities=frozenset({"CR", "DX"}),
    sop_class_uids=frozenset({CR_IMAGE_STORAGE, DX_IMAGE_STORAGE_FOR_PRESENTATION}),
    body_parts=frozenset({"CHEST", "THORAX", "LUNG"}),
    description_words=frozenset(
        {"CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "CXR", "TORAX", "TORACE", "POUMON"}
    ),
    # PS3.3 C.8.11.5 defined terms: lateral (LL, RL) and oblique (LLO, RLO) views.
    exclude_view_positions=frozenset({"LL", "RL", "LLO", "RLO", "LATERAL", "LAT"}),
    exclude_view_codes=frozenset(
        (scheme, code)
        for sct, srt in _LATERAL_OR_OBLIQUE_VIEWS.items()
        for scheme, code in (("SCT", sct), ("SRT", srt), ("SNM3", srt))
    ),
    exclude_row_directions=frozenset({"A", "P"}),
)

#: Model name (as in `models.registry`) to the images it applies to.
SELECTORS: Mapping[str, ImageSelector] = {
    CLASSIFIER_NAME: CHEST_RADIOGRAPH,
    SEGMENTER_NAME: CHEST_RADIOGRAPH,
}


def selector_for(model_name: str) -> ImageSelector:
    """The selector of `model_name`; `UnknownModel` if the node has none."""
    try:
        return SELECTORS[model_name]
    except KeyError:
        raise UnknownModel(
            f"no image selector for model {model_name!r}; known: {', '.join(sorted(SELECTORS))}"
        ) from None


def _text(ds: Dataset, keyword: str) -> str:
    """A single-valued string attribute, stripped and upper-cased; '' when absent."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):  # multi-valued: the first value decides
        value = value[0] if value else ""
    return str(value).strip().upper()


def _view_code(ds: Dataset) -> tuple[str, str]:
    """(coding scheme designator, code value) of View Code Sequence's item; ('', '') if none."""
    items = ds.get("ViewCodeSequence")
    if not items:
        return "", ""
    return _text(items[0], "CodingSchemeDesignator"), _text(items[0], "CodeValue")


def _frames(ds: Dataset) -> int | None:
    """NumberOfFrames, 1 when absent or 0 (as pydicom reads it); None when not a number."""
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        return max(int(value), 1)
    except (TypeError, ValueError):
        return None


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name if uid else "(absent)"
    return name if name and name != uid else uid


def _list(values: frozenset[str]) -> str:
    return ", ".join(sorted(values))
