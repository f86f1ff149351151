"""Instance records: what the receiver writes and the later stages read."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

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
        """Insert the instance, or replace the existing record of the same SOP Instance UID
        (a new generation, to be routed again). Committed when this returns."""
        values = {
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
            "calling_ae": provenance.calling_ae,
            "called_ae": provenance.called_ae,
            "source_address": provenance.source_address,
            "routed": 0,
        }
        for _ in range(2):
            with self.engine.begin() as conn:
                existing = conn.execute(
                    select(instances.c.id, instances.c.generation).where(
                        instances.c.sop_instance_uid == header.sop_instance_uid
                    )
                ).first()
                if existing is None:
                    try:
                        conn.execute(
                            instances.insert().values(
                                sop_instance_uid=header.sop_instance_uid, generation=1, **values
                            )
                        )
                        return Recorded.NEW
                    except IntegrityError:
                        continue  # a concurrent association stored it first: overwrite
                conn.execute(
                    instances.update()
                    .where(instances.c.id == existing.id)
                    .values(generation=existing.generation + 1, **values)
                )
                return Recorded.OVERWRITTEN
        raise RuntimeError("could not record instance")  # pragma: no cover
