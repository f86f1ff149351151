"""Building pipelines from YAML-shaped data, as the configuration file gives them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydicom.dataset import Dataset

from dicomrouter.config import RouterConfig
from dicomrouter.transforms import CompiledPipeline, ObjectContext, compile_pipeline


def pipeline(
    steps: list[dict[str, Any]], environ: Mapping[str, str] | None = None, name: str = "p"
) -> CompiledPipeline:
    config = RouterConfig.model_validate({"transforms": {name: steps}})
    return compile_pipeline(name, config.transforms[name], environ or {})


def run(
    steps: list[dict[str, Any]],
    dataset: Dataset,
    context: ObjectContext | None = None,
    environ: Mapping[str, str] | None = None,
) -> Dataset:
    pipeline(steps, environ).apply(dataset, context or ObjectContext())
    return dataset


def ct() -> Dataset:
    ds = Dataset()
    ds.PatientID = "P001"
    ds.PatientName = "Doe^John"
    ds.AccessionNumber = "000123"
    ds.Modality = "CT"
    ds.SeriesNumber = 7
    ds.StudyDate = "20240131"
    ds.InstitutionName = "Old Hospital"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4"
    return ds
