"""Routes as operators see them: counters, history, and dry runs.

- :func:`route_summaries` and :func:`route_history` read what the planner recorded
  (``route_matches`` and ``jobs``);
- :func:`dry_run` / :func:`dry_run_files` say where files *would* go under the
  current rules (``dicomrouter test-rule``, the API and the dashboard share it);
- :func:`backtest` says which stored studies of the last N days a *candidate* rule
  would have matched, before it is put in the configuration;
- :func:`explain_match` re-explains a recorded match on a stored header (the trace).

Dry runs evaluate the same compiled conditions as the planner, on the same
:class:`~dicomrouter.rules.InstanceFacts`, so a dry run cannot disagree with routing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydantic import ValidationError
from sqlalchemy import Connection, Engine, Row, Select, case, func, select

from dicomrouter.config import RouteConfig, RouterConfig
from dicomrouter.config.loader import format_validation_error
from dicomrouter.queue import compile_routes
from dicomrouter.queue.planner import indexed_facts
from dicomrouter.queue.states import purged_message
from dicomrouter.rules import Condition, InstanceFacts, compile_condition
from dicomrouter.store import ObjectStore, audit, missing_identity, read_header
from dicomrouter.store.schema import instances, jobs, route_matches

from .transforms import pipeline_for_preview, preview_transform

DAY = 86400.0

#: Headers a backtest reads at most unless told otherwise (about 1 ms each).
BACKTEST_LIMIT = 5000
MAX_BACKTEST_LIMIT = 100_000
MAX_BACKTEST_DAYS = 366


class NodeContext(Protocol):
    """What these functions need from the running node (the API's ``AppContext``
    has it): the live configuration, a read-only index engine and the store."""

    @property
    def config(self) -> RouterConfig: ...

    @property
    def reader(self) -> Engine: ...

    @property
    def store(self) -> ObjectStore: ...


class CandidateError(ValueError):
    """A candidate rule that is not a valid route; ``errors`` are ``key.path: reason``."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


def describe(route: RouteConfig) -> str:
    """The ``when:`` of a route as readable text (``Modality = 'CT' and ...``)."""
    return compile_condition(route.when).describe() if route.when else "always"


# -- counters and history --------------------------------------------------------------


def route_summaries(ctx: NodeContext, now: float | None = None) -> list[dict[str, Any]]:
    """Every configured route, in file order, with its rule as text and its counters:
    instances matched (ever, last 24 h), the last match, and its jobs by state."""
    now = time.time() if now is None else now
    with ctx.reader.connect() as conn:
        counters = {
            row.route: row
            for row in conn.execute(
                select(
                    route_matches.c.route,
                    func.count().label("total"),
                    func.sum(case((route_matches.c.matched_at >= now - DAY, 1), else_=0)).label(
                        "recent"
                    ),
                    func.max(route_matches.c.matched_at).label("last"),
                ).group_by(route_matches.c.route)
            )
        }
        by_routes = conn.execute(
            select(jobs.c.routes, jobs.c.state, func.count().label("n")).group_by(
                jobs.c.routes, jobs.c.state
            )
        ).all()
    job_counts: dict[str, dict[str, int]] = {}
    for row in by_routes:  # jobs.routes is "a,b": one job may serve several routes
        for name in filter(None, (row.routes or "").split(",")):
            states = job_counts.setdefault(name, {})
            states[row.state] = states.get(row.state, 0) + row.n
    summaries = []
    for route in ctx.config.routes:
        counter = counters.get(route.name)
        summaries.append(
            {
                "name": route.name,
                "enabled": route.enabled,
                "trigger": route.trigger,
                "stable_after": route.stable_after,
                "forward": route.forward_level,
                "to": list(route.to),
                "when": route.when,
                "description": describe(route),
                "matched_instances": counter.total if counter else 0,
                "matched_last_24h": counter.recent if counter else 0,
                "last_matched_at": counter.last if counter else None,
                "jobs": job_counts.get(route.name, {}),
            }
        )
    return summaries


