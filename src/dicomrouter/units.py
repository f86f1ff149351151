"""Human-friendly value types used in the YAML file: durations, time windows, sizes.

They are parsed once, at load time, so a typo such as ``send_window: "19:00-7"``
is reported with its key path instead of failing at 19:00.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Return seconds for ``10s``, ``30m``, ``1.5h``, ``250ms``, ``2d`` or a bare number."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 30m or 2h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"invalid duration {value!r}: expected a number with ms, s, m, h or d")


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
"""Seconds as a float; written in YAML as ``30s``, ``10m``..."""


_WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_WINDOW_RE = re.compile(
    r"^\s*(?:(?P<days>[A-Za-z]{3}(?:-[A-Za-z]{3})?(?:,[A-Za-z]{3}(?:-[A-Za-z]{3})?)*)\s+)?"
    r"(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$"
)


def _parse_hhmm(text: str) -> time:
    hours, minutes = (int(part) for part in text.split(":"))
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or (hours == 24 and minutes):
        raise ValueError(f"invalid time of day {text!r}")
    return time.max if hours == 24 else time(hours, minutes)


def _parse_days(text: str | None) -> frozenset[int]:
    if not text:
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.lower().split(","):
        first, _, last = part.partition("-")
        if first not in _WEEKDAYS or (last and last not in _WEEKDAYS):
            raise ValueError(f"invalid weekday in {text!r}: use mon, tue, wed, thu, fri, sat, sun")
        start = _WEEKDAYS.index(first)
        stop = _WEEKDAYS.index(last) if last else start
        index = start
        while True:
            days.add(index)
            if index == stop:
                break
            index = (index + 1) % 7
    return frozenset(days)


@dataclass(frozen=True)
class TimeWindow:
    """A daily local-time window such as ``19:00-07:00`` or ``Mon-Fri 08:00-18:00``.

    A window whose end is before its start spans midnight; the weekday names the
    day on which the window *opens*.
    """

    text: str
    start: time
    end: time
    days: frozenset[int]

    @classmethod
    def parse(cls, value: Any) -> TimeWindow:
        if isinstance(value, TimeWindow):
            return value
        if not isinstance(value, str):
            raise ValueError("expected a window such as '19:00-07:00' or 'Mon-Fri 08:00-18:00'")
        match = _WINDOW_RE.match(value)
        if not match:
            raise ValueError(
                f"invalid time window {value!r}: expected 'HH:MM-HH:MM', "
                "optionally preceded by weekdays such as 'Mon-Fri'"
            )
        start, end = _parse_hhmm(match["start"]), _parse_hhmm(match["end"])
        if start == end:
            raise ValueError(f"time window {value!r} is empty: start equals end")
        return cls(value.strip(), start, end, _parse_days(match["days"]))

    def contains(self, moment: datetime) -> bool:
        now = moment.time()
        if self.start < self.end:
            return moment.weekday() in self.days and self.start <= now < self.end
        # Spans midnight: the evening part belongs to today, the morning part to yesterday.
        if now >= self.start:
            return moment.weekday() in self.days
        if now < self.end:
            return (moment.weekday() - 1) % 7 in self.days
        return False

    def next_open(self, moment: datetime) -> datetime:
        """The first instant at or after ``moment`` inside the window (minute resolution)."""
        if self.contains(moment):
            return moment
        candidate = moment.replace(second=0, microsecond=0)
        for day_offset in range(8):
            day = candidate + timedelta(days=day_offset)
            opening = day.replace(hour=self.start.hour, minute=self.start.minute)
            if opening >= moment and self.contains(opening):
                return opening
        raise ValueError(f"time window {self.text!r} never opens")  # pragma: no cover


Window = Annotated[
    TimeWindow,
    BeforeValidator(TimeWindow.parse),
    PlainSerializer(lambda window: window.text, return_type=str),
]


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: Any) -> int:
    """Return bytes for ``10MB`` (10**7), ``10MiB`` (10 * 2**20), ``512k``, ``1.5G`` or a
    bare number of bytes. ``K``/``M``/``G``/``T`` are decimal, with ``i`` binary."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10MB or 512KiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            unit = (match.group(2) or "").lower().rstrip("b")
            base = 1024 if unit.endswith("i") else 1000
            return int(float(match.group(1)) * base ** _SIZE_POWERS[unit.rstrip("i")])
    raise ValueError(f"invalid size {value!r}: expected bytes, or a number with KB, MB, GB, MiB...")


def format_size(size: int) -> str:
    units = ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("GiB", 1 << 30), ("MiB", 1 << 20)
    for unit, factor in (*units, ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str)]
"""Bytes as an int; written in YAML as ``10MB``, ``512KiB``..."""
