"""Shared fixtures. Interop peers are required: in CI (CI=true) a missing dcmtk or
Orthanc is a failure, never a skip; locally the skip prints its reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.dcmtk import StoreSCP, free_port, have_dcmtk
from tests.support.orthanc import orthanc_executable

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require(available: bool, what: str) -> None:
    if available:
        return
    message = f"{what} is not installed (run: bash scripts/test.sh, which installs it)"
    if IN_CI:
        pytest.fail(f"{message}; CI must not skip interop tests")
    pytest.skip(message)


@pytest.fixture
def dcmtk() -> None:
    _require(have_dcmtk(), "dcmtk")


@pytest.fixture
def orthanc_bin() -> str:
    path = orthanc_executable()
    _require(path is not None, "Orthanc")
    return str(path)


@pytest.fixture
def pacs(tmp_path: Path, dcmtk: None):  # type: ignore[no-untyped-def]
    """A dcmtk storescp destination (AE PACS) accepting every transfer syntax."""
    with StoreSCP(free_port(), "PACS", tmp_path / "pacs", accept="all") as scp:
        yield scp