#: How many index entries a newest-first walk reads before it gives up and groups
#: every row instead (a page whose studies are buried under one huge recent study).
NEWEST_WALK_BUDGET = 50_000


def newest_keys(
    conn: Connection, walk: Select[Any], needed: int, budget: int = NEWEST_WALK_BUDGET
) -> list[tuple[str, float]] | None:
    """The newest ``needed`` keys (study UIDs) by their latest time, newest first
    (ties by key), read off ``walk``: a ``(time, key)`` select ordered by time,
    newest first, that an index serves without sorting. A key is first seen at
    its latest time, so the walk stops as soon as ``needed`` keys are seen and the
    rows have moved past the last one's time (so ties at that time are all in).

    Returns every key when there are fewer than ``needed``, or None when
    ``budget`` rows did not settle the page (then group every row instead).
    """
    if needed <= 0:
        return []
    latest: dict[str, float] = {}
    boundary: float | None = None
    read = 0
    result = conn.execute(walk.limit(budget))
    try:
        for at, key in result:
            read += 1
            if boundary is not None and at < boundary:
                break
            if key not in latest:
                latest[key] = at
                if len(latest) == needed:
                    boundary = at
        else:
            if read >= budget:
                return None
    finally:
        result.close()
    ordered = sorted(latest.items(), key=lambda item: (-item[1], item[0]))
    return ordered[:needed]


def route_history(engine: Engine, name: str, limit: int = 50) -> list[dict[str, Any]]:
    """The route's most recent matches, one entry per study: how many instances
    matched, when (first/last), and who the study is.

    The page's studies come from walking ``ix_route_matches_route`` newest first
    (:func:`newest_keys`), then only those studies are aggregated: a few thousand
    rows instead of grouping every match the route ever made."""
    study = instances.c.study_instance_uid
    joined = route_matches.join(instances, instances.c.id == route_matches.c.instance_id)
    with engine.connect() as conn:
        newest = newest_keys(
            conn,
            select(route_matches.c.matched_at, study)
            .select_from(joined)
            .where(route_matches.c.route == name)
            .order_by(route_matches.c.matched_at.desc()),
            limit,
        )
        if newest is None:  # the walk did not settle: group everything, as before
            newest = [
                (row[0], row[1])
                for row in conn.execute(
                    select(study, func.max(route_matches.c.matched_at).label("last"))
                    .select_from(joined)
                    .where(route_matches.c.route == name)
                    .group_by(study)
                    .order_by(func.max(route_matches.c.matched_at).desc(), study)
                    .limit(limit)
                )
            ]
        order = {uid: position for position, (uid, _) in enumerate(newest)}
        if not order:
            return []
        matched = (
            select(
                study,
                func.count().label("n"),
                func.min(route_matches.c.matched_at).label("first"),
                func.max(route_matches.c.matched_at).label("last"),
                func.max(instances.c.id).label("latest_id"),
            )
            .select_from(joined)
            .where(
                route_matches.c.route == name,
                # Through the page's instance ids (study UID index), not the route
                # index, which the planner would otherwise walk in full.
                route_matches.c.instance_id.in_(
                    select(instances.c.id).where(study.in_(list(order))).scalar_subquery()
                ),
            )
            .group_by(study)
            .subquery()
        )
        query = select(
            matched,
            instances.c.patient_id,
            instances.c.patient_name,
            instances.c.accession_number,
            instances.c.study_date,
            instances.c.study_description,
            instances.c.modality,
        ).join(instances, instances.c.id == matched.c.latest_id)
        rows = sorted(conn.execute(query), key=lambda row: order[row.study_instance_uid])
    return [
        {
            "study_instance_uid": row.study_instance_uid,
            "patient_id": row.patient_id,
            "patient_name": row.patient_name,
            "accession_number": row.accession_number,
            "study_date": row.study_date,
            "study_description": row.study_description,
            "modality": row.modality,
            "matched_instances": row.n,
            "first_matched_at": row.first,
            "last_matched_at": row.last,
        }
        for row in rows
    ]


# -- dry runs on files -------------------------------------------------------------------


