"""Named pipelines compiled from ``transforms:``, and running them on a data set.

A step's ``when`` is evaluated with the rules of ``docs/rules.md`` on the data set *as
it is when the step's turn comes*, after the earlier steps of the chain: a ``set:
{Modality: OT}`` followed by a step with ``when: {Modality: OT}`` runs that step. This
is the order an operator reads the YAML in, and what a dry run's diff shows. The
pseudo-keys (``CallingAETitle``...) come from the object's :class:`~.base.ObjectContext`.

A pipeline's ``version`` is a short hash of its configuration (the steps as loaded,
``when`` included; not the content of ``map`` tables, which are reloaded live), so
that a delivery can record "research @ 3f2a1c" and a change of pipeline is visible
in the trace.

Steps are built by :data:`STEP_BUILDERS`, one entry per step key (a test checks
that every key of the configuration has one).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydicom.dataset import Dataset

from dicomrouter.config import RouterConfig
from dicomrouter.rules import Condition, InstanceFacts, compile_condition

from .base import ObjectContext, Step, TransformRefused, TransformUnavailable
from .dates import ShiftDates
from .deidentify import Deidentify
from .steps import (
    CopyValues,
    MapValues,
    RemoveElements,
    RemovePrivate,
    ReplaceText,
    SetValues,
    StepConfigError,
)

#: Builds the runnable step of one configured step: ``(model, environ, where)``,
#: ``where`` being its key path (``transforms.research[0].deidentify``). To add a
#: step kind, add its model to ``config.transforms.STEP_MODELS`` and one line here.
StepBuilder = Callable[[Any, Mapping[str, str], str], Step]
STEP_BUILDERS: dict[str, StepBuilder] = {
    "set": lambda step, environ, where: SetValues(step, where),
    "remove": lambda step, environ, where: RemoveElements(step, where),
    "remove_private": lambda step, environ, where: RemovePrivate(step, where),
    "copy": lambda step, environ, where: CopyValues(step, where),
    "replace": lambda step, environ, where: ReplaceText(step, where),
    "map": lambda step, environ, where: MapValues(step, where),
    "shift_dates": lambda step, environ, where: ShiftDates(step.shift_dates, environ, where),
    "deidentify": lambda step, environ, where: Deidentify(step.deidentify, environ),
}


class PipelineError(ValueError):
    """Steps that cannot be built; ``problems`` are ``(key path, message)``."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{where}: {message}" for where, message in problems))


@dataclass(frozen=True)
class CompiledStep:
    step: Step
    condition: Condition | None
    where: str


@dataclass(frozen=True)
class CompiledPipeline:
    name: str
    version: str
    steps: tuple[CompiledStep, ...]

    @property
    def touches_pixels(self) -> bool:
        """True when a step needs the whole file (Pixel Data included) in memory."""
        return any(s.step.needs_whole_file() for s in self.steps)

    @property
    def keyed(self) -> bool:
        """True when a step's output depends on a secret (see ``Step.keyed``)."""
        return any(s.step.keyed for s in self.steps)

    @property
    def label(self) -> str:
        """``research @ 3f2a1c``: how deliveries and the trace name it."""
        return f"{self.name} @ {self.version}"

    def apply(self, dataset: Dataset, context: ObjectContext) -> None:
        """Run the steps in order on ``dataset`` (in place). TransformRefused and
        TransformUnavailable propagate; any other error of a step refuses the object
        with the step's key path (a value pydicom cannot decode, for instance)."""
        if context.pipeline != self.name:
            context = replace(context, pipeline=self.name)
        for compiled in self.steps:
            if compiled.condition is not None:
                facts = InstanceFacts(
                    dataset=dataset,
                    calling_ae=context.calling_ae,
                    called_ae=context.called_ae,
                    source_address=context.source_address,
                    received_at=context.received_at,
                )
                if not compiled.condition.evaluate(facts):
                    continue
            try:
                compiled.step.apply(dataset, context)
            except (TransformRefused, TransformUnavailable):
                raise
            except Exception as exc:
                raise TransformRefused(f"{compiled.where}: {type(exc).__name__}: {exc}") from exc


def pipeline_version(steps: Sequence[Any]) -> str:
    """Six hex digits of SHA-256 over the steps' configuration, canonical JSON."""
    data = [step.model_dump(mode="json", by_alias=True) for step in steps]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:6]


def build_step(step: Any, environ: Mapping[str, str], where: str) -> Step:
    """One configured step, runnable; :class:`StepConfigError` or ValueError when its
    configuration cannot work."""
    return STEP_BUILDERS[step.kind](step, environ, where)


def compile_pipeline(
    name: str, steps: Sequence[Any], environ: Mapping[str, str]
) -> CompiledPipeline:
    """One pipeline, or :class:`PipelineError` naming every step that cannot work."""
    compiled: list[CompiledStep] = []
    problems: list[tuple[str, str]] = []
    for index, step in enumerate(steps):
        where = f"transforms.{name}[{index}].{step.kind}"
        try:
            runnable = build_step(step, environ, where)
        except StepConfigError as exc:
            problems.append((f"{where}.{exc.key}", str(exc)))
            continue
        except ValueError as exc:
            problems.append((where, str(exc)))
            continue
        condition = compile_condition(step.when) if step.when is not None else None
        compiled.append(CompiledStep(runnable, condition, where))
    if problems:
        raise PipelineError(problems)
    return CompiledPipeline(name, pipeline_version(steps), tuple(compiled))


def compile_pipelines(
    config: RouterConfig, environ: Mapping[str, str]
) -> dict[str, CompiledPipeline]:
    """Every pipeline of ``config.transforms``, by name; :class:`PipelineError` with
    every problem of every pipeline."""
    pipelines: dict[str, CompiledPipeline] = {}
    problems: list[tuple[str, str]] = []
    for name, steps in config.transforms.items():
        try:
            pipelines[name] = compile_pipeline(name, steps, environ)
        except PipelineError as exc:
            problems += exc.problems
    if problems:
        raise PipelineError(problems)
    return pipelines


def chain(
    pipelines: Mapping[str, CompiledPipeline],
    route_transform: str | None,
    destination_transform: str | None,
) -> tuple[CompiledPipeline, ...]:
    """The pipelines one delivery goes through: the route's, then the
    destination's. Empty: the object is sent byte for byte as stored."""
    names = [name for name in (route_transform, destination_transform) if name]
    return tuple(pipelines[name] for name in names)


def apply_chain(
    chain: Sequence[CompiledPipeline], dataset: Dataset, context: ObjectContext
) -> None:
    """Run each pipeline of ``chain`` in turn on ``dataset``."""
    for pipeline in chain:
        pipeline.apply(dataset, context)


def chain_label(chain: Sequence[CompiledPipeline]) -> str:
    """``fix-ct1 @ 1a2b3c + research @ 3f2a1c`` (empty for no pipeline)."""
    return " + ".join(pipeline.label for pipeline in chain)


__all__ = [
    "STEP_BUILDERS",
    "CompiledPipeline",
    "CompiledStep",
    "PipelineError",
    "apply_chain",
    "chain",
    "chain_label",
    "compile_pipeline",
    "compile_pipelines",
]
