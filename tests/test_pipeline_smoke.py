"""The README's promise in one test: dcmtk storescu -> dicomrouter -> dcmtk storescp."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.support.router import RouterProcess, all_settled, wait_until


def test_instance_route_delivers_to_storescp(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    config = {
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
    }
    files = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]
    with RouterProcess(tmp_path / "router", config) as router:
        result = router.send(files)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: len(pacs.received_files()) == 2, 30, message="2 files at storescp")
        jobs = router.wait_jobs(all_settled, 30)
    assert sorted(j["state"] for j in jobs) == ["completed", "completed"]
    received = {dcmread(p).SOPInstanceUID for p in pacs.received_files()}
    assert received == {dcmread(f).SOPInstanceUID for f in files}
