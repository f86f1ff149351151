"""Overview: is the router healthy, is anything backing up, how much goes through."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from dicomrouter.control.destinations import DestinationState
from dicomrouter.control.nodes import Nodes, list_nodes
from dicomrouter.control.status import node_status, throughput
from dicomrouter.security import Principal

from .charts import Series, bar_chart, column_chart, gauge
from .common import age, ctx_of, percent, render, viewer

router = APIRouter(include_in_schema=False)

#: Chart ranges offered: (query value, seconds shown, bucket width in seconds).
RANGES = {"1h": (3600, 60), "6h": (6 * 3600, 300), "24h": (86400, 900), "7d": (7 * 86400, 3600)}

#: The index knows each instance once, at its latest reception; /metrics'
#: dicomrouter_received_instances_total counts every C-STORE stored, so an instance
#: sent twice counts twice there and once here. The legend says which.
RECEIVED = Series("received", "received (distinct instances)", "s-received")
SENT = (Series("delivered", "delivered", "s-delivered"), Series("failed", "failed", "s-failed"))
QUEUE = (
    Series("in_progress", "sending", "s-progress"),
    Series("pending", "pending", "s-pending"),
    Series("scheduled", "scheduled", "s-scheduled"),
    Series("failed", "failed", "s-failed"),
)
OLDEST = (Series("age", "oldest pending (not counting send windows)", "s-pending"),)
FAILURE = (Series("rate", "failed in the last hour", "s-failed"),)


def problems(status: dict[str, Any], nodes: Nodes | None = None) -> list[str]:
    """What an operator should look at first, in words."""
    found = []
    for node in nodes.down if nodes else []:
        found.append(
            f"node {node.name} is down: no heartbeat for {age(node.last_heartbeat_age_s)} "
            "(forget it on the Nodes page if it was taken out for good)"
        )
    for node in nodes.behind if nodes else []:
        found.append(
            f"node {node.name} runs configuration version {node.config_version}, "
            f"older than the newest ({nodes.newest_config_version if nodes else ''})"
        )
    disk = status.get("disk") or {}
    if disk and not disk.get("ok", True):
        found.append("free disk space is below the watermark: receiving is refused")
    last_run = (status.get("retention") or {}).get("last_run") or {}
    if last_run.get("error"):
        found.append(f"the last retention run failed: {last_run['error']}")
    for dest in status.get("destinations") or []:
        if dest.get("state") in (DestinationState.PAUSED, DestinationState.PROBING):
            since = dest.get("paused_since")
            when = f" for {age(time.time() - since)}" if since else ""
            why = (
                "paused by an operator"
                if dest["state"] == DestinationState.PAUSED
                else f"unreachable, probed with {dest.get('probe') or 'a probe'}"
            )
            found.append(f"destination {dest['name']} is {dest['state']} ({why}){when}")
        if (dest.get("queue") or {}).get("failed"):
            found.append(f"destination {dest['name']} has {dest['queue']['failed']} failed job(s)")
    held = (status.get("loops") or {}).get("held")
    if held:
        found.append(
            f"{held} instance(s) held as a routing loop: they came back from a destination "
            "just after we sent them there (dicomrouter loops list / release)"
        )
    unplanned = (status.get("unplanned") or {}).get("count") or 0
    if unplanned:
        found.append(f"{unplanned} received instance(s) could not be planned yet: retrying")
    for queue in status.get("orphaned") or []:
        found.append(
            f"{queue['total']} open job(s) for {queue['destination']}, "
            "which is no longer configured: move or cancel them"
        )
    for process in status.get("processes") or []:
        if not process.get("ok"):
            found.append(process.get("reason") or f"the {process['role']} process is not running")
    return found


def charts(status: dict[str, Any], points: list[dict[str, Any]], span: int) -> dict[str, Any]:
    dests = status.get("destinations") or []
    stamp = "%H:%M" if span <= 86400 else "%m-%d %H:%M"
    disk = status.get("disk") or {}
    return {
        "throughput": column_chart(
            points,
            RECEIVED,
            SENT,
            label=lambda t: dt.datetime.fromtimestamp(t).strftime(stamp),
            title="Instances received (each once, at its latest reception), delivered and "
            "failed over time",
        ),
        "queue": bar_chart(
            [(d["name"], d.get("queue") or {}) for d in dests],
            QUEUE,
            title="Queue depth per destination (jobs)",
        ),
        "oldest": bar_chart(
            [(d["name"], {"age": d.get("oldest_pending_age_s")}) for d in dests],
            OLDEST,
            value_label=age,
            title="Age of the oldest pending job per destination",
        ),
        "failure": bar_chart(
            [(d["name"], {"rate": d.get("failure_rate")}) for d in dests],
            FAILURE,
            value_label=percent,
            title="Failure rate per destination over the last hour",
        ),
        "disk": gauge(
            float(disk.get("total_bytes", 0)) - float(disk.get("free_bytes", 0)),
            float(disk.get("total_bytes", 0)),
            float(disk.get("watermark_bytes", 0)),
            title="Storage disk usage",
        ),
    }


@router.get("/", summary="Overview", response_class=HTMLResponse)
def overview(request: Request, range: str = "1h", principal: Principal = viewer) -> HTMLResponse:
    ctx = ctx_of(request)
    key = range if range in RANGES else "1h"
    span, bucket = RANGES[key]
    # The page refreshes itself every few seconds, perhaps on several screens: the
    # index-wide counts may be 5 s old, the series a quarter of a bucket.
    status = node_status(ctx, max_age=5.0)
    points = throughput(ctx.reader, time.time() - span, bucket, max_age=min(bucket / 4, 300.0))
    nodes = list_nodes(ctx.reader)
    values = {
        "title": "Overview",
        "status": status,
        "nodes": nodes,
        "problems": problems(status, nodes),
        "range": key,
        "ranges": list(RANGES),
        "charts": charts(status, points, span),
        "destination_names": sorted(ctx.config.destinations),
        "now": time.time(),
    }
    return render(request, "overview.html", values, principal=principal)
