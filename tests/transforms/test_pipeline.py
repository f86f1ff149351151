"""Compiling pipelines: versions, when:, chains, errors, the builder registry."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset

from dicomrouter.config import RouterConfig
from dicomrouter.config.transforms import STEP_KINDS
from dicomrouter.transforms import (
    STEP_BUILDERS,
    ObjectContext,
    PipelineError,
    TransformRefused,
    chain,
    chain_label,
    compile_pipelines,
)
from dicomrouter.transforms.base import Step
from tests.transforms.helpers import ct, pipeline, run


def config(transforms: dict[str, Any]) -> RouterConfig:
    return RouterConfig.model_validate({"transforms": transforms})


def test_version_is_stable_short_and_follows_the_configuration() -> None:
    a = pipeline([{"set": {"StationName": "A"}}])
    assert a.version == pipeline([{"set": {"StationName": "A"}}]).version
    assert len(a.version) == 6 and int(a.version, 16) >= 0
    assert a.version != pipeline([{"set": {"StationName": "B"}}]).version
    when = pipeline([{"set": {"StationName": "A"}, "when": {"Modality": "CT"}}])
    assert when.version != a.version
    assert a.label == f"p @ {a.version}"


def test_when_sees_the_dataset_as_changed_by_earlier_steps() -> None:
    steps = [
        {"set": {"Modality": "OT"}},
        {"set": {"StationName": "saw-OT"}, "when": {"Modality": "OT"}},
        {"set": {"StudyID": "saw-CT"}, "when": {"Modality": "CT"}},
        {"set": {"InstitutionName": "from-M1"}, "when": {"CallingAETitle": "M1"}},
    ]
    ds = run(steps, ct(), ObjectContext(calling_ae="M1"))
    assert ds.StationName == "saw-OT"
    assert "StudyID" not in ds
    assert ds.InstitutionName == "from-M1"


def test_compile_pipelines_reports_every_problem_with_its_key_path() -> None:
    with pytest.raises(PipelineError) as info:
        compile_pipelines(
            config(
                {
                    "a": [{"set": {"StationNme": "x"}}],
                    "b": [{"remove": ["PatientName"]}, {"copy": {"X1": "Y"}}],
                }
            ),
            {},
        )
    wheres = [where for where, _ in info.value.problems]
    assert wheres == ["transforms.a[0].set.StationNme", "transforms.b[1].copy.X1"]


def test_chain_runs_route_pipeline_then_destination_pipeline() -> None:
    pipelines = compile_pipelines(
        config(
            {
                "route": [{"set": {"StationName": "R"}}],
                "dest": [{"set": {"StudyID": "{StationName}"}}],
            }
        ),
        {},
    )
    both = chain(pipelines, "route", "dest")
    assert [p.name for p in both] == ["route", "dest"]
    assert chain(pipelines, None, None) == ()
    ds = ct()
    for p in both:
        p.apply(ds, ObjectContext())
    assert ds.StudyID == "R"
    assert chain_label(both) == f"route @ {both[0].version} + dest @ {both[1].version}"


def test_every_step_of_the_configuration_has_a_builder() -> None:
    assert set(STEP_BUILDERS) == set(STEP_KINDS)


def test_registering_a_builder_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    class Stamp(Step):
        kind = "deidentify"

        def __init__(self, secret_env: str):
            self.secret_env = secret_env

        def apply(self, dataset: Dataset, context: ObjectContext) -> None:
            dataset.PatientIdentityRemoved = "YES"

    monkeypatch.setitem(
        STEP_BUILDERS, "deidentify", lambda step, environ, where: Stamp(step.deidentify.secret_env)
    )
    ds = run([{"deidentify": {"secret_env": "S"}}], ct())
    assert ds.PatientIdentityRemoved == "YES"


def test_unexpected_step_errors_refuse_the_object_with_the_key_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Broken(Step):
        kind = "set"

        def apply(self, dataset: Dataset, context: ObjectContext) -> None:
            raise KeyError("boom")

    monkeypatch.setitem(STEP_BUILDERS, "set", lambda step, environ, where: Broken())
    with pytest.raises(TransformRefused, match=r"transforms.p\[0\].set: KeyError"):
        run([{"set": {"StationName": "A"}}], ct())


def test_touches_pixels_when_a_step_names_group_7fe0() -> None:
    assert not pipeline([{"remove": ["PatientName"]}]).touches_pixels
    assert pipeline([{"remove": ["PixelData"]}]).touches_pixels
    assert pipeline([{"copy": {"PatientName": "7FE0,0010"}}]).touches_pixels
