"""Folder destinations end to end: a real router process receiving from dcmtk's
storescu and writing to a folder, judged by the files that arrive and by what the
router's own history says."""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.support import mounted_tmpfs
from tests.support.router import RouterProcess, all_settled, wait_until
from tests.support.synth import make_study

pytestmark = pytest.mark.interop


def arrived(root: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, for every file written under ``root``."""
    return {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in root.rglob("*.dcm")
        if ".tmp" not in p.parts
    }


def by_uid(files: list[Path]) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}


def data_set(path: Path) -> bytes:
    """A Part-10 file's bytes after its File Meta (the router writes its own)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    return raw[144 + struct.unpack("<I", raw[140:144])[0] :]


def show(router: RouterProcess, job_id: int) -> dict[str, Any]:
    out = router.cli(
        "queue", "show", str(job_id), "--config", str(router.config_path), "--json", check=True
    )
    return dict(json.loads(out.stdout))


def test_every_file_arrives_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    files = make_study(tmp_path / "in", 6, series_count=2, patient_id="P1")
    config = {
        "destinations": {"share": {"type": "folder", "path": str(out)}},
        "routes": [{"name": "all", "to": ["share"]}],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        router.send(files)
        jobs = router.wait_jobs(
            lambda js: all_settled(js) and sum(j["delivered"] for j in js) == 6, 60
        )
        assert {j["state"] for j in jobs} == {"completed"}
        items = [i for j in jobs for i in show(router, j["id"])["instances"]]
        assert len(items) == 6 and {i["state"] for i in items} == {"completed"}
        assert all(i["message"].startswith("written to P1/") for i in items), items
        probe = router.cli("echo", "share", "--config", str(router.config_path))
        assert probe.returncode == 0 and f"Probe of share ({out}) succeeded" in probe.stdout
        stored = by_uid(sorted((router.storage / "objects").rglob("*.dcm")))
    sent = by_uid(files)
    got = arrived(out)
    assert set(got) == set(sent)
    for uid, path in sent.items():
        # The stored object, byte for byte; the data set as storescu sent it.
        assert got[uid].read_bytes() == stored[uid].read_bytes()
        assert data_set(got[uid]) == data_set(path)
        ds = dcmread(path, stop_before_pixels=True)
        assert got[uid] == out / "P1" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{uid}.dcm"


def test_a_transform_changes_what_it_declares(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    files = make_study(tmp_path / "in", 3, patient_id="P2")
    config = {
        "transforms": {"mark": [{"set": {"InstitutionName": "Folder Test"}}]},
        "destinations": {
            "share": {
                "type": "folder",
                "path": str(out),
                "transform": "mark",
                "layout": "{InstitutionName}/{SOPInstanceUID}.dcm",
            }
        },
        "routes": [{"name": "all", "to": ["share"]}],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        router.send(files)
        jobs = router.wait_jobs(
            lambda js: all_settled(js) and sum(j["delivered"] for j in js) == 3, 60
        )
        items = [i for j in jobs for i in show(router, j["id"])["instances"]]
        assert all(i["sent_as"] and "mark" in i["sent_as"] for i in items), items
    got = arrived(out)
    assert set(got) == set(by_uid(files))
    for uid, path in by_uid(files).items():
        assert got[uid].parent == out / "Folder Test"
        before, after = dcmread(path), dcmread(got[uid])
        assert after.InstitutionName == "Folder Test"
        for elem in before:
            if elem.keyword != "InstitutionName":
                assert after[elem.tag].value == elem.value, elem.keyword


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs standing for a share (remounted read-only by the test)."""
    with mounted_tmpfs(tmp_path / "share", "16m") as mount:
        yield mount


def test_a_read_only_folder_pauses_the_destination_then_gets_everything(
    tmp_path: Path, share: Path
) -> None:
    files = make_study(tmp_path / "in", 5)
    config = {
        "destinations": {
            "share": {
                "type": "folder",
                "path": str(share),
                "pause_after_failures": 1,
                "probe_interval": "500ms",
                "retry": {"initial_delay": "1s", "max_delay": "2s"},
            }
        },
        "routes": [{"name": "all", "to": ["share"]}],
    }
    subprocess.run(["mount", "-o", "remount,ro", str(share)], check=True)
    with RouterProcess(tmp_path / "router", config) as router:
        try:
            router.send(files)
            # The first claim pauses the destination; jobs planned after it wait
            # unclaimed (how many came in that claim depends on timing).
            router.wait_jobs(
                lambda js: len(js) == 5 and any(j["connection_failures"] >= 1 for j in js), 60
            )
            wait_until(lambda: "probe of share failed" in router.log(), 30, message="probes")
            assert arrived(share) == {}
            assert all(j["delivered"] == 0 and j["state"] != "failed" for j in router.jobs())
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(share)], check=True)
        jobs = router.wait_jobs(
            lambda js: all_settled(js) and sum(j["delivered"] for j in js) == 5, 60
        )
        assert {j["state"] for j in jobs} == {"completed"}
        assert "Read-only file system" in router.log()
    got = arrived(share)
    for uid, path in by_uid(files).items():
        assert data_set(got[uid]) == data_set(path)
