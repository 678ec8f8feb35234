"""De-identification for external destinations (PS3.15 Annex E, Basic Profile).

What is done, and by what:

* **dicognito** (a maintained implementation of the Basic Application Level
  Confidentiality Profile) replaces person names, identifiers, institution and
  equipment details, addresses, and shifts every DA/DT (and the TM paired with a DA)
  back by one offset; it removes a list of patient attributes.
* **Keyed pseudonyms (HMAC-SHA256 of ``privacy.pseudonym_key``).** dicognito's own
  mapping is MD5(seed || value) with the seed a constructor argument: deterministic for
  a seed, but not a standard keyed hash, and one seed gives one date offset for every
  patient. So the identifiers a receiving system links on are replaced here, before
  dicognito sees them, with HMAC-SHA256 values: PatientID, PatientName,
  AccessionNumber, StudyID, DeviceSerialNumber (a dummy: Type 1 in Enhanced General
  Equipment), and **every UID** except class UIDs, transfer syntaxes and
  well-known DICOM UIDs (``1.2.840.10008.*``). A UID maps to ``2.25.<128 bits of the
  HMAC>`` wherever it appears, at any depth, so a de-identified SEG or SR still
  references the de-identified source images (ReferencedSOPInstanceUID, Study and
  Series UIDs in sequences, FrameOfReferenceUID) and the same patient under the same
  key gets the same pseudonyms in every study. The dicognito seed is itself an HMAC of
  the original PatientID, so the date offset is consistent per patient (intervals
  between a patient's studies are kept) and different between patients.
* **The profile's table, applied here at every depth.** dicognito keeps many attributes
  the profile removes (free-text comments, descriptions, reasons for the request, age,
  size, ...) and does not look inside most sequences. So after it has run, every data
  set, nested ones included, goes through ``node.deid_profile.BASIC_PROFILE`` (PS3.15
  Table E.1-1, Basic Profile column) by these rules:

  - ``X``: removed. Curve (50xx) and overlay (60xx) groups are removed whole (their
    data and comments are ``X``; an overlay without its data is not valid).
  - UIDs (``U``, ``D``), the keyed identifiers above and, for the Modified Dates option,
    dates and times (DA, DT, TM; ``C`` in that option's column) keep the replacement
    they were given; PatientBirthDate, outside that option, is emptied (``Z``).
  - Any other value whose code has ``Z`` in it (``Z``, ``X/Z``, ``Z/D``, ``X/Z/D``):
    zero length. An empty value carries nothing and is valid whether the IOD makes the
    attribute Type 2 or 3, which this code does not look up.
  - ``X/D``: removed (``D`` is only for IODs that make it Type 1).
  - Sequences: ``Z`` empties; ``X/Z``, ``X/D`` and ``X/Z/D`` remove (a Type 3 sequence
    with no items is not valid), except the two in ``_SEQUENCES`` that are Type 2 where
    they matter; ``D`` and ``X/Z/U*`` (ContentSequence, Source and Referenced Image
    Sequences, ...) are kept, their items cleaned by the same rules, so the references
    receivers need stay, with pseudonymous UIDs.
  - ``D`` on other values: a person name keeps dicognito's dummy; text gets a keyed
    pseudonym (the same value, the same dummy); anything else (an encapsulated document,
    a binary identifier) cannot be given a meaningful dummy, and the object is refused.
  - Content items (SR Content Sequence, ``D``): the sequence and its tree are kept, so a
    de-identified SR stays a valid SR with its codes, numbers and references, but every
    value that can carry free text or a name gets a dummy, at every depth: TextValue
    (no row of its own; ``CONTENT_ITEM_TEXT``) a keyed pseudonym, PersonName
    dicognito's dummy, Date, Time and DateTime the patient's offset, UID a keyed UID.
    The Clean Structured Content Option, which would keep cleaned text, is not claimed.
    For the node's own SRs this means the TEXT items (algorithm name and version of TID
    4019, tracking identifiers) arrive as dummies, the same dummy for the same text (the
    SEG's Algorithm Identification Sequence, not in the table, still names the lung model).

  Private attributes are removed at every depth, and so is
  IssuerOfPatientIDQualifiersSequence (not in the table; it qualifies the original
  PatientID's issuer).

The result says so: PatientIdentityRemoved YES, LongitudinalTemporalInformationModified
MODIFIED, DeidentificationMethod and DeidentificationMethodCodeSequence (CID 7050:
113100 Basic Application Confidentiality Profile, 113107 Retain Longitudinal Temporal
Information Modified Dates Option).

Pixel data is not cleaned (the Clean Pixel Data option is not claimed): an instance
marked BurnedInAnnotation YES is refused rather than sent with text in its pixels.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from dicognito.anonymizer import Anonymizer
from dicognito.element_anonymizer import ElementAnonymizer
from pydicom import DataElement, dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.deid_profile import BASIC_PROFILE
from node.errors import NodeError

#: DeidentificationMethod (LO, at most 64 characters).
METHOD = "PS3.15 Basic Profile (dicognito), HMAC-SHA256 pseudonyms"
#: CID 7050 codes this de-identification claims.
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
_STANDARD_UID_PREFIX = "1.2.840.10008."

#: Identifiers receivers link on, given keyed pseudonyms whatever the profile's code.
KEYED = ("PatientID", "PatientName", "AccessionNumber", "StudyID", "DeviceSerialNumber")
#: Removed although not in the profile's table (see the module's docstring).
ALSO_REMOVE = frozenset({tag_for_keyword("IssuerOfPatientIDQualifiersSequence")})
_DATES = ("DA", "DT", "TM")
#: VRs a keyed dummy (16 characters, A-Z and 0-9) is valid for.
_DUMMY_TEXT = ("AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT")
_PATIENT_BIRTH_DATE = tag_for_keyword("PatientBirthDate")
#: Curve and overlay repeating groups, all of which are removed.
_REPEATING_GROUPS = (0x5000, 0x6000)
#: Free text in content items (PS3.3 Table 10-2, Content Item Macro) that the table has no
#: row of its own for. Content Sequence is D in the Basic Profile (PS3.15 E.1-1): its
#: content is replaced with dummies, and kept cleaned only under the Clean Structured
#: Content Option, which is not claimed. The other content item values have rows and get
#: their own codes (PersonName D: dicognito's dummy; DateTime, Date, Time D: shifted
#: dates; UID U: a keyed UID); coded and numeric values carry no free text and stay. So a
#: TEXT item's value gets a keyed dummy, at any depth, in Content Sequence or any other
#: sequence of content items that is kept.
CONTENT_ITEM_TEXT = frozenset({tag_for_keyword("TextValue")})
#: Sequences whose code leaves a choice, and the one made. Other sequences: X/Z, X/D and
#: X/Z/D remove (an empty Type 3 sequence is not valid), Z empties, D and X/Z/U* keep.
_SEQUENCES = {
    # Type 2 in the Acquisition Context module, the only module that has it.
    tag_for_keyword("AcquisitionContextSequence"): "Z",
    # Type 2 in the SR and Key Object Document Series modules; its items are
    # references, whose UIDs get pseudonyms: the D choice.
    tag_for_keyword("ReferencedPerformedProcedureStepSequence"): "D",
}


class DeidentificationError(NodeError):
    """An object cannot be de-identified (no key, burned-in text, unreadable file)."""


class Deidentifier:
    """De-identifies datasets with pseudonyms keyed by ``key``; the same key, the same output."""

    def __init__(self, key: str) -> None:
        if not key:
            raise DeidentificationError(
                "privacy.pseudonym_key is not set (TRIAGE_NODE_PRIVACY__PSEUDONYM_KEY or "
                "privacy.pseudonym_key_file); refusing to send without de-identification"
            )
        self._key = key.encode()

    # -- pseudonyms --------------------------------------------------------------------
    def digest(self, kind: str, value: str) -> bytes:
        """HMAC-SHA256 of ``value``, separated by ``kind`` so equal strings of two kinds differ."""
        return hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """The pseudonymous UID of ``value``: ``2.25.`` and 128 bits of its HMAC (PS3.5 B.2)."""
        return f"2.25.{int.from_bytes(self.digest('uid', value)[:16], 'big')}"

    def patient_id(self, value: str) -> str:
        return "ANON-" + self.digest("PatientID", value).hex()[:16].upper()

    def patient_name(self, value: str) -> str:
        return "ANON^" + self.digest("PatientName", value).hex()[:12].upper()

    def short_id(self, kind: str, value: str) -> str:
        """A pseudonym for an SH identifier (16 characters at most)."""
        return kind[0] + self.digest(kind, value).hex()[:15].upper()

    # -- datasets ----------------------------------------------------------------------
    def deidentify(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (file meta included); ``ds`` is left as it is.

        The copy is made by encoding and reading back: objects built in memory (by
        highdicom) share item datasets between sequences, which an in-place walk would
        map twice, and hold dates as objects where dicognito expects DICOM text.
        """
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        copy = dcmread(buffer)
        self._deidentify(copy)
        return copy

    def _deidentify(self, ds: Dataset) -> None:
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise DeidentificationError(
                "BurnedInAnnotation is YES: pixel data would carry identifying text"
            )
        seed = self.digest("seed", str(ds.get("PatientID", ""))).hex()
        ds.remove_private_tags()
        if "file_meta" in ds.__dict__ and "SourceApplicationEntityTitle" in ds.file_meta:
            del ds.file_meta.SourceApplicationEntityTitle
        anonymizer = Anonymizer(seed=seed)
        anonymizer.add_element_handler(_KeyedIdentifiers(self))
        anonymizer.anonymize(ds)
        self._apply_profile(ds)
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        ds.DeidentificationMethod = METHOD
        codes = []
        for value, meaning in METHOD_CODES:
            code = Dataset()
            code.CodeValue = value
            code.CodingSchemeDesignator = "DCM"
            code.CodeMeaning = meaning
            codes.append(code)
        ds.DeidentificationMethodCodeSequence = codes

    def _apply_profile(self, ds: Dataset) -> None:
        """Apply the Basic Profile's table to ``ds`` and every data set nested in it."""
        for element in list(ds):
            action = _action(element)
            if action == "X":
                del ds[element.tag]
            elif action == "Z":
                element.value = empty_value_for_VR(element.VR)
            elif action == "D" and element.VR in _DUMMY_TEXT:
                kind = element.keyword or f"{element.tag:08X}"
                element.value = _map(element.value, partial(self.short_id, kind))
            elif action == "D":
                raise DeidentificationError(
                    f"{element.name} {element.tag}: the Basic Profile requires a dummy value, "
                    f"and none can be made for VR {element.VR}"
                )
            elif element.VR == "SQ":
                for item in element.value:
                    self._apply_profile(item)

    def deidentify_file(self, source: Path, target: Path) -> str:
        """Write a de-identified copy of the Part 10 file ``source``; returns its SOPInstanceUID.

        OSError other than a missing source (a full disk, an I/O error) propagates:
        it is not a property of the object, and the caller may try again later.
        """
        try:
            ds = dcmread(source)
        except FileNotFoundError as exc:
            raise DeidentificationError(f"cannot read: {type(exc).__name__}") from None
        except OSError:
            raise
        except Exception as exc:
            raise DeidentificationError(f"cannot read: {type(exc).__name__}") from None
        try:
            self._deidentify(ds)
            ds.save_as(target, enforce_file_format=True)
        except (DeidentificationError, OSError):
            raise
        except Exception as exc:  # a value dicognito or pydicom cannot handle
            raise DeidentificationError(f"failed: {type(exc).__name__}") from None
        return str(ds.SOPInstanceUID)


