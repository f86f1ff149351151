"""Keyed pseudonyms: deterministic under one secret, unrelated under another."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from dicomrouter.transforms.base import TransformUnavailable
from dicomrouter.transforms.pseudonyms import (
    MAX_DATE_OFFSET_DAYS,
    PatientKey,
    Pseudonymizer,
)

ORIGINALS = [
    "1.2.3",
    "1.2.826.0.1.3680043.10.999.1.1.1",
    "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322",
    "9" * 64,
]


def test_uid_is_deterministic_valid_and_keyed() -> None:
    one, again, other = Pseudonymizer(b"secret"), Pseudonymizer(b"secret"), Pseudonymizer(b"x")
    seen = set()
    for original in ORIGINALS:
        uid = one.uid(original)
        assert uid == again.uid(original)  # a restart: a new instance, same secret
        assert uid != other.uid(original)
        assert uid.startswith("2.25.") and len(uid) <= 64
        assert UID(uid).is_valid
        seen.add(uid)
    assert len(seen) == len(ORIGINALS)
    # Padding read from a file does not make another UID.
    assert one.uid("1.2.3\x00") == one.uid("1.2.3")


def test_patient_id_keyed_on_issuer_with_prefix() -> None:
    p = Pseudonymizer(b"secret")
    key = PatientKey("PID-4711", "HOSPITAL-A")
    assert p.patient_id(key, "R-") == Pseudonymizer(b"secret").patient_id(key, "R-")
    assert p.patient_id(key, "R-").startswith("R-")
    assert len(p.patient_id(key)) == 16 and p.patient_id(key).isalnum()
    assert p.patient_id(key) != p.patient_id(PatientKey("PID-4711", "HOSPITAL-B"))
    assert p.patient_id(key) != p.patient_id(PatientKey("PID-4712", "HOSPITAL-A"))
    assert p.patient_id(key) != Pseudonymizer(b"other").patient_id(key)
    # Without a Patient ID: keyed on name and birth date, so two anonymous
    # patients do not merge.
    assert p.patient_id(PatientKey("", name="A^B", birth_date="1970")) != p.patient_id(
        PatientKey("", name="C^D", birth_date="1970")
    )


def test_date_offset_one_per_patient_in_range() -> None:
    p = Pseudonymizer(b"secret")
    offsets = {p.date_offset_days(PatientKey(f"P{n}")) for n in range(200)}
    assert all(-MAX_DATE_OFFSET_DAYS <= days <= -1 for days in offsets)
    assert len(offsets) > 150  # spread, not one offset for everyone
    assert p.date_offset_days(PatientKey("P1")) == Pseudonymizer(b"secret").date_offset_days(
        PatientKey("P1")
    )


@pytest.mark.parametrize("environ", [{}, {"DEID_KEY": ""}], ids=["missing", "empty"])
def test_missing_secret_names_the_variable(environ: dict[str, str]) -> None:
    with pytest.raises(TransformUnavailable, match="DEID_KEY"):
        Pseudonymizer.from_environ("DEID_KEY", environ)


def test_secret_value_never_in_the_message() -> None:
    assert Pseudonymizer.from_environ("DEID_KEY", {"DEID_KEY": "s3cr3t"}).uid("1.2") != ""
    with pytest.raises(TransformUnavailable) as raised:
        Pseudonymizer.from_environ("OTHER", {"DEID_KEY": "s3cr3t"})
    assert "s3cr3t" not in str(raised.value)
