"""Routing rules end to end: real storescu senders, a real router process, real storescps.

Every test drives the router from the outside (YAML, DICOM port, CLI) and judges by
what the destinations really received: storescp's log counts every C-STORE request, so
a duplicate delivery is seen even when storescp overwrites the file of the same name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread

from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.router import RouterProcess, all_settled, wait_until
from tests.support.synth import make_study

pytestmark = pytest.mark.interop

#: The issue's example route (docs/rules.md), with a short quiet time for tests.
CT_HEAD_ROUTE: dict[str, Any] = {
    "name": "ct-head-research",
    "trigger": "study",
    "stable_after": "1s",
    "when": {
        "Modality": "CT",
        "StudyDescription": {"contains": "HEAD"},
        "CallingAETitle": {"in": ["CT1", "CT2"]},
    },
    "forward": "study",
    "to": ["research"],
}


def dest(scp: StoreSCP) -> dict[str, Any]:
    return {"ae_title": scp.aet, "host": HOST, "port": scp.port}


def send_ok(router: RouterProcess, files: list[Path], calling: str = "STORESCU") -> None:
    result = router.send(files, calling=calling)
    assert result.returncode == 0, f"storescu failed:\n{result.stderr}\n{router.log()[-2000:]}"


def job_sops(router: RouterProcess, job_id: int) -> set[str]:
    out = router.cli(
        "queue", "show", str(job_id), "--config", str(router.config_path), "--json", check=True
    )
    return {item["sop_instance_uid"] for item in json.loads(out.stdout)["instances"]}


def settled_count(n: int):  # type: ignore[no-untyped-def]
    return lambda jobs: len(jobs) >= n and all_settled(jobs)


@pytest.fixture
def scps(tmp_path: Path, dcmtk: None) -> Iterator[dict[str, StoreSCP]]:
    started: dict[str, StoreSCP] = {}
    try:
        for name in ("RESEARCH", "ARCHIVE"):
            scp = StoreSCP(free_port(), name, tmp_path / name.lower(), accept="all")
            started[name.lower()] = scp.start()
        yield started
    finally:
        for scp in started.values():
            scp.stop()


# -- (a) the issue's example ------------------------------------------------------------------


def test_ct_head_from_ct1_reaches_research_as_one_study_job_and_nothing_else_does(
    tmp_path: Path, scps: dict[str, StoreSCP]
) -> None:
    research, archive = scps["research"], scps["archive"]
    config = {
        "destinations": {"research": dest(research), "archive": dest(archive)},
        "routes": [
            CT_HEAD_ROUTE,
            # Everything also goes to an archive, so we can tell when every study has
            # been received and planned (its instance jobs settle).
            {"name": "archive-all", "trigger": "instance", "to": ["archive"]},
        ],
    }
    data = tmp_path / "in"
    head_ct = make_study(
        data, 6, modality="CT", study_description="CT HEAD W/O", series_count=2, prefix="A"
    )
    head_ct_from_mr1 = make_study(data, 3, modality="CT", study_description="HEAD", prefix="B")
    chest_ct = make_study(data, 3, modality="CT", study_description="CT CHEST", prefix="C")
    mr_head = make_study(data, 3, modality="MR", study_description="MR HEAD", prefix="D")
    with RouterProcess(tmp_path / "router", config) as router:
        # The non-matching studies go first: once the matching one has been routed,
        # they have had every chance to be routed too.
        send_ok(router, head_ct_from_mr1, calling="MR1")
        send_ok(router, chest_ct, calling="CT1")
        send_ok(router, mr_head, calling="CT1")
        send_ok(router, head_ct, calling="CT1")
        total = 6 + 3 + 3 + 3
        jobs = router.wait_jobs(
            lambda js: (
                any(j["destination"] == "research" for j in js) and settled_count(total + 1)(js)
            ),
            60,
            message="the research job and every archive job settled",
        )
        wait_until(lambda: archive.store_requests() >= total, 30, message="archive got all")
    research_jobs = [j for j in jobs if j["destination"] == "research"]
    assert len(research_jobs) == 1, research_jobs
    job = research_jobs[0]
    study_uid = str(dcmread(head_ct[0], stop_before_pixels=True).StudyInstanceUID)
    assert (job["level"], job["resource_uid"], job["state"]) == ("study", study_uid, "completed")
    assert job["total"] == 6 and job["delivered"] == 6
    assert job["routes"] == ["ct-head-research"]
    assert research.received_sops() == sop_uids(head_ct)
    assert research.store_requests() == 6, "research received something else or twice"
    assert archive.received_sops() == sop_uids(head_ct + head_ct_from_mr1 + chest_ct + mr_head)


# -- (b) forward: matched ------------------------------------------------------------------


def test_forward_matched_sends_only_the_matching_instance_of_the_study(
    tmp_path: Path, scps: dict[str, StoreSCP]
) -> None:
    research = scps["research"]
    files = make_study(tmp_path / "in", 5, modality="CT", study_description="CT HEAD")
    # One instance of the study is a localizer.
    localizer = files[2]
    ds = dcmread(localizer)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(localizer)
    config = {
        "destinations": {"research": dest(research)},
        "routes": [
            {
                "name": "localizers",
                "trigger": "study",
                "stable_after": "1s",
                "when": {"ImageType": "LOCALIZER"},
                "forward": "matched",
                "to": ["research"],
            }
        ],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        send_ok(router, files)
        jobs = router.wait_jobs(settled_count(1), 30, message="the matched job")
        wait_until(lambda: research.store_requests() >= 1, 15, message="delivery")
    assert [(j["state"], j["total"]) for j in jobs] == [("completed", 1)]
    assert research.received_sops() == sop_uids([localizer])
    assert research.store_requests() == 1


# -- (c) two routes, one destination: each instance once --------------------------------------


def test_two_routes_to_the_same_destination_deliver_each_instance_once(
    tmp_path: Path, scps: dict[str, StoreSCP]
) -> None:
    research = scps["research"]
    files = make_study(tmp_path / "in", 5, modality="CT", study_description="CT HEAD")
    config = {
        "destinations": {"research": dest(research)},
        "routes": [
            {"name": "ct", "trigger": "instance", "when": {"Modality": "CT"}, "to": ["research"]},
            {
                "name": "head",
                "trigger": "instance",
                "when": {"StudyDescription": {"contains": "HEAD"}},
                "to": ["research"],
            },
        ],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        send_ok(router, files)
        jobs = router.wait_jobs(settled_count(5), 30, message="5 jobs settled")
        wait_until(lambda: research.store_requests() >= 5, 15, message="5 deliveries")
    assert sorted(j["resource_uid"] for j in jobs) == sorted(sop_uids(files)), (
        "one job per instance"
    )
    for job in jobs:
        assert (job["state"], job["total"], job["routes"]) == ("completed", 1, ["ct", "head"])
    assert research.received_sops() == sop_uids(files)
    assert research.store_requests() == 5


def test_instance_route_and_study_route_to_the_same_destination_deliver_each_instance_once(
    tmp_path: Path, scps: dict[str, StoreSCP]
) -> None:
    research, archive = scps["research"], scps["archive"]
    files = make_study(tmp_path / "in", 4, modality="CT", study_description="CT HEAD")
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    config = {
        "destinations": {"research": dest(research), "archive": dest(archive)},
        "routes": [
            {"name": "now", "trigger": "instance", "to": ["research"]},
            # The same study trigger to two destinations: both fire in the same planner
            # pass, so the archive's study job shows that the trigger has fired.
            {
                "name": "study",
                "trigger": "study",
                "stable_after": "1s",
                "to": ["research", "archive"],
            },
        ],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        send_ok(router, files)
        jobs = router.wait_jobs(
            lambda js: any(j["destination"] == "archive" for j in js) and all_settled(js),
            30,
            message="the study trigger fired and every job settled",
        )
        wait_until(lambda: research.store_requests() >= 4, 15, message="4 deliveries")
    assert research.store_requests() == 4, "an instance was delivered twice"
    assert research.received_sops() == sop_uids(files)
    research_jobs = [j for j in jobs if j["destination"] == "research"]
    assert sorted(j["resource_uid"] for j in research_jobs) == sorted(sop_uids(files)), (
        f"the study job to research should be empty (all instances already queued): {research_jobs}"
    )
    archive_jobs = [j for j in jobs if j["destination"] == "archive"]
    assert [(j["level"], j["resource_uid"], j["total"]) for j in archive_jobs] == [
        ("study", study_uid, 4)
    ]


# -- (d) follow-up ------------------------------------------------------------------------------


def test_instances_arriving_after_the_study_was_routed_make_a_follow_up_job(
    tmp_path: Path, scps: dict[str, StoreSCP]
) -> None:
    research = scps["research"]
    first = make_study(tmp_path / "in", 5, modality="CT", study_description="CT HEAD", prefix="A")
    study_uid = str(dcmread(first[0], stop_before_pixels=True).StudyInstanceUID)
    late = make_study(
        tmp_path / "in",
        3,
        modality="CT",
        study_description="CT HEAD",
        study_uid=study_uid,
        prefix="B",
    )
    config = {
        "destinations": {"research": dest(research)},
        "routes": [{"name": "study", "trigger": "study", "stable_after": "1s", "to": ["research"]}],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        send_ok(router, first)
        jobs = router.wait_jobs(settled_count(1), 30, message="the study job")
        assert [(j["state"], j["total"]) for j in jobs] == [("completed", 5)]
        send_ok(router, late)
        jobs = router.wait_jobs(settled_count(2), 30, message="the follow-up job")
        wait_until(lambda: research.store_requests() >= 8, 15, message="8 deliveries")
        first_job, follow_up = sorted(jobs, key=lambda j: j["id"])
        assert job_sops(router, first_job["id"]) == sop_uids(first)
        assert job_sops(router, follow_up["id"]) == sop_uids(late)
    assert (follow_up["level"], follow_up["resource_uid"]) == ("study", study_uid)
    assert (follow_up["state"], follow_up["total"]) == ("completed", 3)
    assert research.received_sops() == sop_uids(first + late)
    assert research.store_requests() == 8, "an instance was delivered twice"


# -- (e) trigger: series ------------------------------------------------------------------------


def test_series_trigger_fires_once_per_series(tmp_path: Path, scps: dict[str, StoreSCP]) -> None:
    research = scps["research"]
    files = make_study(tmp_path / "in", 6, modality="CT", series_count=3)
    series: dict[str, set[str]] = {}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        series.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
    config = {
        "destinations": {"research": dest(research)},
        "routes": [
            {"name": "series", "trigger": "series", "stable_after": "1s", "to": ["research"]}
        ],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        send_ok(router, files)
        jobs = router.wait_jobs(settled_count(3), 30, message="3 series jobs")
        wait_until(lambda: research.store_requests() >= 6, 15, message="6 deliveries")
        per_job = {j["resource_uid"]: job_sops(router, j["id"]) for j in jobs}
    assert len(jobs) == 3
    assert {j["level"] for j in jobs} == {"series"}
    assert {j["state"] for j in jobs} == {"completed"}
    assert per_job == series
    assert research.store_requests() == 6


# -- (f) the CLI: test-rule and check -----------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomrouter", *args], capture_output=True, text=True, timeout=120
    )


def write_config(path: Path, config: dict[str, Any]) -> Path:
    config = {"ae_title": "DICOMROUTER", "dicom": {"port": 11112}, **config}
    config.setdefault("storage", {"path": str(path.parent / "data")})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_test_rule_reports_routes_and_destinations(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        {
            "destinations": {
                "research": {"ae_title": "RESEARCH", "host": HOST, "port": 4242},
                "archive": {"ae_title": "ARCHIVE", "host": HOST, "port": 4243},
            },
            "routes": [
                CT_HEAD_ROUTE,
                {"name": "mr-archive", "when": {"Modality": "MR"}, "to": ["archive"]},
            ],
        },
    )
    head = make_study(tmp_path / "in", 1, modality="CT", study_description="CT HEAD", prefix="H")
    chest = make_study(tmp_path / "in", 1, modality="CT", study_description="CT CHEST", prefix="C")

    result = run_cli(
        "test-rule",
        "--config",
        str(config),
        "--calling-ae",
        "CT1",
        "--json",
        *map(str, head + chest),
    )
    assert result.returncode == 0, result.stderr
    report = {Path(entry["file"]).name: entry for entry in json.loads(result.stdout)["files"]}
    match, miss = report[head[0].name], report[chest[0].name]
    assert match["destinations"] == ["research"]
    routes = {r["name"]: r for r in match["routes"]}
    assert routes["ct-head-research"]["matched"] is True
    assert routes["ct-head-research"]["destinations"] == ["research"]
    assert (routes["ct-head-research"]["trigger"], routes["ct-head-research"]["forward"]) == (
        "study",
        "study",
    )
    assert routes["mr-archive"]["matched"] is False
    assert miss["destinations"] == []
    assert not any(r["matched"] for r in miss["routes"])
    why = {r["name"]: r["explanation"] for r in miss["routes"]}["ct-head-research"]
    assert "CT CHEST" in why and "HEAD" in why, why

    # The same CT HEAD from a sender not in the list does not match either.
    result = run_cli(
        "test-rule", "--config", str(config), "--calling-ae", "MR1", "--json", str(head[0])
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files"][0]["destinations"] == []


def test_check_warns_about_dead_duplicate_and_unused_and_strict_fails(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        {
            "destinations": {
                "research": {"ae_title": "RESEARCH", "host": HOST, "port": 4242},
                "unused": {"ae_title": "UNUSED", "host": HOST, "port": 4243},
            },
            "routes": [
                {"name": "never", "when": {"Modality": {"in": []}}, "to": ["research"]},
                {"name": "ct-a", "when": {"Modality": "CT"}, "to": ["research"]},
                {"name": "ct-b", "when": {"Modality": "CT"}, "to": ["research"]},
            ],
        },
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stderr.split())
    assert "routes[0] (never)" in text and "can never match" in text, text
    assert "destinations.unused" in text and "not used" in text, text
    assert "'ct-a' and 'ct-b'" in text and "same data" in text, text

    strict = run_cli("check", "--config", str(config), "--strict")
    assert strict.returncode == 1, strict.stdout + strict.stderr

    as_json = run_cli("check", "--config", str(config), "--json")
    assert as_json.returncode == 0
    report = json.loads(as_json.stdout)
    assert report["valid"] is True and report["errors"] == []
    assert {"key": "destinations.unused", "message": "is not used by any route"} in report[
        "warnings"
    ]
    assert len(report["warnings"]) >= 3


def test_check_rejects_a_routing_loop_with_its_key_path(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        {
            "destinations": {
                "myself": {"ae_title": "DICOMROUTER", "host": "127.0.0.1", "port": 11112},
            },
            "routes": [{"name": "loop", "to": ["myself"]}],
        },
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    text = " ".join(result.stderr.split())
    assert "destinations.myself" in text and "loop" in text, text


def test_check_rejects_a_typo_with_its_key_path(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        {
            "destinations": {
                "research": {
                    "ae_title": "RESEARCH",
                    "host": HOST,
                    "port": 4242,
                    "retry": {"max_attempt": 3},
                },
            },
            "routes": [
                {
                    "name": "r",
                    "when": {"StudyDescription": {"contians": "HEAD"}},
                    "to": ["research"],
                }
            ],
        },
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    text = " ".join(result.stderr.split())
    assert "destinations.research.retry.max_attempt" in text and "unknown key" in text, text
    assert "when.StudyDescription.contians" in text and "contains" in text, text


def test_a_private_sop_class_is_stored_and_forwarded_as_is(tmp_path: Path, dcmtk: None) -> None:
    """A vendor object whose SOP class is outside the DICOM root (here Siemens CSA
    Non-Image) reaches a destination that takes it (dcmtk storescp -pm), unchanged.
    dcmtk storescu will not send a SOP class it does not know, so pynetdicom does."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    private = "1.3.12.2.1107.5.9.1"
    (source,) = make_study(tmp_path / "src", 1)
    dataset = dcmread(source)
    dataset.SOPClassUID = private
    dataset.file_meta.MediaStorageSOPClassUID = private
    with StoreSCP(free_port(), "VENDOR", tmp_path / "vendor", extra_args=["-pm"]) as scp:
        config = {
            "destinations": {"vendor": {"ae_title": "VENDOR", "host": HOST, "port": scp.port}},
            "routes": [{"name": "all", "trigger": "instance", "to": ["vendor"]}],
        }
        with RouterProcess(tmp_path / "router", config) as router:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(private, ExplicitVRLittleEndian)
            assoc = ae.associate(HOST, router.port, ae_title=router.ae_title)
            assert assoc.is_established
            assert assoc.send_c_store(dataset).Status == 0
            assoc.release()
            wait_until(lambda: len(scp.received_files()) == 1, 60, message="forwarded")
        received = dcmread(scp.received_files()[0])
    assert received.SOPClassUID == private
    assert received.SOPInstanceUID == dataset.SOPInstanceUID
    assert received.PixelData == dataset.PixelData
