"""``shift_dates``: move every date of an object by a number of days.

Every DA element, and the date part of every DT element, anywhere in the data set
(nested sequences included, File Meta excluded) moves by the same offset, so
intervals within an object, and within a patient, are kept. Times are not touched.

The offset is either fixed (``days``) or per patient (``secret_env``): HMAC-SHA256
keyed by the secret over the patient's key (Patient ID within its issuer, else name
and birth date: :class:`~.pseudonyms.PatientKey`, as de-identification keys its
pseudonyms), read as a number of days in ``[-max_days, max_days]``, never 0. The
same patient therefore gets the same offset on every object, every day and after
restarts, and nobody without the secret can compute it from the Patient ID. The
secret is read from the environment when the step runs; without it, the pipeline
cannot run and its deliveries are held.

A value with year or month precision only (DT ``2021`` or ``202103``) is kept: it has no
day to shift. A non-empty value that is not a date is refused rather than sent
unshifted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, timedelta

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomrouter.config.transforms import ShiftDatesConfig

from .base import ObjectContext, Step, TransformRefused, TransformUnavailable
from .pseudonyms import PatientKey, Pseudonymizer
from .tags import describe_tag

_DA_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_DT_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})(.*)$")
_PARTIAL_DT_RE = re.compile(r"^\d{4}(\d{2})?([+-]\d{4})?$")


def shift_da(text: str, days: int) -> str:
    """A DA value moved by ``days``; ValueError when it is not a date."""
    match = _DA_RE.match(text)
    if not match:
        raise ValueError("not a date (YYYYMMDD)")
    return _shift(match, days).strftime("%Y%m%d")


def shift_dt(text: str, days: int) -> str:
    """The date part of a DT value moved by ``days``, its time and offset kept."""
    if _PARTIAL_DT_RE.match(text):
        return text
    match = _DT_RE.match(text)
    if not match:
        raise ValueError("not a date-time (YYYYMMDDHHMMSS...)")
    return _shift(match, days).strftime("%Y%m%d") + match[4]


def _shift(match: re.Match[str], days: int) -> date:
    try:
        moved = date(int(match[1]), int(match[2]), int(match[3])) + timedelta(days=days)
    except (ValueError, OverflowError) as exc:
        raise ValueError(str(exc)) from None
    return moved


class ShiftDates(Step):
    kind = "shift_dates"

    def __init__(self, config: ShiftDatesConfig, environ: Mapping[str, str], where: str):
        if (config.days is None) == (config.secret_env is None):
            raise ValueError("give either days (a fixed shift) or secret_env (per patient)")
        self.keyed = config.secret_env is not None
        self.config = config
        self.environ = environ
        self.where = where

    def offset(self, dataset: Dataset) -> int:
        if self.config.days is not None:
            return self.config.days
        name = self.config.secret_env or ""
        secret = self.environ.get(name, "")
        if not secret:
            raise TransformUnavailable(
                f"{self.where}: the environment variable {name} (the secret of the "
                "per-patient date offset) is not set"
            )
        pseudonyms = Pseudonymizer(secret.encode("utf-8", "surrogateescape"))
        return pseudonyms.shift_days(PatientKey.of(dataset), self.config.max_days)

    def apply(self, dataset: Dataset, context: ObjectContext) -> None:
        days = self.offset(dataset)
        if days:
            self._walk(dataset, days)

    def _walk(self, dataset: Dataset, days: int) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value or ():
                    self._walk(item, days)
            elif element.VR in ("DA", "DT") and element.value not in (None, ""):
                shift = shift_da if element.VR == "DA" else shift_dt
                values = element.value
                multi = isinstance(values, MultiValue | list)
                items = list(values) if multi else [values]
                try:
                    moved = [
                        shift(str(v).strip(" \0"), days) if str(v).strip() else v for v in items
                    ]
                except ValueError as exc:
                    raise TransformRefused(
                        f"{self.where}: cannot shift {describe_tag(element.tag)} "
                        f"{element.value!r}: {exc}"
                    ) from None
                element.value = moved if multi else moved[0]
