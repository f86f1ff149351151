"""Dry runs of a transform: one file before and after, as a tag-level diff.

``dicomrouter test-rule --transform NAME``, ``POST /api/v1/routes/test`` (form field
``transform``) and the dashboard's rule tester all come here. The file goes through
the same :func:`~dicomrouter.transforms.transformed_copy` a delivery uses, into a
temporary folder deleted at once, so the diff shows what a destination would get
(File Meta aside). Nothing is sent or stored.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread

from dicomrouter.config import RouterConfig
from dicomrouter.transforms import (
    CompiledPipeline,
    DiffRow,
    ObjectContext,
    PipelineError,
    TransformRefused,
    TransformUnavailable,
    compile_pipeline,
    diff_datasets,
    transformed_copy,
)

from .errors import Forbidden, Invalid, NotFound


@dataclass(frozen=True)
class TransformPreview:
    """One file through one pipeline: the diff, or why there is none."""

    file: str
    pipeline: str
    version: str
    diff: list[DiffRow] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "pipeline": self.pipeline,
            "version": self.version,
            "diff": [row.as_dict() for row in self.diff],
            "error": self.error,
        }


def pipeline_for_preview(
    config: RouterConfig,
    name: str,
    environ: Mapping[str, str] | None = None,
    *,
    keyed_allowed: bool = True,
) -> CompiledPipeline:
    """The named pipeline compiled; NotFound, Invalid (its steps cannot work), or
    Forbidden for a pipeline keyed by a secret when ``keyed_allowed`` is False: its
    preview computes the real pseudonyms and date offsets of whatever is uploaded,
    which would let anyone who may preview test guesses against the pseudonyms."""
    if name not in config.transforms:
        known = ", ".join(sorted(config.transforms)) or "none defined"
        raise NotFound(f"no transform {name!r} (known: {known})")
    try:
        pipeline = compile_pipeline(
            name, config.transforms[name], os.environ if environ is None else environ
        )
    except PipelineError as exc:
        raise Invalid(str(exc)) from None
    if pipeline.keyed and not keyed_allowed:
        raise Forbidden(
            f"transform {name!r} is keyed by a secret (deidentify, shift_dates with "
            "secret_env): only an admin may preview it, as it shows real pseudonyms"
        )
    return pipeline


def preview_transform(
    pipeline: CompiledPipeline,
    sources: Iterable[tuple[str, str | Path | BinaryIO]],
    calling_ae: str = "",
    called_ae: str = "",
    source_address: str = "127.0.0.1",
) -> list[TransformPreview]:
    """Each ``(name, file or binary stream)`` through ``pipeline``, with how it is
    pretended to have arrived (for templates and ``when``)."""
    context = ObjectContext(
        calling_ae=calling_ae,
        called_ae=called_ae,
        source_address=source_address,
        received_at=datetime.now(),
    )
    previews = []
    with tempfile.TemporaryDirectory(prefix="dicomrouter-preview-") as folder:
        workdir = Path(folder)
        for index, (name, source) in enumerate(sources):
            previews.append(_preview_one(pipeline, name, source, context, workdir, index))
    return previews


def _preview_one(
    pipeline: CompiledPipeline,
    name: str,
    source: str | Path | BinaryIO,
    context: ObjectContext,
    workdir: Path,
    index: int,
) -> TransformPreview:
    def result(diff: list[DiffRow] | None = None, error: str | None = None) -> TransformPreview:
        return TransformPreview(name, pipeline.name, pipeline.version, diff or [], error)

    if isinstance(source, str | Path):
        path = Path(source)
    else:  # an upload: transformed_copy reads files
        path = workdir / f"upload-{index}.dcm"
        with open(path, "wb") as handle:
            source.seek(0)
            shutil.copyfileobj(source, handle)
    try:
        before = dcmread(path)
    except Exception as exc:
        return result(error=f"not a readable DICOM file: {exc}")
    try:
        out = transformed_copy(path, [pipeline], context, workdir)
    except TransformRefused as exc:
        return result(error=f"refused: {exc}")
    except TransformUnavailable as exc:
        return result(error=f"unavailable (deliveries would wait): {exc}")
    except (OSError, ValueError) as exc:
        return result(error=f"cannot transform: {exc}")
    try:
        after = dcmread(out.path)
        return result(diff=diff_datasets(before, after))
    finally:
        out.path.unlink(missing_ok=True)
