"""The Orthanc test peer works: dcmtk storescu -> Orthanc, checked through its REST API.

Why a test for test support: every interop test and the benchmark trust this helper as
an oracle, so it must itself be proven against an independent sender (dcmtk).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.support import require_peers
from tests.support.dcmtk import dcmtk_env, dcmtk_tool
from tests.support.orthanc import Orthanc
from tests.support.synth import make_study

pytestmark = pytest.mark.interop


def _storescu() -> str | None:
    """dcmtk's storescu (pynetdicom installs a Python ``storescu`` that may shadow it)."""
    try:
        return dcmtk_tool("storescu")
    except FileNotFoundError:
        return None


STORESCU = _storescu()


def test_storescu_to_orthanc(tmp_path: Path) -> None:
    require_peers(dcmtk=True, orthanc=True)
    files = make_study(tmp_path / "in", 3, series_count=2)
    sop_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}

    with Orthanc(tmp_path / "orthanc", aet="PEER") as peer:
        assert STORESCU is not None
        result = subprocess.run(
            [STORESCU, "-aet", "TESTSCU", "-aec", "PEER", "127.0.0.1", str(peer.dicom_port)]
            + [str(f) for f in files],
            env=dcmtk_env(),  # TCP_NODELAY=1
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

        assert peer.instance_count() == 3
        assert len(peer.instances()) == 3
        assert peer.statistics()["CountSeries"] == 2

        sop_uid = sorted(sop_uids)[0]
        instance_id = peer.find_sop(sop_uid)
        assert instance_id is not None
        data = peer.get_instance_file(instance_id)
        downloaded = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        assert downloaded.SOPInstanceUID == sop_uid
        assert peer.find_sop("1.2.3.4.5.6.7.8.9") is None
