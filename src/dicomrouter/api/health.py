"""Liveness and readiness probes, for load balancers, Kubernetes and monitoring.

``/healthz`` answers as long as the HTTP process runs. ``/readyz`` says whether the
router can take objects right now and send them on: the index answers, the storage
folder is writable, free disk is above ``storage.min_free_space`` (below it,
C-STOREs are refused with 0xA700), and the receiver and the dispatch process of this
node run (a fresh heartbeat, see :mod:`dicomrouter.store.heartbeat`). It answers
503 with the failing checks otherwise.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from dicomrouter.edge.auth import context, require
from dicomrouter.security import Role
from dicomrouter.store import heartbeat

router = APIRouter(tags=["health"])


def _probe_guard(request: Request) -> None:
    if not context(request).config.http.open_probes:
        require(Role.viewer)(request)


def readiness(ctx: Any) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    try:
        with ctx.reader.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["index"] = {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1)}
    except Exception as exc:
        checks["index"] = {"ok": False, "error": str(exc)[:300]}
    probe = ctx.store.tmp / f".ready-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
        checks["storage"] = {"ok": True, "path": str(ctx.store.root)}
    except OSError as exc:
        checks["storage"] = {"ok": False, "path": str(ctx.store.root), "error": str(exc)}
    try:
        usage = shutil.disk_usage(ctx.store.root)
        watermark = ctx.config.storage.min_free_space
        checks["disk"] = {
            "ok": usage.free >= watermark,
            "free_bytes": usage.free,
            "total_bytes": usage.total,
            "watermark_bytes": watermark,
        }
    except OSError as exc:
        checks["disk"] = {"ok": False, "error": str(exc)}
    roles = heartbeat.required_roles(ctx.config.dicom.process_count)
    try:
        for process in heartbeat.check(ctx.reader, ctx.config.node.name, roles):
            checks[process.role] = {
                "ok": process.ok,
                "pid": process.pid,
                "heartbeat_age_s": process.heartbeat_age_s,
                ("detail" if process.ok else "error"): process.reason,
            }
    except Exception as exc:
        for role in roles:
            checks[role] = {"ok": False, "error": f"cannot read heartbeats: {exc}"[:300]}
    return checks


@router.get("/healthz", summary="Liveness: the HTTP process answers")
def healthz(request: Request) -> dict[str, str]:
    _probe_guard(request)
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: index reachable, storage writable, disk above the watermark, "
    "receiver and dispatch running",
    responses={503: {"description": "At least one check failed"}},
)
def readyz(request: Request) -> JSONResponse:
    _probe_guard(request)
    checks = readiness(context(request))
    ready = all(check["ok"] for check in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )
