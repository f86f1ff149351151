"""Keyed pseudonyms: the same original, under the same secret, always gives the same
replacement, on any node, on any day, after any restart.

Every value is an HMAC-SHA256 of the original under the secret, with a label per
kind of value so that a UID and a Patient ID that happen to be equal get unrelated
pseudonyms. Without the secret the pseudonyms cannot be reversed or recomputed from
a guess (a bare hash of a Patient ID could be, by hashing every plausible ID). The
secret is read from the environment variable the step names; it is never logged,
stored or put in a message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

from .base import TransformUnavailable

#: The root of UIDs made from a 128-bit number (ISO/IEC 9834-8, PS3.5 B.2).
UUID_ROOT = "2.25."
#: Offsets are drawn from 1 to this many days, always into the past.
MAX_DATE_OFFSET_DAYS = 3652


@dataclass(frozen=True)
class PatientKey:
    """Who a patient is, for pseudonyms: the Patient ID within its issuer.

    Two hospitals may give the same Patient ID to different people, so the issuer
    (Issuer of Patient ID) is part of the key: the same ID under another issuer is
    another pseudonymous patient. An object without a Patient ID is keyed on its
    Patient's Name and Birth Date instead, so that anonymous objects of different
    people do not all land on one pseudonymous patient.
    """

    patient_id: str
    issuer: str = ""
    name: str = ""
    birth_date: str = ""

    @classmethod
    def of(cls, dataset: Dataset) -> PatientKey:
        """The key of the patient an object belongs to."""

        def text(keyword: str) -> str:
            return str(dataset.get(keyword, "") or "").strip(" \0")

        return cls(
            patient_id=text("PatientID"),
            issuer=text("IssuerOfPatientID"),
            name=text("PatientName"),
            birth_date=text("PatientBirthDate"),
        )

    def material(self) -> bytes:
        if self.patient_id:
            parts = ["id", self.issuer, self.patient_id]
        else:
            parts = ["name", self.name, self.birth_date]
        return "\x00".join(parts).encode("utf-8", "surrogateescape")


class Pseudonymizer:
    """The keyed functions, for one secret."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("empty secret")
        self._secret = secret

    @classmethod
    def from_environ(cls, variable: str, environ: Mapping[str, str]) -> Pseudonymizer:
        """The secret in ``environ[variable]``; missing or empty: TransformUnavailable
        naming the variable (never the value)."""
        value = environ.get(variable, "")
        if not value:
            raise TransformUnavailable(
                f"the de-identification secret is not set: environment variable "
                f"{variable} is {'empty' if variable in environ else 'missing'}"
            )
        return cls(value.encode("utf-8", "surrogateescape"))

    def _digest(self, label: str, material: bytes) -> bytes:
        return hmac.new(self._secret, label.encode() + b"\x00" + material, hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """``2.25.`` and the decimal of 128 bits of the HMAC of ``original``, with the
        version (8, custom) and variant bits of an RFC 9562 UUID set: at most 44
        characters, no leading zero, a valid UID."""
        material = original.strip("\x00 ").encode("ascii", "replace")
        raw = bytearray(self._digest("uid", material)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80
        raw[8] = (raw[8] & 0x3F) | 0x80
        return UUID_ROOT + str(int.from_bytes(raw, "big"))

    def patient_id(self, key: PatientKey, prefix: str = "") -> str:
        """``prefix`` and 16 base32 characters (80 bits) of the HMAC of the key."""
        code = base64.b32encode(self._digest("patient", key.material())[:10]).decode()
        return prefix + code

    def date_offset_days(self, key: PatientKey) -> int:
        """The patient's date shift for de-identification: from -1 to
        -MAX_DATE_OFFSET_DAYS days, the same for every object of the patient, so
        intervals between their dates are kept."""
        return -(1 + self._offset_number(key) % MAX_DATE_OFFSET_DAYS)

    def shift_days(self, key: PatientKey, max_days: int) -> int:
        """The patient's shift for ``shift_dates``: in ``[-max_days, -1]`` or
        ``[1, max_days]``, from the same keyed number as :meth:`date_offset_days`."""
        n = self._offset_number(key) % (2 * max_days)
        return n - max_days if n < max_days else n - max_days + 1

    def _offset_number(self, key: PatientKey) -> int:
        return int.from_bytes(self._digest("date-offset", key.material())[:8], "big")
