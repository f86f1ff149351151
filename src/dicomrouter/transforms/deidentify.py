"""The ``deidentify`` step: PS3.15 Annex E, the Basic Application Level
Confidentiality Profile and its options, with keyed pseudonyms.

What each attribute gets comes from Table E.1-1 (:mod:`.annex_e`); the replacement
values that must stay consistent across objects (UIDs, the Patient ID, each
patient's date offset) come from :mod:`.pseudonyms`. The step sees the header only:
Pixel Data is copied through by the output writer, so pixels are never read, and an
object whose pixels may show identity is refused (see :meth:`Deidentify.refusal`).
What the step does, option by option, is in docs/transforms.md ("De-identification").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]

from dicomrouter.config.transforms import DeidentifyConfig

from .annex_e import ActionTable
from .base import MappingRecord, ObjectContext, Step, TransformRefused
from .mapping import MappingKey
from .pseudonyms import PatientKey, Pseudonymizer

#: The profile and each option: its code (CID 7050, scheme DCM, pydicom's keyword).
PROFILE_CODE = codes.DCM.BasicApplicationConfidentialityProfile
OPTION_CODES = {
    "retain_safe_private": codes.DCM.RetainSafePrivateOption,
    "retain_uids": codes.DCM.RetainUidsOption,
    "retain_device_identity": codes.DCM.RetainDeviceIdentityOption,
    "retain_institution_identity": codes.DCM.RetainInstitutionIdentityOption,
    "retain_patient_characteristics": codes.DCM.RetainPatientCharacteristicsOption,
    "retain_longitudinal_full_dates": (
        codes.DCM.RetainLongitudinalTemporalInformationFullDatesOption
    ),
    "retain_longitudinal_modified_dates": (
        codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption
    ),
    "clean_descriptors": codes.DCM.CleanDescriptorsOption,
    "clean_structured_content": codes.DCM.CleanStructuredContentOption,
    "clean_graphics": codes.DCM.CleanGraphicsOption,
}

#: SOP classes whose pixels often show identity (screen captures, ultrasound and
#: photographs with the patient's name in the image, slide labels), by UID.
BURNED_IN_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image (Retired)
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image (Retired)
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
        "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image
        "1.2.840.10008.5.1.4.1.1.77.1.6",  # VL Whole Slide Microscopy (label images)
    }
)
#: Modalities of the same kind, for objects of other classes: ultrasound, secondary
#: capture, external-camera photography, other.
BURNED_IN_MODALITIES = frozenset({"US", "SC", "XC", "OT"})

#: UID-valued attributes that name a kind of thing (a SOP class, a transfer syntax, a
#: coding scheme, the writing software), not an instance: never replaced.
CLASS_UID_KEYWORDS = frozenset(
    {
        "SOPClassUID",
        "MediaStorageSOPClassUID",
        "ReferencedSOPClassUID",
        "ReferencedSOPClassUIDInFile",
        "AffectedSOPClassUID",
        "RequestedSOPClassUID",
        "RelatedGeneralSOPClassUID",
        "OriginalSpecializedSOPClassUID",
        "SOPClassesInStudy",
        "TransferSyntaxUID",
        "ReferencedTransferSyntaxUIDInFile",
        "ImplementationClassUID",
        "PrivateInformationCreatorUID",
        "CodingSchemeUID",
        "ContextGroupExtensionCreatorUID",
        "MappingResourceUID",
    }
)
_CLASS_UID_TAGS = frozenset(int(Tag(keyword)) for keyword in CLASS_UID_KEYWORDS)

#: File meta elements that name the sending application, not needed downstream.
_META_REMOVED = tuple(
    int(Tag(keyword))
    for keyword in (
        "SourceApplicationEntityTitle",
        "SendingApplicationEntityTitle",
        "ReceivingApplicationEntityTitle",
        "SourcePresentationAddress",
        "SendingPresentationAddress",
        "ReceivingPresentationAddress",
        "PrivateInformationCreatorUID",
        "PrivateInformation",
    )
)

#: Sequences with D (or X/D, X/Z/D) whose items hold what Table E.1-1 does not list
#: (the SR content tree's text, annotation text, a person's or institution's codes):
#: removed, or emptied where the action allows Z, instead of de-identified item by
#: item. A Clean option that applies (C) keeps them, cleaned.
_OPAQUE_SEQUENCES = frozenset(
    int(Tag(keyword))
    for keyword in (
        "ContentSequence",
        "GraphicAnnotationSequence",
        "PersonIdentificationCodeSequence",
        "WaveformAnnotationSequence",
        "InstitutionCodeSequence",
        "OperatorIdentificationSequence",
    )
)

_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_DATE_VRS = frozenset({"DA", "DT"})
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UT", "UC", "PN"})
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
#: Dummy values (action D) by VR: non-empty, valid for the VR, telling nothing.
_DUMMY: dict[str, Any] = {
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "PN": "ANONYMOUS",
    "AE": "ANONYMOUS",
    "AS": "000D",
    "CS": "ANONYMIZED",
    "IS": "0",
    "DS": "0",
    "UR": "",
}


def _is_well_known(uid: str) -> bool:
    return uid.startswith("1.2.840.10008.") or uid in UID_dictionary


class Deidentify(Step):
    """PS3.15 E.1 Basic Application Level Confidentiality Profile with the
    configured options; ``environ`` holds the secret (``config.secret_env``)."""

    kind = "deidentify"
    keyed = True
    sees_every_element = True
    touches_pixels = False

    def __init__(self, config: DeidentifyConfig, environ: Mapping[str, str]) -> None:
        options = frozenset(config.options)
        if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= options:
            raise ValueError(
                "retain_longitudinal_full_dates and retain_longitudinal_modified_dates "
                "exclude each other: keep the dates, or shift them"
            )
        self.config = config
        self.options = options
        self._environ = environ
        self._table = ActionTable(options)

    def secret_problem(self) -> str | None:
        """Why the step cannot run now (its secret is not set), for ``check``."""
        try:
            Pseudonymizer.from_environ(self.config.secret_env, self._environ)
        except Exception as exc:  # TransformUnavailable
            return str(exc)
        return None

    def pseudonymizer(self) -> Pseudonymizer:
        """The keyed functions; TransformUnavailable if the secret is not set."""
        return Pseudonymizer.from_environ(self.config.secret_env, self._environ)

    def mapping_key(self) -> MappingKey | None:
        """The re-identification mapping's key, None when no mapping is configured;
        TransformUnavailable if it is configured and its key is not set: nothing
        goes out unrecorded."""
        if self.config.mapping is None:
            return None
        return MappingKey.from_environ(self.config.mapping.key_env, self._environ)

    def apply(self, dataset: Dataset, context: ObjectContext) -> None:
        pseudonyms = self.pseudonymizer()
        key = self.mapping_key()
        if not self.config.allow_burned_in:
            reason = self.refusal(dataset)
            if reason:
                raise TransformRefused(reason)
        run = _Run(self, pseudonyms, dataset)
        originals = _Originals.of(dataset) if key is not None else None
        run.run()
        if key is not None and originals is not None and context.record is not None:
            for record in originals.records(key, context.pipeline, run):
                context.record(record)

    @staticmethod
    def refusal(dataset: Dataset) -> str | None:
        """Why the pixels may show identity, or None.

        BurnedInAnnotation YES is always refused. A class or modality known for
        burned-in identity (secondary capture, ultrasound, photographs, endoscopy,
        slide labels; Modality US, SC, XC, OT) is refused unless the object says
        BurnedInAnnotation NO: the sender's explicit statement is trusted, its
        absence is not.
        """
        burned = str(dataset.get("BurnedInAnnotation", "") or "").strip().upper()
        tail = "pixels may show identity; set allow_burned_in: true on the step to send it anyway"
        if burned == "YES":
            return f"BurnedInAnnotation is YES: {tail}"
        if burned == "NO":
            return None
        said = "absent" if not burned else repr(burned)
        sop_class = str(dataset.get("SOPClassUID", "") or "").strip()
        if sop_class in BURNED_IN_SOP_CLASSES:
            name = UID_dictionary.get(sop_class, (sop_class,))[0]
            return f"{name} with BurnedInAnnotation {said}: {tail}"
        modality = str(dataset.get("Modality", "") or "").strip().upper()
        if modality in BURNED_IN_MODALITIES:
            return f"Modality {modality} with BurnedInAnnotation {said}: {tail}"
        return None


@dataclass(frozen=True)
class _Originals:
    """What the re-identification mapping keeps of one object, read before the
    profile changes it."""

    patient: PatientKey
    uids: tuple[tuple[str, str], ...]  # (kind, original UID)

    @classmethod
    def of(cls, dataset: Dataset) -> _Originals:
        uids = []
        for kind, keyword in _MAPPED_UIDS:
            uid = str(dataset.get(keyword, "") or "").strip("\x00 ")
            if uid and not _is_well_known(uid):
                uids.append((kind, uid))
        return cls(PatientKey.of(dataset), tuple(uids))

    def records(self, key: MappingKey, pipeline: str, run: _Run) -> Iterator[MappingRecord]:
        material = self.patient.material()
        original = {
            "PatientID": self.patient.patient_id,
            "IssuerOfPatientID": self.patient.issuer,
            "PatientName": self.patient.name,
            "PatientBirthDate": self.patient.birth_date,
        }
        yield key.seal(pipeline, "patient", material, run.patient, original)
        if run.offset is not None:
            days = {"days": run.offset.days}
            yield key.seal(pipeline, "date_offset", material, run.patient, days)
        if run.retain_uids:
            return
        for kind, uid in self.uids:
            yield key.seal(
                pipeline,
                kind,
                uid.encode("ascii", "replace"),
                run.pseudonyms.uid(uid),
                {"uid": uid},
            )


#: The UIDs the mapping records, by kind.
_MAPPED_UIDS = (
    ("study", "StudyInstanceUID"),
    ("series", "SeriesInstanceUID"),
    ("instance", "SOPInstanceUID"),
)


class _Scrubber:
    """Clean (action C) of free text: removes every identifier the object itself
    carries (names, IDs, birth date, accession, institution...) wherever it occurs."""

    def __init__(self, identifiers: Iterable[str]) -> None:
        words = sorted({word for word in identifiers if len(word) >= 3}, key=len, reverse=True)
        self._pattern = (
            re.compile("|".join(re.escape(word) for word in words), re.IGNORECASE)
            if words
            else None
        )

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        cleaned = re.sub(r"\s{2,}", " ", self._pattern.sub("", text)).strip()
        # Text that was all identity becomes a dummy, not empty: a Type 1 text (an
        # SR TEXT item's Text Value) must keep a value.
        return cleaned if cleaned or not text.strip() else "ANONYMIZED"


_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "OperatorsName",
    "ResponsiblePerson",
)
_INSTITUTION_KEYWORDS = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName")
_DEVICE_KEYWORDS = ("StationName", "DeviceSerialNumber")


def _texts(value: Any) -> Iterator[str]:
    values = value if isinstance(value, list | MultiValue) else [value]
    for item in values:
        if item is not None and not isinstance(item, bytes | Dataset):
            yield str(item).strip()


def _identifiers(dataset: Dataset, options: frozenset[str]) -> list[str]:
    keywords = list(_IDENTIFYING_KEYWORDS)
    if "retain_institution_identity" not in options:
        keywords += _INSTITUTION_KEYWORDS
    if "retain_device_identity" not in options:
        keywords += _DEVICE_KEYWORDS
    found: list[str] = []
    for keyword in keywords:
        if keyword in dataset:
            found.extend(_texts(dataset[keyword].value))
    for element in dataset.iterall():
        if element.VR == "PN":
            found.extend(_texts(element.value))
    birth = str(dataset.get("PatientBirthDate", "") or "").strip()
    if len(birth) == 8 and birth.isdigit():
        year, month, day = birth[:4], birth[4:6], birth[6:]
        found += [birth, f"{year}-{month}-{day}", f"{day}/{month}/{year}", f"{month}/{day}/{year}"]
        found += [f"{day}.{month}.{year}", f"{year}.{month}.{day}"]
    words: list[str] = []
    for text in found:
        words.append(text)
        words.extend(part for part in re.split(r"[\^=\s,]+", text) if part)
    return words


def _shift_date(value: str, offset: timedelta) -> str:
    """A DA value moved by ``offset``; an unreadable one becomes empty."""
    text = value.strip().replace(".", "")
    if not text:
        return ""
    if "-" in text:  # a range
        return "-".join(_shift_date(part, offset) if part else "" for part in text.split("-"))
    try:
        day = date(int(text[:4]), int(text[4:6] or 1), int(text[6:8] or 1))
        shifted = (day + offset).strftime("%Y%m%d")
    except (ValueError, OverflowError):
        return ""
    return shifted[: len(text)] if len(text) in (4, 6) else shifted


def _shift_datetime(value: str, offset: timedelta) -> str:
    text = value.strip()
    match = re.match(r"^(\d{4}(?:\d{2}(?:\d{2})?)?)(.*)$", text)
    if not match:
        return ""
    shifted = _shift_date(match.group(1), offset)
    return shifted + match.group(2) if shifted else ""


class _Run:
    """One object through the profile."""

    def __init__(self, step: Deidentify, pseudonyms: Pseudonymizer, dataset: Dataset) -> None:
        self.step = step
        self.options = step.options
        self.table = step._table
        self.pseudonyms = pseudonyms
        self.dataset = dataset
        key = PatientKey.of(dataset)
        self.patient = pseudonyms.patient_id(key, step.config.patient_id_prefix)
        self.offset: timedelta | None = None
        if "retain_longitudinal_modified_dates" in self.options:
            self.offset = timedelta(days=pseudonyms.date_offset_days(key))
        cleaning = {"clean_descriptors", "clean_structured_content", "clean_graphics"}
        self.scrub = _Scrubber(
            _identifiers(dataset, self.options) if cleaning & self.options else ()
        )
        self.retain_uids = "retain_uids" in self.options
        self.graphics = "clean_graphics" in self.options

    def run(self) -> None:
        self.walk(self.dataset, clean=False)
        meta = getattr(self.dataset, "file_meta", None)
        if meta is not None:
            for tag in _META_REMOVED:
                if tag in meta:
                    del meta[tag]
            if "MediaStorageSOPInstanceUID" in meta and not self.retain_uids:
                self.map_uids(meta["MediaStorageSOPInstanceUID"])
        self.mark()

    # -- the walk --------------------------------------------------------------

    def walk(self, dataset: Dataset, clean: bool) -> None:
        safe_private = (
            self.safe_private_tags(dataset) if "retain_safe_private" in self.options else set()
        )
        for tag in list(dataset.keys()):
            self.element(dataset, BaseTag(tag), clean, safe_private)

    def element(self, dataset: Dataset, tag: BaseTag, clean: bool, safe: set[int]) -> None:
        if tag.element == 0 and tag.group != 0x0002:  # group lengths (retired)
            del dataset[tag]
            return
        if tag.is_private:
            if int(tag) in safe:
                self.unlisted(dataset[tag], clean)
            else:
                del dataset[tag]
            return
        if 0x6000 <= tag.group <= 0x60FF and self.table.action((tag.group << 16) | 0x3000) == "X":
            del dataset[tag]  # the overlay goes as a whole, not only its data
            return
        element = dataset[tag]
        if tag in (_PATIENT_ID, _PATIENT_NAME):
            element.value = self.patient  # Z/D and Z: the consistent pseudonym
            return
        action = self.table.action(int(tag))
        if action is None and element.VR == "UR":
            # Not in the table, but a URI names a host and, often, the original
            # study and series UIDs (RetrieveURL in a key object's references).
            del dataset[tag]
        elif action is None and element.VR == "PN" and element.value:
            self.dummy(element)  # a person's name the table does not list yet
        elif action is None:
            in_graphics = tag.group & 0xFF00 in (0x5000, 0x6000) and self.graphics
            self.unlisted(element, clean or in_graphics)
        elif action == "K":
            if element.VR == "SQ":
                self.items(element, clean)
        elif action == "C":
            self.clean(element)
        elif action == "U":
            if not self.retain_uids:
                self.map_uids(element)
        elif action == "X":
            del dataset[tag]
        elif action == "X/Z/U*":
            if element.VR == "SQ":
                self.items(element, clean)
            else:
                self.empty(element)
        elif action in ("Z", "X/Z"):
            self.empty(element)
        elif element.VR == "SQ":
            if int(tag) not in _OPAQUE_SEQUENCES:
                # D on a sequence: its items are the dummy, each attribute in them
                # replaced by its own action (Verifying Observer Sequence...).
                self.items(element, clean)
            elif "Z" in action:
                element.value = Sequence()
            else:
                del dataset[tag]
        else:  # D, Z/D, X/D, X/Z/D: a dummy keeps the attribute valid in any IOD
            self.dummy(element)

    def items(self, element: DataElement, clean: bool) -> None:
        for item in element.value or ():
            self.walk(item, clean)

    def unlisted(self, element: DataElement, clean: bool) -> None:
        """An attribute Table E.1-1 does not list: kept, but its UIDs are replaced,
        its dates shifted under the modified-dates option, its text cleaned inside a
        cleaned sequence. (Unlisted URIs are removed and unlisted person names get a
        dummy before this: see :meth:`element`.)"""
        if element.VR == "SQ":
            self.items(element, clean)
        elif element.VR == "UI":
            if not self.retain_uids and int(element.tag) not in _CLASS_UID_TAGS:
                self.map_uids(element)
        elif element.VR in _DATE_VRS and self.offset is not None:
            self.shift(element)
        elif clean and element.VR in _TEXT_VRS:
            self.clean_text(element)

    def clean(self, element: DataElement) -> None:
        """Action C: dates shifted (TM kept: the shift is whole days), text cleaned of
        the object's identifiers, sequences kept with their content cleaned."""
        if element.VR == "SQ":
            self.items(element, clean=True)
        elif element.VR in _DATE_VRS:
            if self.offset is not None:
                self.shift(element)
        elif element.VR in _TEXT_VRS:
            self.clean_text(element)
        elif element.VR == "UI" and not self.retain_uids:
            self.map_uids(element)

    # -- values ----------------------------------------------------------------

    def map_uids(self, element: DataElement) -> None:
        def one(value: Any) -> Any:
            uid = str(value or "").strip("\x00 ")
            if not uid or _is_well_known(uid):
                return value
            return self.pseudonyms.uid(uid)

        value = element.value
        if isinstance(value, list | MultiValue):
            element.value = [one(item) for item in value]
        elif isinstance(value, bytes):
            element.value = one(value.decode("ascii", "replace")).encode("ascii")
        else:
            element.value = one(value)

    def shift(self, element: DataElement) -> None:
        assert self.offset is not None
        offset = self.offset
        move = _shift_date if element.VR == "DA" else _shift_datetime

        def one(value: Any) -> str:
            return move(str(value or ""), offset) if value else ""

        value = element.value
        if isinstance(value, list | MultiValue):
            element.value = [one(item) for item in value]
        else:
            element.value = one(value)

    def clean_text(self, element: DataElement) -> None:
        value = element.value
        if isinstance(value, list | MultiValue):
            element.value = [self.scrub(str(item)) for item in value]
        elif value is not None:
            element.value = self.scrub(str(value))

    @staticmethod
    def empty(element: DataElement) -> None:
        if element.VR == "SQ":
            element.value = Sequence()
        elif element.VR in _BYTES_VRS:
            element.value = b""
        elif element.VR in _NUMBER_VRS:
            element.value = None
        else:
            element.value = ""

    def dummy(self, element: DataElement) -> None:
        vr = element.VR
        if vr == "UI":
            if not self.retain_uids:
                self.map_uids(element)
        elif vr in _DUMMY:
            element.value = _DUMMY[vr]
        elif vr in _TEXT_VRS:
            element.value = "ANONYMIZED"
        elif vr in _NUMBER_VRS:
            element.value = 0
        elif vr in _BYTES_VRS:
            element.value = b"\x00\x00"
        else:
            element.value = None

    # -- private attributes ----------------------------------------------------

    @staticmethod
    def safe_private_tags(dataset: Dataset) -> set[int]:
        """Private elements the object itself declares safe (PS3.15 E.3.10, Private
        Data Element Characteristics Sequence): whole blocks marked SAFE, and the
        elements listed as non-identifying in blocks marked MIXED."""
        declared: dict[tuple[int, str], set[int] | None] = {}
        for item in dataset.get("PrivateDataElementCharacteristicsSequence", None) or ():
            group = item.get("PrivateGroupReference")
            creator = str(item.get("PrivateCreatorReference", "") or "").strip()
            status = str(item.get("BlockIdentifyingInformationStatus", "") or "").upper()
            if group is None or not creator:
                continue
            if status == "SAFE":
                declared[(int(group), creator)] = None
            elif status == "MIXED":
                listed = item.get("NonidentifyingPrivateElements") or []
                if not isinstance(listed, list | MultiValue):
                    listed = [listed]
                declared[(int(group), creator)] = {int(offset) & 0xFF for offset in listed}
        safe: set[int] = set()
        if not declared:
            return safe
        for raw_tag in list(dataset.keys()):
            tag = BaseTag(raw_tag)
            if not tag.is_private:
                continue
            if 0x0010 <= tag.element <= 0x00FF:
                creator = str(dataset[tag].value or "").strip()
                if (tag.group, creator) in declared:
                    safe.add(int(tag))
            elif tag.element >= 0x1000:
                creator_tag = (tag.group << 16) | (tag.element >> 8)
                if creator_tag not in dataset:
                    continue
                creator = str(dataset[creator_tag].value or "").strip()
                offsets = declared.get((tag.group, creator), set())
                if offsets is None or (tag.element & 0xFF) in offsets:
                    safe.add(int(tag))
        return safe

    # -- what was done ---------------------------------------------------------

    def mark(self) -> None:
        dataset = self.dataset
        dataset.PatientIdentityRemoved = "YES"
        used = [PROFILE_CODE] + [
            OPTION_CODES[option] for option in OPTION_CODES if option in self.options
        ]
        methods = [m for m in _texts(dataset.get("DeidentificationMethod", "")) if m]
        methods += [code.meaning for code in used]
        dataset.DeidentificationMethod = methods
        sequence = dataset.get("DeidentificationMethodCodeSequence", None) or Sequence()
        for code in used:
            item = Dataset()
            item.CodeValue = code.value
            item.CodingSchemeDesignator = code.scheme_designator
            item.CodeMeaning = code.meaning
            sequence.append(item)
        dataset.DeidentificationMethodCodeSequence = sequence
        if "retain_longitudinal_full_dates" in self.options:
            dataset.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif self.offset is not None:
            dataset.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            dataset.LongitudinalTemporalInformationModified = "REMOVED"
