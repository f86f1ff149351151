"""``GET /metrics``: Prometheus text format, for every process of the node.

Counters recorded by the receiver and the dispatch process are merged from their
multiprocess files; queue depth, oldest pending age, destination state and disk are
computed now from the index (:mod:`dicomrouter.observe.collector`). Open without
credentials when ``http.open_probes`` is true (Prometheus rarely logs in), else it
needs the viewer role like any read.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from dicomrouter.edge.auth import context, require
from dicomrouter.observe import metrics
from dicomrouter.observe.collector import IndexCollector
from dicomrouter.security import Role

router = APIRouter(prefix="", tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics: traffic, deliveries, latency, queues, associations, disk",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def get_metrics(request: Request) -> Response:
    ctx = context(request)
    if not ctx.config.http.open_probes:
        require(Role.viewer)(request)
    collector = IndexCollector(ctx.reader, lambda: ctx.config, ctx.store.root)
    return Response(metrics.exposition(collector), media_type=metrics.CONTENT_TYPE)
