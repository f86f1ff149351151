"""DICOMweb destinations end to end: dcmtk's storescu sends to a real router process,
which delivers with STOW-RS to a real Orthanc with its DICOMweb plugin (Debian's
``orthanc-dicomweb``). Judged by what Orthanc really holds (its stored files, byte for
byte), its log (how many STOW requests, which instances it saw) and the router's jobs.

Orthanc 1.10 with DICOMweb 1.7 never puts an instance in the Failed SOP Sequence for
a refusal of its own: an instance it cannot store ends the request's processing, and
the instances from that one on are simply left out of a 200 response. The "server
that fails some instances" test makes Orthanc fail instances for real (a Lua
``ReceivedInstanceFilter`` that raises, once per instance) and checks that those, and
only those, are sent again. The Failed SOP Sequence, XML responses and every HTTP
status are covered against a test server in tests/test_destination_dicomweb.py.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread

from tests.support import require_peers, skip_or_fail
from tests.support.orthanc import PLUGIN_FOLDER, Orthanc
from tests.support.router import RouterProcess, all_settled, wait_until
from tests.support.synth import make_study

pytestmark = pytest.mark.interop

DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"


@pytest.fixture(autouse=True)
def peers() -> None:
    require_peers(orthanc=True)
    if not (Path(PLUGIN_FOLDER) / DICOMWEB_PLUGIN).exists():
        skip_or_fail("Orthanc's DICOMweb plugin (orthanc-dicomweb) not installed", "STOW tests")


def orthanc(workdir: Path, **options: Any) -> Orthanc:
    extra = {"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    return Orthanc(workdir, plugins=(DICOMWEB_PLUGIN,), extra_config=extra, **options)


def destination(peer: Orthanc, **extra: Any) -> dict[str, Any]:
    return {
        "type": "dicomweb",
        "url": f"{peer.url}/dicom-web",
        "pause_after_failures": 1,
        "probe_interval": "500ms",
        "retry": {"initial_delay": "500ms", "max_delay": "1s"},
        **extra,
    }


def study_route(dest: str = "web") -> list[dict[str, Any]]:
    """One job per study (so one batch), once the study is quiet for a second."""
    return [{"name": "all", "trigger": "study", "stable_after": "1s", "to": [dest]}]


def data_set(raw: bytes) -> bytes:
    """A Part-10 file's bytes after its File Meta."""
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    return raw[144 + struct.unpack("<I", raw[140:144])[0] :]


def assert_holds(peer: Orthanc, files: list[Path], stored: Path) -> None:
    """Orthanc holds each file: the router's stored copy byte for byte, whose data set
    is the one storescu sent."""
    router_copies = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in stored.rglob("*.dcm")
    }
    assert peer.instance_count() == len(files)
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        found = peer.find_sop(uid)
        assert found is not None, uid
        held = peer.get_instance_file(found)
        assert held == router_copies[uid].read_bytes()
        assert data_set(held) == data_set(path.read_bytes())


def stow_requests(peer: Orthanc) -> int:
    return peer.log_path.read_text(errors="replace").count("STOW-RS request without study")


def test_a_study_arrives_equal_split_over_several_requests(tmp_path: Path) -> None:
    files = make_study(tmp_path / "in", 10, series_count=2)
    with orthanc(tmp_path / "orthanc") as peer:
        peer.set_log_level("verbose")  # logs each STOW request
        config = {"destinations": {"web": destination(peer, max_instances=3)}}
        config["routes"] = study_route()
        with RouterProcess(tmp_path / "router", config) as router:
            assert router.send(files).returncode == 0
            jobs = router.wait_jobs(lambda js: all_settled(js), 90)
            assert [(j["state"], j["delivered"]) for j in jobs] == [("completed", 10)]
            assert_holds(peer, files, router.storage / "objects")
            probe = router.cli("echo", "web", "--config", str(router.config_path))
            assert probe.returncode == 0 and "Probe of web" in probe.stdout, probe.stdout
        assert stow_requests(peer) == 4  # 3 + 3 + 3 + 1


def test_a_server_down_then_back_gets_everything(tmp_path: Path) -> None:
    files = make_study(tmp_path / "in", 6)
    peer = orthanc(tmp_path / "orthanc", fast_stop=False)
    peer.start()
    try:
        peer.stop()
        config = {"destinations": {"web": destination(peer)}, "routes": study_route()}
        with RouterProcess(tmp_path / "router", config) as router:
            assert router.send(files).returncode == 0
            router.wait_jobs(
                lambda js: bool(js) and all(j["connection_failures"] >= 1 for j in js), 60
            )
            wait_until(lambda: "probe of web failed" in router.log(), 30, message="probes")
            assert all(j["delivered"] == 0 and j["state"] != "failed" for j in router.jobs())
            assert "cannot connect" in router.log()
            peer.start()  # the same storage, now up again
            jobs = router.wait_jobs(lambda js: all_settled(js), 60)
            assert [(j["state"], j["delivered"]) for j in jobs] == [("completed", 6)]
            assert_holds(peer, files, router.storage / "objects")
    finally:
        peer.stop()


