"""Storage commitment end to end, with real peers.

- Orthanc (a storage commitment SCP): the router delivers a study, sends the
  N-ACTION, and Orthanc reports on a *new* association to our listener (it knows us
  from its ``DicomModalities`` entry with ``AllowStorageCommitment``): every
  instance ends ``committed``, and Orthanc's REST API holds them all.
- dcmtk's storescp (no commitment SCP): it refuses the commitment SOP class; the
  instances stay delivered, their commitment ``failed`` with a message naming the
  destination, and they are not sent again even with ``on_timeout: resend``.
- Orthanc when its report cannot reach us (its entry for the router names a port
  nobody listens on): with ``on_timeout: resend`` the study is sent again after the
  timeout, and once ``retry.max_attempts`` are used up the commitment stays
  ``failed``; Orthanc holds every instance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import require_peers
from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.orthanc import Orthanc
from tests.support.router import RouterProcess, all_settled, wait_until
from tests.support.synth import make_small_study

N = 5


def _instances(router: RouterProcess) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for job in router.jobs():
        shown = router.cli(
            "queue",
            "show",
            str(job["id"]),
            "--config",
            str(router.config_path),
            "--json",
            check=True,
        )
        rows += json.loads(shown.stdout)["instances"]
    return rows


def _commitments(router: RouterProcess) -> list[str]:
    return sorted(str(i.get("commitment")) for i in _instances(router))


def test_orthanc_commits_what_it_stored_and_reports_on_a_new_association(
    tmp_path: Path,
) -> None:
    require_peers(orthanc=True)
    router_port = free_port()
    orthanc = Orthanc(
        tmp_path / "orthanc",
        aet="ORTHANC",
        extra_config={
            "DicomModalities": {
                "router": {
                    "AET": "DICOMROUTER",
                    "Host": HOST,
                    "Port": router_port,
                    "AllowStorageCommitment": True,
                }
            },
        },
    )
    files = make_small_study(tmp_path / "study", N)
    config = {
        "dicom": {"port": router_port},
        "destinations": {
            "orthanc": {
                "ae_title": "ORTHANC",
                "host": HOST,
                "port": orthanc.dicom_port,
                "storage_commitment": {"enabled": True, "timeout": "1m", "wait": "200ms"},
            }
        },
        "routes": [{"name": "all", "trigger": "instance", "to": ["orthanc"]}],
    }
    with orthanc, RouterProcess(tmp_path / "router", config) as router:
        assert router.send(files).returncode == 0
        router.wait_jobs(lambda js: all_settled(js), 60, message="jobs settled")
        wait_until(
            lambda: _commitments(router) == ["committed"] * N,
            30,
            message=f"{N} instances committed",
        )
        assert orthanc.instance_count() == N
        assert {orthanc.find_sop(uid) is not None for uid in sop_uids(files)} == {True}
        log = router.log()
        assert "storage commitment" in log
        states = {i["state"] for i in _instances(router)}
        assert states == {"completed"}


@pytest.mark.parametrize("on_timeout", ["warn", "resend"])
def test_a_store_scp_without_commitment_leaves_instances_delivered_and_commitment_failed(
    tmp_path: Path, on_timeout: str
) -> None:
    require_peers()
    files = make_small_study(tmp_path / "study", 3)
    scp = StoreSCP(free_port(), "PACS", tmp_path / "pacs", accept="all")
    config = {
        "destinations": {
            "pacs": {
                "ae_title": "PACS",
                "host": HOST,
                "port": scp.port,
                "storage_commitment": {"enabled": True, "on_timeout": on_timeout},
            }
        },
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
    }
    with scp, RouterProcess(tmp_path / "router", config) as router:
        assert router.send(files).returncode == 0
        router.wait_jobs(lambda js: all_settled(js), 60, message="jobs settled")
        try:
            wait_until(lambda: _commitments(router) == ["failed"] * 3, 20, message="failed")
        except AssertionError:
            raise AssertionError(f"{_commitments(router)}\n{router.log()[-3000:]}") from None
        rows = _instances(router)
        assert {r["state"] for r in rows} == {"completed"}
        assert all("does not support storage commitment" in r["message"] for r in rows), rows
        assert all("PACS@" in r["message"] for r in rows)
        assert scp.store_requests() == 3  # not sent again, whatever on_timeout says


def test_orthanc_whose_report_never_arrives_gets_the_study_again_then_it_fails(
    tmp_path: Path,
) -> None:
    require_peers(orthanc=True)
    nowhere = free_port()  # Orthanc's report goes here, and nobody listens
    orthanc = Orthanc(
        tmp_path / "orthanc",
        aet="ORTHANC",
        extra_config={
            "DicomModalities": {
                "router": {
                    "AET": "DICOMROUTER",
                    "Host": HOST,
                    "Port": nowhere,
                    "AllowStorageCommitment": True,
                }
            },
        },
    )
    files = make_small_study(tmp_path / "study", N)
    config = {
        "destinations": {
            "orthanc": {
                "ae_title": "ORTHANC",
                "host": HOST,
                "port": orthanc.dicom_port,
                "retry": {"max_attempts": 2, "initial_delay": "1s"},
                "storage_commitment": {
                    "enabled": True,
                    "timeout": "2s",
                    "wait": "200ms",
                    "on_timeout": "resend",
                },
            }
        },
        "routes": [{"name": "all", "trigger": "study", "stable_after": "1s", "to": ["orthanc"]}],
    }
    with orthanc, RouterProcess(tmp_path / "router", config) as router:
        assert router.send(files).returncode == 0
        wait_until(
            lambda: _commitments(router) == ["failed"] * N and all_settled(router.jobs()),
            90,
            message="commitment failed for good",
        )
        (job,) = router.jobs()
        detail = json.loads(
            router.cli(
                "queue",
                "show",
                str(job["id"]),
                "--config",
                str(router.config_path),
                "--json",
                check=True,
            ).stdout
        )
        # Sent twice, each time stored by Orthanc: the first send, then the resend.
        assert [a["sent"] for a in detail["attempts"]] == [N, N], detail["attempts"]
        rows = detail["instances"]
        assert {r["state"] for r in rows} == {"completed"}
        assert all("no storage commitment report" in r["message"] for r in rows), rows
        assert all("retry.max_attempts (2) used up" in r["message"] for r in rows), rows
        assert orthanc.instance_count() == N
        assert {orthanc.find_sop(uid) is not None for uid in sop_uids(files)} == {True}
