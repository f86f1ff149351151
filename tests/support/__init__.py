"""Helpers shared by tests that drive real DICOM peers."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_peers(*, dcmtk: bool = True, orthanc: bool = False) -> None:
    """Skip (locally, with the reason printed) or fail (in CI) when a peer is missing:
    interop tests must never be skipped in CI."""
    from .dcmtk import have_dcmtk
    from .orthanc import orthanc_executable

    missing = []
    if dcmtk and not have_dcmtk():
        missing.append("dcmtk")
    if orthanc and orthanc_executable() is None:
        missing.append("Orthanc")
    skip_or_fail(f"{' and '.join(missing)} not installed" if missing else "", "interop tests")


def skip_or_fail(missing: str, what: str) -> None:
    """Nothing if ``missing`` is empty; else skip with the reason printed (locally) or
    fail (in CI, which must never skip ``what``)."""
    if not missing:
        return
    message = f"{missing} (run: bash scripts/test.sh, which installs it)"
    if IN_CI:
        pytest.fail(f"{message}; CI must not skip {what}")
    pytest.skip(message)


def stop_process(
    process: subprocess.Popen[bytes] | None, timeout: float, sig: int = signal.SIGTERM
) -> int | None:
    """Send ``sig`` and wait up to ``timeout``; kill it if it has not exited by then.
    Returns the exit code (None if there was no process)."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode


@contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``2m``...) mounted at ``mount`` (created), lazily
    unmounted afterwards: a small disk to fill up or remount read-only. Mounting
    needs root: skipped outside CI otherwise, a failure in CI (which runs as root)."""
    if os.geteuid() != 0:
        skip_or_fail("not running as root", "mounting a tmpfs")
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
