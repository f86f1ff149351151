"""Synthetic objects for the de-identification tests: a CT image carrying a bit of
every kind of identity Table E.1-1 cares about, and an SR document."""

from __future__ import annotations

from collections.abc import Mapping

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from dicomrouter.config.transforms import DeidentifyConfig
from dicomrouter.transforms.base import ObjectContext
from dicomrouter.transforms.deidentify import Deidentify

SECRET_ENV = "DEID_TEST_SECRET"
SECRET = "correct horse battery staple"
ENVIRON = {SECRET_ENV: SECRET}
CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
ROOT = "1.2.826.0.1.3680043.10.999."


def step(*options: str, environ: Mapping[str, str] = ENVIRON, **config: object) -> Deidentify:
    return Deidentify(
        DeidentifyConfig(secret_env=SECRET_ENV, options=list(options), **config),  # type: ignore[arg-type]
        environ,
    )


def run(dataset: Dataset, *options: str, **config: object) -> Dataset:
    step(*options, **config).apply(dataset, ObjectContext())
    return dataset


def item(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def image(
    *,
    patient_id: str = "PID-4711",
    patient_name: str = "Doe^Jane",
    issuer: str | None = None,
    study: str = ROOT + "1",
    series: str = ROOT + "1.1",
    sop: str = ROOT + "1.1.1",
    frame_of_reference: str = ROOT + "1.9",
    study_date: str = "20240110",
    references: str | None = None,
    sop_class: str = CT,
    modality: str = "CT",
    burned_in: str | None = "NO",
) -> Dataset:
    """A CT image header (no Pixel Data: the step gets the header only)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "CT_SCANNER_7"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.InstanceCreatorUID = ROOT + "77"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame_of_reference
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.InstanceCreationDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesTime = "101600"
    ds.AcquisitionTime = "101700.123"
    ds.ContentTime = "101800"
    ds.AcquisitionDateTime = study_date + "101700.123+0100"
    ds.AccessionNumber = "ACC-99812"
    ds.Modality = modality
    ds.Manufacturer = "ACME Medical"
    ds.ManufacturerModelName = "Scanomatic 9000"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.InstitutionAddress = "1 Hospital Road, Springfield"
    ds.InstitutionalDepartmentName = "Radiology East"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.OperatorsName = "Tech^Terry"
    ds.StationName = "CTROOM7"
    ds.DeviceSerialNumber = "SN-123456"
    ds.StudyDescription = "CT head for Doe after fall"
    ds.SeriesDescription = "Axial 5mm PID-4711"
    ds.ProtocolName = "Head routine"
    ds.StudyID = "S7781"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    ds.PatientBirthDate = "19610305"
    ds.PatientSex = "F"
    ds.PatientAge = "062Y"
    ds.PatientWeight = "71.5"
    ds.PatientSize = "1.68"
    ds.EthnicGroup = "Martian"
    ds.OtherPatientIDs = "OLD-0815"
    ds.PatientAddress = "12 Elm Street"
    ds.AdditionalPatientHistory = "Fell at home, Jane Doe says"
    ds.ImageComments = "reviewed by Dr House"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    ds.RequestAttributesSequence = Sequence(
        [item(RequestedProcedureID="RP-1", ScheduledProcedureStepID="SPS-1")]
    )
    if references:
        ds.ReferencedImageSequence = Sequence(
            [item(ReferencedSOPClassUID=CT, ReferencedSOPInstanceUID=references)]
        )
        ds.SourceImageSequence = Sequence(
            [item(ReferencedSOPClassUID=CT, ReferencedSOPInstanceUID=references)]
        )
        ds.ReferencedSeriesSequence = Sequence(
            [
                item(
                    SeriesInstanceUID=series,
                    ReferencedInstanceSequence=Sequence(
                        [item(ReferencedSOPClassUID=CT, ReferencedSOPInstanceUID=references)]
                    ),
                )
            ]
        )
    # An overlay plane (60xx) and a private block (one declared safe, one not).
    ds.add_new(0x60000010, "US", 2)
    ds.add_new(0x60000011, "US", 2)
    ds.add_new(0x60000022, "LO", "Overlay by Doe")
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\x01\x00")
    ds.add_new(0x60004000, "LT", "Overlay for Jane Doe")
    block = ds.private_block(0x0009, "ACME SAFE 1.0", create=True)
    block.add_new(0x10, "DS", "1.25")
    block.add_new(0x11, "LO", "kept")
    other = ds.private_block(0x0011, "ACME PHI", create=True)
    other.add_new(0x10, "LO", "Jane Doe, 12 Elm Street")
    ds.PrivateDataElementCharacteristicsSequence = Sequence(
        [
            item(
                PrivateGroupReference=0x0009,
                PrivateCreatorReference="ACME SAFE 1.0",
                BlockIdentifyingInformationStatus="SAFE",
            )
        ]
    )
    return ds


def report(study: str = ROOT + "5", sop: str = ROOT + "5.1.1") -> Dataset:
    """A Comprehensive SR with free text naming the patient."""
    ds = image(study=study, series=ROOT + "5.1", sop=sop, sop_class=SR, modality="SR")
    del ds.BurnedInAnnotation
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentSequence = Sequence(
        [
            item(
                RelationshipType="CONTAINS",
                ValueType="TEXT",
                TextValue="Jane Doe (PID-4711): no bleed. Seen at St Elsewhere Hospital.",
                ConceptNameCodeSequence=Sequence(
                    [item(CodeValue="121071", CodingSchemeDesignator="DCM", CodeMeaning="Finding")]
                ),
            ),
            item(
                RelationshipType="HAS OBS CONTEXT",
                ValueType="PNAME",
                PersonName="House^Gregory",
            ),
        ]
    )
    ds.AcquisitionContextSequence = Sequence([item(TextValue="Doe fell")])
    return ds