class _KeyedIdentifiers(ElementAnonymizer):
    """Runs before dicognito's handlers: the identifiers receivers link on, keyed by HMAC."""

    def __init__(self, deidentifier: Deidentifier) -> None:
        self._d = deidentifier

    def __call__(self, dataset: Dataset, data_element: DataElement) -> bool:
        keyword = data_element.keyword
        if data_element.VR == "UI":
            if (
                data_element.value
                and not keyword.endswith("ClassUID")
                and keyword != "TransferSyntaxUID"
            ):
                data_element.value = _map(data_element.value, self._uid)
            return True
        if keyword == "PatientID":
            data_element.value = _map(data_element.value, self._d.patient_id)
            return True
        if keyword == "PatientName":
            data_element.value = _map(data_element.value, self._d.patient_name)
            return True
        if keyword in KEYED:
            data_element.value = _map(data_element.value, lambda v: self._d.short_id(keyword, v))
            return True
        return False

    def _uid(self, value: str) -> str:
        return value if value.startswith(_STANDARD_UID_PREFIX) else self._d.uid(value)

    def describe_actions(self) -> Iterator[str]:
        yield "Replace non-class UIDs with 2.25 UIDs from HMAC-SHA256 of the key"
        yield (
            "Replace PatientID, PatientName, AccessionNumber, StudyID, DeviceSerialNumber "
            "with HMAC pseudonyms"
        )


