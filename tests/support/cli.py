"""Run the command line as a user does: ``python -m dicomrouter ARGS`` in a child
process, with the test runner's own ``DICOMROUTER_CONFIG`` removed so that only what
the test passes decides which configuration a command reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "DICOMROUTER_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "dicomrouter", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**environ, **(env or {})},
    )
