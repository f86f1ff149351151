"""``/api/v1/nodes``: every node sharing this index, up or down, and what each runs;
forgetting a node taken out for good (operator)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from dicomrouter.control import nodes as control
from dicomrouter.edge.auth import client_address, context, operator, viewer
from dicomrouter.security import Principal
from dicomrouter.store import heartbeat

from .control_errors import http_errors

router = APIRouter(prefix="/api/v1/nodes", tags=["nodes"])


@router.get(
    "",
    summary="Every node: up or down, release, configuration version, processes",
    description="A node is `down` when none of its processes has written a heartbeat "
    f"for {heartbeat.STALE_AFTER:g} s. `behind`: it runs a configuration version older "
    "than the newest recorded one (`newest_config_version`).",
)
def list_nodes(request: Request, _: Principal = viewer) -> dict[str, Any]:
    return control.list_nodes(context(request).reader).as_dict()


@router.get("/{name}", summary="One node")
def get_node(name: str, request: Request, _: Principal = viewer) -> dict[str, Any]:
    with http_errors():
        return control.get_node(context(request).reader, name).as_dict()


@router.delete(
    "/{name}",
    summary="Forget a node taken out for good (operator)",
    description="Removes its heartbeats: it is no longer shown or alerted. 409 while "
    "it is up. Returns the node as it was.",
)
def forget_node(name: str, request: Request, who: Principal = operator) -> dict[str, Any]:
    with http_errors():
        node = control.forget(
            context(request).engine, name, actor=who.name, source=client_address(request)
        )
    return node.as_dict()
