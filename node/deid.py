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
* **Added here, because dicognito keeps them**: private attributes are removed, as
  are the profile's "X" attributes dicognito leaves (age, size, weight, comments,
  descriptions, ...); PatientBirthDate and PatientSex are emptied ("Z").

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
from pathlib import Path

from dicognito.anonymizer import Anonymizer
from dicognito.element_anonymizer import ElementAnonymizer
from pydicom import DataElement, dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.errors import NodeError

#: DeidentificationMethod (LO, at most 64 characters).
METHOD = "PS3.15 Basic Profile (dicognito), HMAC-SHA256 pseudonyms"
#: CID 7050 codes this de-identification claims.
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
_STANDARD_UID_PREFIX = "1.2.840.10008."

#: Basic Profile "X" (remove) attributes that dicognito does not remove or replace.
REMOVE = (
    "AdditionalPatientHistory",
    "AdmissionID",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "CountryOfResidence",
    "CurrentPatientLocation",
    "DerivationDescription",
    "EthnicGroup",
    "ImageComments",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "MedicalAlerts",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientAge",
    "PatientAddress",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientComments",
    "PatientMotherBirthName",
    "PatientSize",
    "PatientState",
    "PatientWeight",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "PregnancyStatus",
    "ProtocolName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence",
    "RequestAttributesSequence",
    "SeriesDescription",
    "SmokingStatus",
    "SpecialNeeds",
    "StudyComments",
    "StudyDescription",
)
#: Basic Profile "Z" attributes kept present but emptied (Type 2 in their modules).
EMPTY = ("PatientBirthDate", "PatientSex")


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
        for keyword in REMOVE:
            if keyword in ds:
                delattr(ds, keyword)
        if "file_meta" in ds.__dict__ and "SourceApplicationEntityTitle" in ds.file_meta:
            del ds.file_meta.SourceApplicationEntityTitle
        anonymizer = Anonymizer(seed=seed)
        anonymizer.add_element_handler(_KeyedIdentifiers(self))
        anonymizer.anonymize(ds)
        for keyword in EMPTY:
            if keyword in ds:
                ds.data_element(keyword).value = ""  # type: ignore[union-attr]
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
        if keyword in ("AccessionNumber", "StudyID", "DeviceSerialNumber"):
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


def _map(value: object, new: Callable[[str], str]) -> object:
    """Apply ``new`` to each value of a possibly multi-valued element; empty stays empty."""
    if value is None or value == "":
        return value
    if isinstance(value, MultiValue | list):
        return [new(str(v)) if str(v) else "" for v in value]
    return new(str(value))
