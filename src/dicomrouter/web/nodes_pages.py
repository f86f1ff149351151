"""Nodes: every node sharing the index, up or down, and what each runs; forgetting a
node taken out for good (operators)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from dicomrouter.control import nodes
from dicomrouter.security import Principal
from dicomrouter.store.heartbeat import STALE_AFTER

from .common import actor, back, ctx_of, operator, render, run_action, viewer

router = APIRouter(include_in_schema=False)


@router.get("/nodes", summary="Nodes", response_class=HTMLResponse)
def nodes_page(request: Request, principal: Principal = viewer) -> HTMLResponse:
    values = {
        "title": "Nodes",
        "nodes": nodes.list_nodes(ctx_of(request).reader),
        "stale_after": STALE_AFTER,
    }
    return render(request, "nodes.html", values, principal=principal)


@router.post("/nodes/{name}/forget", summary="Forget a node")
def forget(request: Request, name: str, principal: Principal = operator) -> RedirectResponse:
    def act() -> str:
        who = actor(principal, request)
        nodes.forget(ctx_of(request).engine, name, actor=who["actor"], source=who["source"])
        return f"node {name} forgotten"

    run_action(request, act)
    return back(request, "/nodes")
