"""What every request handler needs: the live configuration, the index, the store.

The configuration is replaced, never mutated, on a hot reload, so a handler that
reads ``ctx.config`` once sees one consistent version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from dicomrouter.config import RouterConfig
from dicomrouter.store import ObjectStore


@dataclass
class AppContext:
    config: RouterConfig
    engine: Engine  # writer: BEGIN IMMEDIATE transactions (actions, audit)
    reader: Engine  # reader: never takes the write lock (WAL lets it read alongside)
    store: ObjectStore
    config_path: Path | None = None
    started_at: float = field(default_factory=time.time)
    # Tells the node to reload the configuration file (SIGHUP to the parent process);
    # None outside a running node (tests), where there is no node to tell.
    reload_node: Callable[[], None] | None = None
