"""PS3.15 Annex E, Table E.1-1 as data: what the Basic Application Level
Confidentiality Profile does to each attribute, and what each option changes.

The basic profile's column comes from a maintained library, dicom-anonymizer
(Kitware, BSD-3-Clause): its ``dicomfields_2026c`` table, one list per action
(``D_TAGS``, ``X_Z_TAGS``...), read here and never retyped. That library has no option
columns, so the ten option columns of Table E.1-1 (Retain Safe Private Option, Retain
UIDs Option, Retain Device Identity Option, Retain Institution Identity Option, Retain
Patient Characteristics Option, Retain Longitudinal Temporal Information with Full Dates
Option, ... with Modified Dates Option, Clean Descriptors Option, Clean Structured
Content Option, Clean Graphics Option) are below, as the standard gives them (in the
machine-readable extraction of PS3.15 published by innolitics/dicom-standard, MIT,
January 2025). Private attributes (the table's ``(gggg,eeee) where gggg is odd`` row) are
handled by :mod:`.deidentify`, not here.

Actions, as the standard names them: ``D`` dummy value, ``Z`` zero length (or dummy),
``X`` remove, ``K`` keep, ``C`` clean, ``U`` replace the UID consistently; ``Z/D``,
``X/Z``, ``X/D``, ``X/Z/D`` depend on the attribute's type in the IOD, and ``X/Z/U*``
is a sequence whose UIDs are replaced.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from dicomanonymizer.dicom_anonymization_databases import (  # type: ignore[import-untyped]
    dicomfields_2026c as _library_table,
)

#: Where the basic profile's column comes from (recorded in the docs and the method).
BASIC_PROFILE_SOURCE = "dicom-anonymizer dicomfields_2026c"

#: The dates and times both longitudinal-temporal options name (Table E.1-1).
_LONGITUDINAL_DATES = """
            00080012 00080013 00080015 00080020 00080021 00080022 00080023 00080024
            00080025 0008002a 00080030 00080031 00080032 00080033 00080034 00080035
            00080106 00080107 00080201 001021d0 00120086 00120087 0014407c 0014407e
            0016008d 00180027 00180035 00181012 00181014 00181042 00181043 00181072
            00181073 00181078 00181079 00181200 00181201 00181202 00181203 00181204
            00181205 0018700c 0018700e 00189074 00189151 00189369 0018936a 00189516
            00189517 00189623 00189701 00189804 00189919 0018a002 00203403 00203405
            00320032 00320033 00320034 00320035 00321000 00321001 00321010 00321011
            00321040 00321041 00321050 00321051 00340007 0038001a 0038001b 0038001c
            0038001d 00380020 00380021 00380030 00380032 003a0314 00400002 00400003
            00400004 00400005 00400244 00400245 00400250 00400251 00402004 00402005
            00404005 00404008 00404010 00404011 00404050 00404051 00404052 0040a023
            0040a024 0040a030 0040a032 0040a033 0040a082 0040a110 0040a112 0040a120
            0040a121 0040a122 0040a13a 0040a192 0040a193 0040db06 0040db07 0040e004
            00440004 0044000b 00440010 00440104 00440105 00686226 00686270 00700082
            00700083 0072000a 00720061 00720063 0072006b 01000420 04000105 04000310
            04000562 21000040 21000050 30060008 30060009 3006002d 3006002e 30080024
            30080025 30080054 30080056 30080162 30080164 30080166 30080168 30080250
            30080251 300a0006 300a0007 300a022c 300a022e 300a0736 300a073a 300a0741
            300a0760 300c0127 300e0004 300e0005 3010004c 3010004d 30100085 40080100
            40080101 40080108 40080109 40080112 40080113
        """

_CATEGORY_ACTIONS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

#: Table E.1-1's option columns: option -> action (K or C) -> tags, ``x`` a repeating
#: digit (``60xx3000`` is Overlay Data in every overlay group).
_OPTION_COLUMNS: dict[str, dict[str, str]] = {
    "retain_uids": {
        "K": """
            00001000 00001001 00020003 00041511 00080014 00080017 00080018 00080019
            00080058 00081110 00081111 00081120 00081140 00081155 00081195 00082112
            00083010 00181002 0018100b 00182042 0020000d 0020000e 00200052 00200200
            00209161 00209164 00281199 00281214 003a0310 00400554 00404023 0040a171
            0040a172 0040a402 0040db0c 0040db0d 00620021 00640003 006a0003 0070031a
            00701101 00701102 00880140 30060024 300600c2 300a0013 300a0083 300a0609
            300a0650 300a0700 300a0785 30100006 3010000b 30100013 30100015 30100031
            3010003b 3010006e 3010006f
        """,
    },
    "retain_device_identity": {
        "C": """
            00080054 00080055 00081000 00321021 00400001 00400241 0072005e 00741234
            00741236 21000070 21000140
        """,
        "K": """
            00081010 0014407c 0014407e 0016004e 0016004f 00160050 00160051 00181000
            00181002 00181004 00181005 00181007 00181008 00181009 0018100a 0018100b
            00181200 00181201 00181202 00181203 00181204 00181205 00185011 0018700a
            0018700c 0018700e 00189367 00189371 00189373 00203401 00321020 00400010
            00400011 00400242 00404025 00404027 00404028 00404030 00500020 04000563
            30080105 300a00b2 300a0216 300c0127 3010002d 30100043
        """,
    },
    "retain_institution_identity": {
        "K": """
            00080080 00080081 00080082 00081040 00081041 00120030 00120031 00120060
            00120081 04000564
        """,
    },
    "retain_patient_characteristics": {
        "C": """
            00102110 00380050 00380500 00400012
        """,
        "K": """
            00100040 00101010 00101020 00101030 00102160 001021a0 001021c0 00102203
            0072005f
        """,
    },
    # The two longitudinal options name the same dates: one keeps them (K), the
    # other shifts them (C).
    "retain_longitudinal_full_dates": {"K": _LONGITUDINAL_DATES},
    "retain_longitudinal_modified_dates": {"C": _LONGITUDINAL_DATES},
    "clean_descriptors": {
        "C": """
            00081030 0008103e 00081080 00081084 00081088 00082111 00084000 00102000
            00102110 00102180 001021b0 00104000 00120051 00120072 0016002b 0016004b
            00180010 00181030 001811bb 00181400 00184000 00189185 0018937b 0018937f
            00189424 00189937 0018a003 00200027 00204000 00209158 00321030 00321060
            00321066 00321067 00321070 00324000 00380040 00380062 00380500 00384000
            003a0329 003a032b 00400007 00400254 00400275 00400280 00400310 0040051a
            00400600 00400602 00401002 0040100a 00401400 00402001 00402400 00500021
            006a0005 006a0006 00720066 00720068 0072006c 0072006e 00720070 04000565
            22000002 30020121 30020123 30060002 30060004 30060006 30060026 30060028
            30060038 30060085 30060088 300a0002 300a0003 300a0004 300a000b 300a000e
            300a0016 300a0072 300a00c3 300a00dd 300a0196 300a01a6 300a01b2 300a02eb
            300a0608 300a0619 300a0623 300a062a 300a0676 300a067c 300a067d 300a0734
            300a0742 300a0783 300a078e 300a0792 300a0794 300a079a 300c0113 3010000f
            30100017 30100033 30100034 30100035 30100036 30100037 30100038 30100054
            30100056 3010005a 3010005c 30100061 30100077 3010007a 3010007b 3010007f
            30100081 4008010b 40080115 40080300 40084000
        """,
    },
    "clean_structured_content": {
        "C": """
            00400555 00400610 0040a730
        """,
    },
    "clean_graphics": {
        "C": """
            00700001 50xxxxxx 60xx3000 60xx4000
        """,
    },
}


#: A repeating-group row: (group, element, group mask, element mask, action).
Masked = tuple[int, int, int, int, str]


def _basic_profile() -> tuple[dict[int, str], list[Masked]]:
    exact: dict[int, str] = {}
    masked: list[Masked] = []
    for category, action in _CATEGORY_ACTIONS.items():
        for entry in getattr(_library_table, category):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                group, element, group_mask, element_mask = entry
                masked.append((group, element, group_mask, element_mask, action))
    return exact, masked


def _parse_tag(text: str) -> tuple[int, int, int, int]:
    """``0008103e`` or ``60xx3000``: (group, element, group mask, element mask)."""
    group_mask = int("".join("0" if c == "x" else "f" for c in text[:4]), 16)
    element_mask = int("".join("0" if c == "x" else "f" for c in text[4:]), 16)
    group = int(text[:4].replace("x", "0"), 16)
    element = int(text[4:].replace("x", "0"), 16)
    return group, element, group_mask, element_mask


def _option_columns() -> dict[str, tuple[dict[int, str], list[Masked]]]:
    columns: dict[str, tuple[dict[int, str], list[Masked]]] = {}
    for option, by_action in _OPTION_COLUMNS.items():
        exact: dict[int, str] = {}
        masked: list[Masked] = []
        for action, tags in by_action.items():
            for text in tags.split():
                group, element, group_mask, element_mask = _parse_tag(text)
                if group_mask == 0xFFFF and element_mask == 0xFFFF:
                    exact[(group << 16) | element] = action
                else:
                    masked.append((group, element, group_mask, element_mask, action))
        columns[option] = (exact, masked)
    return columns


_BASIC = _basic_profile()
_OPTIONS = _option_columns()


def _lookup(column: tuple[dict[int, str], list[Masked]], tag: int) -> str | None:
    exact, masked = column
    action = exact.get(tag)
    if action is not None:
        return action
    group, element = tag >> 16, tag & 0xFFFF
    for m_group, m_element, group_mask, element_mask, m_action in masked:
        if group & group_mask == m_group and element & element_mask == m_element:
            return m_action
    return None


def basic_action(tag: int) -> str | None:
    """The basic profile's action for ``tag``, or None if Table E.1-1 does not list it."""
    return _lookup(_BASIC, tag)


def option_action(option: str, tag: int) -> str | None:
    """What ``option`` does to ``tag`` (``K`` or ``C``), or None if its column is blank."""
    column = _OPTIONS.get(option)
    return _lookup(column, tag) if column is not None else None


class ActionTable:
    """Table E.1-1 resolved for a set of options: one action per tag.

    An option's entry replaces the basic profile's. Where two enabled options both
    name an attribute (Device UID under Retain UIDs and Retain Device Identity,
    Allergies under Retain Patient Characteristics and Clean Descriptors), keeping
    wins over cleaning, since each option alone already allows what it says.
    """

    def __init__(self, options: Iterable[str]) -> None:
        self.options = frozenset(options)
        self.action = lru_cache(maxsize=4096)(self._resolve)

    def _resolve(self, tag: int) -> str | None:
        said = {option_action(option, tag) for option in self.options} - {None}
        if "K" in said:
            return "K"
        if "C" in said:
            return "C"
        return basic_action(tag)
