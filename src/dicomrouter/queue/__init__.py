"""Queue stage: turns rule decisions into durable, leased delivery jobs."""

from . import commitment, groups, states
from .jobs import Claim, ItemResult, JobStore, QueuedInstance
from .planner import Planner, compile_routes

__all__ = [
    "Claim",
    "ItemResult",
    "JobStore",
    "Planner",
    "QueuedInstance",
    "commitment",
    "compile_routes",
    "groups",
    "states",
]