@dataclass(frozen=True)
class Pretend:
    """How the files of a dry run are pretended to have arrived."""

    calling_ae: str = ""
    called_ae: str | None = None  # None: the router's own AE title
    source_address: str = "127.0.0.1"


def dry_run(
    config: RouterConfig,
    sources: Iterable[tuple[str, str | Path | BinaryIO]],
    pretend: Pretend | None = None,
    transform: str | None = None,
    *,
    keyed_allowed: bool = True,
) -> list[dict[str, Any]]:
    """For each ``(name, file or binary stream)``: which enabled routes match, why,
    and the destinations it would go to. Sends and stores nothing.

    Each entry is ``{file, sop_instance_uid, study_instance_uid, destinations,
    routes: [{name, matched, trigger, forward, destinations, explanation}]}``, or
    ``{file, error}`` for a file that is not a DICOM instance.

    With ``transform`` (a pipeline's name), each entry also has ``transform``:
    ``{file, pipeline, version, diff: [{path, tag, vr, change, before, after}],
    error}`` (:mod:`.transforms`); NotFound for an unknown name, Forbidden for a
    pipeline keyed by a secret unless ``keyed_allowed`` (admins only).
    """
    pretend = pretend or Pretend()
    routes = compile_routes(config)
    pipeline = (
        pipeline_for_preview(config, transform, keyed_allowed=keyed_allowed) if transform else None
    )
    report: list[dict[str, Any]] = []
    for name, source in sources:
        try:
            dataset = read_header(source)
        except Exception as exc:
            report.append({"file": name, "error": f"not a readable DICOM file: {exc}"})
            continue
        missing = missing_identity(dataset)
        if missing:
            report.append({"file": name, "error": f"not a DICOM instance: no {', '.join(missing)}"})
            continue
        facts = InstanceFacts(
            dataset=dataset,
            calling_ae=pretend.calling_ae,
            called_ae=pretend.called_ae or config.ae_title,
            source_address=pretend.source_address,
            received_at=datetime.now(),
        )
        matches: list[dict[str, Any]] = []
        destinations: set[str] = set()
        for route in routes:
            matched = route.condition is None or route.condition.evaluate(facts)
            matches.append(
                {
                    "name": route.name,
                    "matched": matched,
                    "trigger": route.config.trigger,
                    "forward": route.config.forward_level,
                    "destinations": list(route.config.to) if matched else [],
                    "explanation": _explain(route.condition, facts),
                }
            )
            if matched:
                destinations.update(route.config.to)
        entry: dict[str, Any] = {
            "file": name,
            "sop_instance_uid": str(dataset.SOPInstanceUID),
            "study_instance_uid": str(dataset.StudyInstanceUID),
            "destinations": sorted(destinations),
            "routes": matches,
        }
        if pipeline is not None:
            (preview,) = preview_transform(
                pipeline,
                [(name, source)],
                calling_ae=facts.calling_ae,
                called_ae=facts.called_ae,
                source_address=facts.source_address,
            )
            entry["transform"] = preview.as_dict()
        report.append(entry)
    return report