#: Orthanc refuses each instance of patient REFUSE once (its filter raises), then
#: takes it; every instance it is handed is logged.
REFUSE_ONCE = """
refused = {}
function ReceivedInstanceFilter(dicom, origin, info)
  print("STOW-SEEN " .. dicom.SOPInstanceUID)
  if dicom.PatientID == "REFUSE" and not refused[dicom.SOPInstanceUID] then
    refused[dicom.SOPInstanceUID] = true
    error("refused once by the test's filter")
  end
  return true
end
"""


def test_only_the_instances_the_server_did_not_store_are_sent_again(tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.13131313"
    kept = make_study(tmp_path / "in", 4, patient_id="KEEP", study_uid=study, prefix="K")
    refused = make_study(tmp_path / "in", 2, patient_id="REFUSE", study_uid=study, prefix="R")
    files = kept + refused
    with orthanc(tmp_path / "orthanc", lua=REFUSE_ONCE) as peer:
        config = {"destinations": {"web": destination(peer)}, "routes": study_route()}
        with RouterProcess(tmp_path / "router", config) as router:
            assert router.send(files).returncode == 0
            jobs = router.wait_jobs(lambda js: all_settled(js), 90)
            assert [(j["state"], j["delivered"]) for j in jobs] == [("completed", 6)]
            assert jobs[0]["attempts"] >= 2
            assert_holds(peer, files, router.storage / "objects")
        seen = Counter(re.findall(r"STOW-SEEN ([0-9.]+)", peer.log_path.read_text()))
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    assert set(seen) == set(uids)
    # Refused once, so handed twice; every other instance stored the first time it was
    # handed over, and never sent again.
    assert {uid: seen[uid] for uid in uids} == {
        uid: 2 if path in refused else 1 for uid, path in uids.items()
    }


def test_refused_credentials_pause_until_the_configuration_fixes_them(tmp_path: Path) -> None:
    files = make_study(tmp_path / "in", 3)
    with orthanc(tmp_path / "orthanc", credentials=("router", "right-pass")) as peer:
        auth = {"type": "basic", "username": "router", "password_env": "WRONG_PASSWORD"}
        config = {"destinations": {"web": destination(peer, auth=auth)}, "routes": study_route()}
        env = {"WRONG_PASSWORD": "wrong-pass", "RIGHT_PASSWORD": "right-pass"}
        with RouterProcess(tmp_path / "router", config, env=env) as router:
            assert router.send(files).returncode == 0
            reason = f"HTTP 401 from {peer.url}/dicom-web/studies: credentials refused; "
            reason += "check destinations.web.auth"
            wait_until(lambda: reason in router.log(), 60, message="the 401 reason")
            wait_until(lambda: "probe of web failed" in router.log(), 30, message="probes")
            jobs = router.jobs()
            assert all(j["delivered"] == 0 and j["state"] != "failed" for j in jobs), jobs
            assert all(j["connection_failures"] >= 1 and j["attempts"] == 0 for j in jobs), jobs
            listing = router.cli("queue", "list", "--config", str(router.config_path), "--json")
            [web] = [d for d in json.loads(listing.stdout)["destinations"] if d["name"] == "web"]
            assert web["state"] == "probing" and web["paused_since"], web
            assert "credentials refused; check destinations.web.auth" in web["last_error"], web
            assert peer.instance_count() == 0

            fixed = yaml.safe_load(router.config_path.read_text())
            fixed["destinations"]["web"]["auth"]["password_env"] = "RIGHT_PASSWORD"
            router.config_path.write_text(yaml.safe_dump(fixed, sort_keys=False))
            router.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            jobs = router.wait_jobs(lambda js: all_settled(js), 60)
            assert [(j["state"], j["delivered"]) for j in jobs] == [("completed", 3)]
            assert_holds(peer, files, router.storage / "objects")


def test_the_stow_benchmark_runs(tmp_path: Path) -> None:
    """bench/stow_bench.py on 3 small instances: every leg runs and checks what B holds
    (speed is not asserted)."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "stow_bench.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--instances", "3", "--rows", "64", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("round 1 router", "round 1 queued", "round 1 orthanc", "STOW alone, router"):
        assert line in out.stdout, out.stdout
