"""Job and delivery states, and the retry delay."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from dicomrouter.config import RetryConfig

SCHEDULED = "scheduled"  # waiting for the destination's send window
PENDING = "pending"  # ready (or waiting out a retry delay: see next_attempt_at)
IN_PROGRESS = "in_progress"  # claimed by a worker under a lease
COMPLETED = "completed"
WARNING = "warning"  # delivered, the destination answered a warning status
FAILED = "failed"
CANCELED = "canceled"

JOB_STATES = (SCHEDULED, PENDING, IN_PROGRESS, COMPLETED, WARNING, FAILED, CANCELED)
OPEN_STATES = (SCHEDULED, PENDING, IN_PROGRESS)
WAITING_STATES = (SCHEDULED, PENDING)
#: What "oldest pending" looks at everywhere (dashboard, API, CLI, /metrics, the
#: queue_stale alert): jobs that should be going out. Jobs waiting for their send
#: window are not late, so they do not count.
LATE_STATES = (PENDING, IN_PROGRESS)
FINAL_STATES = (COMPLETED, WARNING, FAILED, CANCELED)

# Per-instance delivery states inside a job.
ITEM_PENDING = "pending"
ITEM_COMPLETED = "completed"
ITEM_WARNING = "warning"
ITEM_FAILED = "failed"
ITEM_CANCELED = "canceled"
#: Not sent, on purpose: the destination does not take its SOP class
#: (``destinations.<name>.sop_classes``). Settled, like a delivery.
ITEM_SKIPPED = "skipped"


class DestinationState(StrEnum):
    """A destination's state, as every surface names it."""

    OK = "ok"
    PAUSED = "paused"  # paused by an operator: nothing is sent until resumed by hand
    PROBING = "probing"  # unreachable: paused automatically, probed with C-ECHO
    DISABLED = "disabled"  # ``enabled: false`` in the configuration


def destination_state(enabled: bool, row: Any) -> DestinationState:
    """The one naming of a destination's state, from its configuration (``enabled``)
    and its ``destination_state`` row (or None), in this order of precedence:
    disabled, paused (by an operator), probing (unreachable), ok."""
    if not enabled:
        return DestinationState.DISABLED
    if row is not None and getattr(row, "admin_paused", False):
        return DestinationState.PAUSED
    if row is not None and row.state == "paused":
        return DestinationState.PROBING
    return DestinationState.OK


def retry_delay(policy: RetryConfig, attempts: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: initial * multiplier^(attempts-1), capped."""
    base = policy.initial_delay * policy.multiplier ** max(attempts - 1, 0)
    base = min(base, policy.max_delay)
    spread = base * policy.jitter
    value = base + (rng or random).uniform(-spread, spread)
    return max(0.0, min(value, policy.max_delay))


def purged_message(purged_at: float) -> str:
    """Why a delivery of an instance retention deleted fails (claim, retry)."""
    when = datetime.fromtimestamp(purged_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"purged by retention on {when}"
