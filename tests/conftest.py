"""Shared fixtures. Interop peers are required: in CI (CI=true) a missing dcmtk or
Orthanc is a failure, never a skip; locally the skip prints its reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import require_peers
from tests.support.dcmtk import StoreSCP, free_port
from tests.support.orthanc import orthanc_executable
from tests.support.pki import Pki, make_pki


@pytest.fixture
def dcmtk() -> None:
    require_peers(dcmtk=True)


@pytest.fixture
def orthanc_bin() -> str:
    require_peers(dcmtk=False, orthanc=True)
    return str(orthanc_executable())


@pytest.fixture
def pacs(tmp_path: Path, dcmtk: None) -> Iterator[StoreSCP]:
    """A dcmtk storescp destination (AE PACS) accepting every transfer syntax."""
    with StoreSCP(free_port(), "PACS", tmp_path / "pacs", accept="all") as scp:
        yield scp


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One throwaway PKI for the session (tests/support/pki.py): do not change its
    files; a test that does (a certificate reload) makes its own with make_pki."""
    return make_pki(tmp_path_factory.mktemp("pki"))
