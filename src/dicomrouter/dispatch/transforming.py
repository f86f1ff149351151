"""Which transforms a delivery goes through, and the copy it sends.

A job carries its routes' pipeline name (``jobs.transform``); the destination names
its own (``destinations.<name>.transform``). The route's runs first, then the
destination's. The copy is made just before the instance is sent (one at a time, in
``<storage>/outgoing/<node>``, this node's own) and deleted right after, so transforms
cost disk for one instance per worker, never a batch; the stored original is only
ever read.

The compiled pipelines of the running configuration are swapped whole on reload:
a worker takes them once per claim, so a claim never mixes two versions.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, func, select

from dicomrouter.config import RouterConfig
from dicomrouter.destinations import PreparedFile
from dicomrouter.queue import QueuedInstance
from dicomrouter.store import pseudonyms as pseudonym_rows
from dicomrouter.store.private import private_dir
from dicomrouter.store.schema import config_versions
from dicomrouter.transforms import (
    CompiledPipeline,
    MappingRecord,
    ObjectContext,
    PipelineError,
    TransformUnavailable,
    chain_label,
    compile_pipeline,
    transformed_copy,
)

log = logging.getLogger("dicomrouter.dispatch")


@dataclass(frozen=True)
class Chain:
    """The pipelines one delivery goes through, in order, and how to say so."""

    pipelines: tuple[CompiledPipeline, ...]
    label: str
    """``fix-ct1 @ 1a2b3c + research @ 3f2a1c (config v12)``: recorded with each
    delivery."""


class Transforms:
    """The running configuration's pipelines, shared by every worker of the process."""

    def __init__(
        self,
        config: RouterConfig,
        engine: Engine,
        workdir: Path,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self.workdir = workdir
        self._environ = environ if environ is not None else os.environ
        self._lock = threading.Lock()
        self._pipelines: dict[str, CompiledPipeline] = {}
        self._broken: dict[str, str] = {}  # pipeline name -> why it does not compile
        self._version: int | None = None
        self._shape: object = None
        self.generation = 0
        """Bumped by a reload that changes what any delivery goes through (a pipeline's
        version, a destination's pipeline): a send in flight stops between instances,
        so nothing more goes out under the old transforms."""
        self.recorder = MappingRecorder(engine)
        self.apply(config)

    def prepare_workdir(self) -> None:
        """Create the folder for outgoing copies, and empty it: a copy left there
        by a crash is never needed again (the next send makes a new one)."""
        private_dir(self.workdir)
        for entry in self.workdir.iterdir():
            if entry.is_file():
                entry.unlink(missing_ok=True)

    def apply(self, config: RouterConfig, version: int | None = None) -> None:
        """Compile each pipeline on its own: one that cannot compile holds only its
        own deliveries (with the reason), never the others'. ``version``: the id of
        the configuration version this is (unknown: the newest recorded, looked up on
        first use; at start-up the node has recorded it before starting us)."""
        pipelines: dict[str, CompiledPipeline] = {}
        broken: dict[str, str] = {}
        for name, steps in config.transforms.items():
            try:
                pipelines[name] = compile_pipeline(name, steps, self._environ)
            except PipelineError as exc:
                broken[name] = "; ".join(f"{where}: {message}" for where, message in exc.problems)
                log.error("transform %s cannot run: %s", name, broken[name])
        shape = (
            sorted((name, p.version) for name, p in pipelines.items()),
            sorted(broken),
            sorted((name, d.transform or "") for name, d in config.destinations.items()),
        )
        with self._lock:
            self._pipelines, self._broken = pipelines, broken
            self._version = version
            if shape != self._shape:
                self._shape = shape
                self.generation += 1

    def _config_version(self) -> int | None:
        with self._lock:
            if self._version is not None:
                return self._version
        try:
            with self.engine.connect() as conn:
                version = conn.execute(select(func.max(config_versions.c.id))).scalar()
        except Exception:  # the label is information, never a reason not to send
            log.debug("cannot read the configuration version", exc_info=True)
            return None
        with self._lock:
            self._version = version
        return version

    def chain(self, route_pipeline: str, destination_pipeline: str | None) -> Chain | str:
        """The chain for a job, or why it cannot run (a pipeline the configuration
        no longer defines: its deliveries wait rather than go out untransformed)."""
        names = [name for name in (route_pipeline, destination_pipeline or "") if name]
        if not names:
            return Chain((), "")
        with self._lock:
            pipelines, broken = self._pipelines, self._broken
        for name in names:
            if name in broken:
                return f"transform {name!r} cannot run: {broken[name]}"
            if name not in pipelines:
                return (
                    f"transform {name!r} is no longer configured: its deliveries wait "
                    "(configure it again, or cancel or move the job)"
                )
        chosen = tuple(pipelines[name] for name in names)
        version = self._config_version()
        label = chain_label(chosen)
        if version is not None:
            label += f" (config v{version})"
        return Chain(chosen, label)


class MappingRecorder:
    """Commits the re-identification mappings a copy's steps reported, before the
    copy is sent.

    Order is what makes it safe: copy made, mappings committed, then sent. A crash
    between the commit and the send loses nothing (the delivery is sent again, and
    recording again is a no-op); a failed commit sends nothing (the delivery waits).
    The dispatch engine commits with ``synchronous=NORMAL``: a power loss may forget
    the last commits, but the WAL keeps them in order, so it forgets the delivery's
    result too, and the delivery is sent, and its mapping recorded, again.

    Rows already committed by this process are remembered (a bounded set), so a
    study's thousand instances write their patient, study and series rows once.
    """

    #: How many recently committed rows are remembered.
    REMEMBERED = 65536

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._done: dict[tuple[str, str, str], None] = {}

    def commit(self, records: list[MappingRecord]) -> None:
        """Record ``records``; TransformUnavailable if the index refuses them."""
        with self._lock:
            fresh = [r for r in records if (r.pipeline, r.kind, r.lookup) not in self._done]
        if not fresh:
            return
        try:
            pseudonym_rows.record(self.engine, [asdict(r) for r in fresh])
        except Exception as exc:
            # The driver's error, not SQLAlchemy's: that one lists the parameters.
            log.warning(
                "cannot record the re-identification mapping: %s", getattr(exc, "orig", exc)
            )
            raise TransformUnavailable(
                f"cannot record the re-identification mapping: {type(exc).__name__}"
            ) from exc
        with self._lock:
            for r in fresh:
                self._done[(r.pipeline, r.kind, r.lookup)] = None
            while len(self._done) > self.REMEMBERED:
                self._done.pop(next(iter(self._done)))


def preparer(
    chain: Chain,
    item: QueuedInstance,
    source: Path,
    workdir: Path,
    recorder: MappingRecorder | None = None,
) -> Callable[[], PreparedFile] | None:
    """What the sender calls just before sending ``item``: the transformed copy.
    None when no pipeline applies (the stored file goes out byte for byte).

    Mappings the steps report (a ``deidentify`` with ``mapping``) are committed
    through ``recorder`` before the copy is handed over; without a recorder a step
    that reports one makes the delivery wait rather than go out unrecorded."""
    if not chain.pipelines:
        return None
    base = ObjectContext(
        calling_ae=item.calling_ae,
        called_ae=item.called_ae,
        source_address=item.source_address,
        received_at=datetime.fromtimestamp(item.received_at) if item.received_at else None,
    )

    def prepare() -> PreparedFile:
        reported: list[MappingRecord] = []
        context = replace(base, record=reported.append)
        try:
            copy = transformed_copy(source, chain.pipelines, context, workdir)
        except OSError as exc:  # disk full in outgoing/, unreadable original...
            raise TransformUnavailable(f"cannot write the transformed copy: {exc}") from exc
        if reported:
            try:
                if recorder is None:
                    raise TransformUnavailable("no recorder for the re-identification mapping")
                recorder.commit(reported)
            except BaseException:
                copy.path.unlink(missing_ok=True)
                raise
        return PreparedFile(
            path=copy.path,
            sop_instance_uid=copy.sop_instance_uid,
            transfer_syntax_uid=copy.transfer_syntax_uid,
            description=chain.label,
            temporary=True,
        )

    return prepare