def _action(element: DataElement) -> str:
    """What is done to ``element``: X remove, Z empty, D keyed dummy, K keep (and clean inside)."""
    tag = int(element.tag)
    if tag in ALSO_REMOVE or (tag >> 16) & 0xFF00 in _REPEATING_GROUPS:
        return "X"
    code = BASIC_PROFILE.get(tag)
    if code is None:
        return "D" if tag in CONTENT_ITEM_TEXT else "K"
    if code == "X":
        return "X"
    if element.VR == "SQ":
        code = _SEQUENCES.get(tag, code)
        return "K" if code == "D" or "U*" in code else "Z" if code == "Z" else "X"
    if (
        element.VR == "UI"
        or element.keyword in KEYED
        or (element.VR in _DATES and tag != _PATIENT_BIRTH_DATE)
    ):
        return "K"  # already replaced: a keyed pseudonym or a shifted date
    if "Z" in code:
        return "Z"
    if code.startswith("X"):
        return "X"
    return "K" if element.VR == "PN" else "D"  # a person name keeps dicognito's dummy


def _map(value: object, new: Callable[[str], str]) -> object:
    """Apply ``new`` to each value of a possibly multi-valued element; empty stays empty."""
    if value is None or value == "":
        return value
    if isinstance(value, MultiValue | list):
        return [new(str(v)) if str(v) else "" for v in value]
    return new(str(value))
