"""Configuration of transforms: named pipelines of steps (``transforms:``), and what
a destination sends (its transfer syntax, the SOP classes it takes).

Each step is a mapping with exactly one step key (``set``, ``remove``...) and, for
any step, a ``when`` in the rule language. The step models are a union told apart
by that key, so an error names the step's own key path
(``transforms.fix-ct1[2].replace.AccessionNumber.pattern``). What the steps do is in
``docs/transforms.md``; the code that runs them is ``dicomrouter.transforms``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

from .problems import checked_rule

#: The step keys, in the order the documentation lists them.
STEP_KINDS = (
    "set",
    "remove",
    "remove_private",
    "copy",
    "replace",
    "map",
    "shift_dates",
    "deidentify",
)

#: PS3.15 Annex E options of the Basic Application Level Confidentiality Profile, by
#: the standard's names in snake_case (table E.1-1's columns).
DeidentifyOption = Literal[
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]
DEIDENTIFY_OPTIONS: tuple[str, ...] = get_args(DeidentifyOption)

#: Transfer syntaxes a destination may ask for, by name (a UID is accepted too).
#: ``as-received`` sends each file in the syntax it was stored in.
LOSSLESS_SYNTAXES = {
    "as-received": "",
    "explicit-little": "1.2.840.10008.1.2.1",
    "implicit-little": "1.2.840.10008.1.2",
    "deflated": "1.2.840.10008.1.2.1.99",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
    "jpeg-lossless-sv1": "1.2.840.10008.1.2.4.70",
    "htj2k-lossless": "1.2.840.10008.1.2.4.201",
}
#: Lossy syntaxes: only with ``allow_lossy: true``.
LOSSY_SYNTAXES = {
    "jpeg-ls-near-lossless": "1.2.840.10008.1.2.4.81",
    "jpeg2000": "1.2.840.10008.1.2.4.91",
    "jpeg-baseline": "1.2.840.10008.1.2.4.50",
}

#: Syntaxes above that cannot be encoded here, and why: a destination naming one is
#: refused by ``check`` rather than failing at send time (tests/transforms/
#: test_transcode.py checks that these, and only these, have no encoder).
NO_ENCODER = {
    "1.2.840.10008.1.2.4.50": "pydicom 3 has no JPEG Baseline encoder",
}

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)


Rule = dict[str, Any]
#: A value ``set`` writes: text (a template over tags and pseudo-keys, see
#: docs/transforms.md), a number, a list for a multi-valued element, or null for an
#: empty value.
TagValue = str | int | float | list[str | int | float] | None


class _Step(_Model):
    when: Rule | None = Field(
        None, description="Apply the step only to objects matching this rule (docs/rules.md)."
    )

    _compile_when = field_validator("when")(classmethod(lambda cls, when: checked_rule(when)))

    @property
    def kind(self) -> str:
        fields = type(self).model_fields
        return next(name for name in STEP_KINDS if (fields.get(name) or fields.get(name + "_")))


class SetStep(_Step):
    """Write values: ``{InstitutionName: "General Hospital", StationName: "{CallingAETitle}"}``."""

    set: dict[str, TagValue] = Field(..., description="Tag (keyword or `gggg,eeee`) to value.")


class PrivateTag(_Model):
    """A private element by its creator: ``{creator: "ACME 1.1", tag: "0009,xx10"}`` is
    the element at offset ``10`` of the block ``ACME 1.1`` reserved in group 0009."""

    creator: str = Field(..., min_length=1, description="Private creator (e.g. `ACME 1.1`).")
    tag: str = Field(..., description="`gggg,xxee`: group and offset in the block.")


class RemoveStep(_Step):
    """Delete elements (top level): keywords, tags (``0009,1010``), private elements
    in any block (``0009,xx10``) or in one creator's block (``{creator: "ACME 1.1",
    tag: "0009,xx10"}``)."""

    remove: list[str | PrivateTag] = Field(
        ...,
        min_length=1,
        description="Elements to delete: keyword, `gggg,eeee`, `gggg,xxee` (private, any "
        "block), or `{creator, tag}` (private, that creator's block).",
    )


class RemovePrivateConfig(_Model):
    keep_creators: list[str] = Field(
        default_factory=list,
        description="Private creators (e.g. `SIEMENS CSA HEADER`) whose blocks are kept.",
    )


class RemovePrivateStep(_Step):
    """Delete every private element, except the blocks of the creators kept."""

    remove_private: RemovePrivateConfig = Field(
        default_factory=RemovePrivateConfig, description="What private data to keep."
    )

    @field_validator("remove_private", mode="before")
    @classmethod
    def _bare(cls, value: Any) -> Any:
        # `remove_private: true` (or an empty value) removes every private element.
        return {} if value is True or value is None else value


class CopyStep(_Step):
    """Copy values between elements, written ``{target: source}`` as ``set`` is:
    ``{StudyID: AccessionNumber}`` writes the AccessionNumber into StudyID."""

    copy_: dict[str, str] = Field(
        ..., alias="copy", description="Target tag to the source tag it takes its value from."
    )


class Replacement(_Model):
    pattern: str = Field(..., description="Python regular expression searched in the value.")
    with_: str = Field(
        "", alias="with", description="Replacement; `\\1` or `\\g<name>` refer to groups."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return pattern


class ReplaceStep(_Step):
    """Regular-expression replacement in text values: ``{AccessionNumber: {pattern:
    "^0+", with: ""}}``."""

    replace: dict[str, Replacement] = Field(..., description="Tag to its replacement.")


class Lookup(_Model):
    file: Path = Field(
        ...,
        description="CSV file: original value, new value (a first row starting `original` "
        "is a header). Relative: to the configuration file's folder. Reloaded when it changes.",
    )
    missing: Literal["keep", "remove", "fail"] | str = Field(
        "keep",
        description="A value not in the file: `keep` it, `remove` the element, `fail` the "
        "delivery of that object, or any other text to write instead.",
    )

    @field_validator("file")
    @classmethod
    def _absolute(cls, value: Path, info: ValidationInfo) -> Path:
        # Not required to exist here: a missing table holds deliveries back (they
        # wait and retry) and `check` warns; it must not stop the router starting.
        base = (info.context or {}).get("base_dir")
        path = value.expanduser()
        if not path.is_absolute():
            path = (Path(base) if base is not None else Path.cwd()) / path
        return Path(os.path.normpath(path))


class MapStep(_Step):
    """Look values up in a CSV table, reloaded when the file changes."""

    map: dict[str, Lookup] = Field(..., description="Tag to its lookup table.")


class ShiftDatesConfig(_Model):
    days: int | None = Field(
        None, description="Fixed shift in days (negative: earlier). Unset: use `secret_env`."
    )
    secret_env: str | None = Field(
        None,
        description="Environment variable holding a secret: each patient gets their own "
        "offset (keyed on PatientID, within `max_days`), the same on every object.",
    )
    max_days: int = Field(365, ge=1, description="Largest per-patient offset, in days.")


class ShiftDatesStep(_Step):
    """Move every date (DA, DT) by an offset, keeping intervals within a patient."""

    shift_dates: ShiftDatesConfig = Field(..., description="The offset.")


class ReidentifyMappingConfig(_Model):
    """Where the key of the re-identification mapping comes from."""

    key_env: str = Field(
        ...,
        min_length=1,
        description="Environment variable holding the mapping key: any secret of at least "
        "32 characters (e.g. `openssl rand -base64 32`). Keys are derived from it with "
        "HKDF-SHA256; it is never written to the index or the logs. Unset at run time: "
        "deliveries through the pipeline wait.",
    )


class DeidentifyConfig(_Model):
    secret_env: str = Field(
        ...,
        description="Environment variable holding the secret that keys the pseudonyms "
        "(HMAC-SHA256). The secret is never written to the index or the logs.",
    )
    options: list[DeidentifyOption] = Field(
        default_factory=list, description="PS3.15 Annex E profile options."
    )
    allow_burned_in: bool = Field(
        False,
        description="Send objects whose pixels may show identity (BurnedInAnnotation YES, "
        "secondary capture, ultrasound...). Unset: their delivery fails with the reason.",
    )
    patient_id_prefix: str = Field("", description="Prefix of pseudonymous Patient IDs.")
    mapping: ReidentifyMappingConfig | None = Field(
        None,
        description="Record the re-identification mapping (original to pseudonym: "
        "patient, study, series and instance UIDs, date offset), encrypted in the index, "
        "readable only by `admin` and audited (docs/transforms.md, Re-identification). "
        "Unset: nothing is recorded.",
    )

    @field_validator("options")
    @classmethod
    def _dates_once(cls, options: list[str]) -> list[str]:
        dates = {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"}
        if dates <= set(options):
            raise ValueError(
                "retain_longitudinal_full_dates and retain_longitudinal_modified_dates "
                "exclude each other: keep the dates, or shift them"
            )
        return options


class DeidentifyStep(_Step):
    """De-identify by the Basic Application Level Confidentiality Profile."""

    deidentify: DeidentifyConfig = Field(..., description="Secret and profile options.")


def _step_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [key for key in value if key in STEP_KINDS]
        return kinds[0] if len(kinds) == 1 else None
    if isinstance(value, BaseModel):
        return getattr(value, "kind", None)
    return None


#: Each step's model, by its key.
STEP_MODELS: dict[str, type[_Step]] = {
    "set": SetStep,
    "remove": RemoveStep,
    "remove_private": RemovePrivateStep,
    "copy": CopyStep,
    "replace": ReplaceStep,
    "map": MapStep,
    "shift_dates": ShiftDatesStep,
    "deidentify": DeidentifyStep,
}

TransformStep = Annotated[
    Annotated[SetStep, Tag("set")]
    | Annotated[RemoveStep, Tag("remove")]
    | Annotated[RemovePrivateStep, Tag("remove_private")]
    | Annotated[CopyStep, Tag("copy")]
    | Annotated[ReplaceStep, Tag("replace")]
    | Annotated[MapStep, Tag("map")]
    | Annotated[ShiftDatesStep, Tag("shift_dates")]
    | Annotated[DeidentifyStep, Tag("deidentify")],
    Discriminator(
        _step_kind,
        custom_error_type="transform_step",
        custom_error_message="a step is a mapping with exactly one of: " + ", ".join(STEP_KINDS),
    ),
]

#: A named pipeline: its steps, in order.
Pipeline = list[TransformStep]


class SopClassFilter(_Model):
    """Which SOP classes a destination takes (names such as `CTImageStorage`, or UIDs).
    An instance left out is recorded as ``skipped``, with the reason, not as failed."""

    include: list[str] | None = Field(None, description="Only these. Unset: every class.")
    exclude: list[str] = Field(default_factory=list, description="Never these.")

    @field_validator("include", "exclude")
    @classmethod
    def _known(cls, values: list[str] | None) -> list[str] | None:
        if values is None:
            return None
        from pydicom.uid import UID

        resolved = []
        for value in values:
            if _UID_RE.match(value):
                resolved.append(value)
                continue
            uid = _sop_class_by_name(value)
            if uid is None:
                raise ValueError(
                    f"unknown SOP class {value!r} (a name such as CTImageStorage, or a UID)"
                )
            resolved.append(str(UID(uid)))
        return resolved


def _sop_class_by_name(name: str) -> str | None:
    from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]

    for uid, entry in UID_dictionary.items():
        keyword = entry[4] if len(entry) > 4 else ""
        if name in (keyword, entry[0]) and entry[1] == "SOP Class":
            return str(uid)
    return None


def transfer_syntax_uid(name: str) -> str:
    """The UID of a syntax named in ``transfer_syntax`` ("" for ``as-received``)."""
    if name in LOSSLESS_SYNTAXES:
        return LOSSLESS_SYNTAXES[name]
    if name in LOSSY_SYNTAXES:
        return LOSSY_SYNTAXES[name]
    return name
