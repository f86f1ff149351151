"""Queue stage: turns rule decisions into durable, leased delivery jobs."""

from . import states
from .jobs import Claim, ItemResult, JobStore, QueuedInstance
from .planner import Planner, compile_routes

__all__ = [
    "Claim",
    "ItemResult",
    "JobStore",
    "Planner",
    "QueuedInstance",
    "compile_routes",
    "states",
]
