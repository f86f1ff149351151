"""Instance records: what the receiver writes and the later stages read."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

from sqlalchemy import Engine, Executable, select

from .header import InstanceHeader
from .schema import instances


class Recorded(StrEnum):
    NEW = "new"
    OVERWRITTEN = "overwritten"
    DUPLICATE_IGNORED = "duplicate-ignored"


@dataclass(frozen=True)
class Provenance:
    """Who sent an instance; the rules' pseudo-keys read these."""

    calling_ae: str = ""
    called_ae: str = ""
    source_address: str = ""


class InstanceIndex:
    def __init__(self, engine: Engine):
        self.engine = engine

    def exists(self, sop_instance_uid: str) -> bool:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(instances.c.id).where(instances.c.sop_instance_uid == sop_instance_uid)
            ).first()
        return row is not None

    def record(
        self,
        header: InstanceHeader,
        relative_path: str,
        size: int,
        provenance: Provenance,
        received_at: float | None = None,
    ) -> Recorded:
        """Insert the instance, or replace the record of the same SOP Instance UID as a
        new generation (to be routed again). One statement; committed on return."""
        values = {
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "patient_id": header.patient_id[:64],
            "patient_name": header.patient_name[:324],
            "accession_number": header.accession_number[:64],
            "study_date": header.study_date[:8],
            "study_description": header.study_description[:64],
            "modality": header.modality[:16],
            "path": relative_path,
            "size": size,
            "received_at": received_at or time.time(),
            "calling_ae": provenance.calling_ae[:16],
            "called_ae": provenance.called_ae[:16],
            "source_address": provenance.source_address[:64],
            "generation": 1,
            "routed": 0,
        }
        with self.engine.begin() as conn:
            generation = conn.execute(self._upsert, values).scalar_one()
        return Recorded.NEW if generation == 1 else Recorded.OVERWRITTEN

    @cached_property
    def _upsert(self) -> Executable:
        """``INSERT .. ON CONFLICT (sop_instance_uid) DO UPDATE .. RETURNING generation``
        (SQLite and PostgreSQL share the syntax)."""
        from sqlalchemy.dialects import postgresql, sqlite

        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(instances)
        replaced: dict[str, Any] = {
            column.name: statement.excluded[column.name]
            for column in instances.columns
            if column.name not in ("id", "sop_instance_uid", "generation")
        }
        replaced["generation"] = instances.c.generation + 1
        return statement.on_conflict_do_update(
            index_elements=[instances.c.sop_instance_uid], set_=replaced
        ).returning(instances.c.generation)