def dry_run_files(
    config: RouterConfig,
    paths: Sequence[Path],
    pretend: Pretend | None = None,
    transform: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`dry_run` on files on disk (``file`` is the path as given)."""
    return dry_run(config, ((str(path), path) for path in paths), pretend, transform)


def _explain(condition: Condition | None, facts: InstanceFacts) -> str:
    return "no condition: always matches" if condition is None else condition.explain(facts)


# -- explaining what happened ------------------------------------------------------------


def stored_facts(store: ObjectStore, row: Row[Any]) -> InstanceFacts:
    """The facts the planner saw for a stored instance: its header and provenance.
    Raises OSError (or a pydicom error) when the stored file cannot be read."""
    return indexed_facts(row, read_header(store.absolute(row.path)))


def explain_match(
    config: RouterConfig, store: ObjectStore, row: Row[Any], route_name: str
) -> dict[str, Any]:
    """Why ``route_name`` matched the stored instance ``row``, re-explained with the
    route of the *current* configuration: ``{reason, route_exists, matches_now,
    sop_instance_uid, description}``. ``matches_now`` is False when the rule has
    changed since and would no longer select this instance."""
    route = next((r for r in config.routes if r.name == route_name), None)
    base: dict[str, Any] = {"sop_instance_uid": row.sop_instance_uid}
    if route is None:
        return {
            **base,
            "route_exists": False,
            "matches_now": None,
            "description": None,
            "reason": f"route {route_name!r} is no longer in the configuration; "
            "it matched under an earlier version",
        }
    base.update(route_exists=True, description=describe(route))
    if not route.when:
        return {**base, "matches_now": route.enabled, "reason": "no condition: always matches"}
    condition = compile_condition(route.when)
    purged_at = getattr(row, "purged_at", None)
    if purged_at is not None:
        return {
            **base,
            "matches_now": None,
            "reason": f"cannot re-explain: the stored copy was {purged_message(purged_at)}",
        }
    try:
        facts = stored_facts(store, row)
    except Exception as exc:
        return {**base, "matches_now": None, "reason": f"cannot re-read the stored header: {exc}"}
    return {
        **base,
        "matches_now": route.enabled and condition.evaluate(facts),
        "reason": condition.explain(facts),
    }


# -- backtest: a candidate rule on stored studies ------------------------------------------


def validate_candidate(config: RouterConfig, candidate: Mapping[str, Any]) -> RouteConfig:
    """The candidate as a :class:`RouteConfig`, or :class:`CandidateError` with the key
    path of every problem (``route.when.Modality.equals: ...``, ``route.to[0]: ...``)."""
    if not isinstance(candidate, Mapping):
        raise CandidateError(["route: expected a mapping (a route as in the YAML file)"])
    data = dict(candidate)
    data.setdefault("name", "candidate")
    try:
        route = RouteConfig.model_validate(data)
    except ValidationError as exc:
        errors = format_validation_error(exc, data, RouteConfig)
        raise CandidateError([f"route.{error}" for error in errors]) from None
    unknown = [
        f"route.to[{i}]: unknown destination {name!r} (known: "
        f"{', '.join(sorted(config.destinations)) or 'none defined'})"
        for i, name in enumerate(route.to)
        if name not in config.destinations
    ]
    if unknown:
        raise CandidateError(unknown)
    return route


def backtest(
    ctx: NodeContext,
    candidate: Mapping[str, Any],
    days: float = 7.0,
    limit: int = BACKTEST_LIMIT,
    now: float | None = None,
) -> dict[str, Any]:
    """Which studies received in the last ``days`` the candidate rule would have
    matched. Raises :class:`CandidateError` for an invalid rule.

    Instances are evaluated newest first on their stored headers. Once a study has
    matched, its other instances are skipped (one match is what routes it), so the
    work is bounded by ``limit`` header reads; ``truncated`` is True when instances
    of the window were left unevaluated, and ``evaluated_since`` says how far back
    the evaluation got.
    """
    if not 0 < days <= MAX_BACKTEST_DAYS:
        raise CandidateError([f"days: must be more than 0 and at most {MAX_BACKTEST_DAYS}"])
    if not 0 < limit <= MAX_BACKTEST_LIMIT:
        raise CandidateError([f"limit: must be between 1 and {MAX_BACKTEST_LIMIT}"])
    route = validate_candidate(ctx.config, candidate)
    condition = compile_condition(route.when) if route.when else None
    now = time.time() if now is None else now
    since = now - days * DAY
    matched: dict[str, dict[str, Any]] = {}
    seen_studies: set[str] = set()
    evaluated = unreadable = 0
    truncated = False
    oldest: float | None = None
    with ctx.reader.connect() as conn:
        rows = conn.execute(
            select(instances)
            # Only what is still stored: a purged instance has no header to test.
            .where(instances.c.received_at >= since, instances.c.purged_at.is_(None))
            .order_by(instances.c.received_at.desc(), instances.c.id.desc())
        )
        for row in rows:
            if row.study_instance_uid in matched:
                continue
            if evaluated >= limit:
                truncated = True
                break
            evaluated += 1
            oldest = row.received_at
            seen_studies.add(row.study_instance_uid)
            if condition is None:
                reason = "no condition: always matches"
            else:
                try:
                    facts = stored_facts(ctx.store, row)
                except Exception:
                    unreadable += 1
                    continue
                if not condition.evaluate(facts):
                    continue
                reason = condition.explain(facts)
            matched[row.study_instance_uid] = _backtest_entry(row, reason)
        for chunk_start in range(0, len(matched), 500):
            chunk = list(matched)[chunk_start : chunk_start + 500]
            for uid, count in conn.execute(
                select(instances.c.study_instance_uid, func.count())
                .where(instances.c.study_instance_uid.in_(chunk))
                .group_by(instances.c.study_instance_uid)
            ):
                matched[uid]["instances"] = count
        # How many instances the evaluated studies hold in the window (stored ones):
        # ``evaluated_instances`` is the number of headers read, fewer, since a
        # study's other instances are skipped once one of them matched.
        studies_instances = 0
        seen = sorted(seen_studies)
        for chunk_start in range(0, len(seen), 500):
            studies_instances += conn.execute(
                select(func.count()).where(
                    instances.c.study_instance_uid.in_(seen[chunk_start : chunk_start + 500]),
                    instances.c.received_at >= since,
                    instances.c.purged_at.is_(None),
                )
            ).scalar_one()
    return {
        "route": route.model_dump(mode="json"),
        "description": describe(route),
        "days": days,
        "since": since,
        "evaluated_since": oldest,
        "evaluated_instances": evaluated,
        "evaluated_studies": len(seen_studies),
        "studies_instances": studies_instances,
        "unreadable_instances": unreadable,
        "matched_studies": list(matched.values()),
        "destinations": list(route.to),
        "truncated": truncated,
    }


def _backtest_entry(row: Row[Any], reason: str) -> dict[str, Any]:
    return {
        "study_instance_uid": row.study_instance_uid,
        "patient_id": row.patient_id,
        "patient_name": row.patient_name,
        "accession_number": row.accession_number,
        "study_date": row.study_date,
        "study_description": row.study_description,
        "modality": row.modality,
        "calling_ae": row.calling_ae,
        "last_received_at": row.received_at,
        "sample_sop_instance_uid": row.sop_instance_uid,
        "reason": reason,
        "instances": 1,  # replaced by the study's instance count in the index
    }


# -- audited entry points for the HTTP edges ------------------------------------------


class AuditingContext(NodeContext, Protocol):
    @property
    def engine(self) -> Engine: ...


def audited_dry_run(
    ctx: AuditingContext,
    sources: Sequence[tuple[str, str | Path | BinaryIO]],
    pretend: Pretend | None,
    *,
    actor: str,
    source: str,
    transform: str | None = None,
    keyed_allowed: bool = False,
) -> list[dict[str, Any]]:
    """:func:`dry_run` on the live configuration, recorded as ``route.test`` (the API
    and the dashboard both come through here, so neither can forget the record).
    ``keyed_allowed``: the caller is an admin (see :func:`pipeline_for_preview`)."""
    report = dry_run(ctx.config, sources, pretend, transform, keyed_allowed=keyed_allowed)
    detail: dict[str, Any] = {"files": [entry["file"] for entry in report][:20]}
    if transform:
        detail["transform"] = transform
    audit.record(
        ctx.engine,
        actor,
        "route.test",
        f"{len(report)} file(s)",
        source=source,
        detail=detail,
    )
    return report


def audited_backtest(
    ctx: AuditingContext,
    candidate: Mapping[str, Any],
    days: float,
    limit: int,
    *,
    actor: str,
    source: str,
) -> dict[str, Any]:
    """:func:`backtest`, recorded as ``route.backtest``."""
    result = backtest(ctx, candidate, days, limit)
    audit.record(
        ctx.engine,
        actor,
        "route.backtest",
        result["route"]["name"],
        source=source,
        detail={
            "route": dict(candidate),
            "days": days,
            "matched_studies": len(result["matched_studies"]),
            "truncated": result["truncated"],
        },
    )
    return result
