"""Transforms: named pipelines of steps that change an object on its way out.

Configured in ``transforms:`` (:mod:`dicomrouter.config.transforms`), compiled by
:func:`compile_pipelines`, run on a copy of the stored file by
:func:`transformed_copy` (the original is never modified, pixels are copied, not
decoded), and shown before/after by :func:`diff_datasets` in dry runs. See
``docs/transforms.md``.
"""

from .base import MappingRecord, ObjectContext, Step, TransformRefused, TransformUnavailable
from .diff import DiffRow, diff_datasets
from .output import TransformedFile, transformed_copy
from .pipeline import (
    STEP_BUILDERS,
    CompiledPipeline,
    PipelineError,
    apply_chain,
    chain,
    chain_label,
    compile_pipeline,
    compile_pipelines,
)

__all__ = [
    "STEP_BUILDERS",
    "CompiledPipeline",
    "DiffRow",
    "MappingRecord",
    "ObjectContext",
    "PipelineError",
    "Step",
    "TransformRefused",
    "TransformUnavailable",
    "TransformedFile",
    "apply_chain",
    "chain",
    "chain_label",
    "compile_pipeline",
    "compile_pipelines",
    "diff_datasets",
    "transformed_copy",
]
