"""Groups end to end: a real router in front of a pair of dcmtk ``storescp`` nodes.

What each storescp really received decides: a study lands whole on one member; when
that member goes down, the next study (and the waiting work) goes whole to the other.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.support import require_peers
from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.router import RouterProcess, wait_until
from tests.support.synth import make_study

pytestmark = pytest.mark.interop

FAST_PAUSE: dict[str, Any] = {
    "pause_after_failures": 2,
    "probe_interval": "1s",
    "retry": {"initial_delay": "1s", "max_delay": "2s", "max_attempts": 5},
}


def config(ports: tuple[int, int], strategy: str) -> dict[str, Any]:
    return {
        "destinations": {
            "pacs1": {"ae_title": "PACS1", "host": HOST, "port": ports[0], **FAST_PAUSE},
            "pacs2": {"ae_title": "PACS2", "host": HOST, "port": ports[1], **FAST_PAUSE},
            "pacs-pair": {"type": "group", "members": ["pacs1", "pacs2"], "strategy": strategy},
        },
        "routes": [{"name": "all", "to": ["pacs-pair"]}],
    }


def send(router: RouterProcess, files: list[Path]) -> None:
    result = router.send(files)
    assert result.returncode == 0, f"storescu failed:\n{result.stderr}\n{router.log()[-2000:]}"


def state(router: RouterProcess, name: str) -> str | None:
    """The destination's state as `queue list --json` (and the API) name it."""
    out = router.cli("queue", "list", "--config", str(router.config_path), "--json", check=True)
    found = [d["state"] for d in json.loads(out.stdout)["destinations"] if d["name"] == name]
    return found[0] if found else None


def received(scp: StoreSCP, wanted: set[str], timeout: float = 60) -> None:
    wait_until(
        lambda: wanted <= scp.received_sops(),
        timeout,
        interval=0.3,
        message=f"{len(wanted)} instances at {scp.aet} (has {len(scp.received_sops())})",
    )


def test_failover_pair_a_study_whole_on_the_first_then_on_the_second_when_it_is_down(
    tmp_path: Path,
) -> None:
    require_peers(dcmtk=True)
    ports = (free_port(), free_port())
    study_a = make_study(tmp_path / "in", 6, prefix="A")
    study_b = make_study(tmp_path / "in", 6, prefix="B")
    study_c = make_study(tmp_path / "in", 4, prefix="C")
    a, b, c = sop_uids(study_a), sop_uids(study_b), sop_uids(study_c)
    with (
        StoreSCP(ports[0], "PACS1", tmp_path / "pacs1") as pacs1,
        StoreSCP(ports[1], "PACS2", tmp_path / "pacs2") as pacs2,
        RouterProcess(tmp_path / "router", config(ports, "failover")) as router,
    ):
        send(router, study_a)
        received(pacs1, a)
        pacs1.stop()  # the first node goes down
        send(router, study_b)
        # B was queued for pacs1 (still up as far as the router knew); two refused
        # connections pause pacs1, and B's waiting work moves whole to pacs2.
        received(pacs2, b)
        router.wait_jobs(
            lambda js: all(j["state"] in ("completed", "canceled") for j in js),
            30,
            message="every job settled",
        )
        jobs = router.jobs()
        moved_note = "moved to pacs2 (group pacs-pair: pacs1 is paused)"
        assert {j["via_group"] for j in jobs} == {"pacs-pair"}
        assert {j["last_error"] for j in jobs if j["state"] == "canceled"} <= {moved_note}
        assert {j["destination"] for j in jobs if j["state"] == "completed"} == {"pacs1", "pacs2"}
        show = router.cli(
            "queue", "show", str(jobs[0]["id"]), "--config", str(router.config_path), check=True
        )
        assert "via group pacs-pair" in show.stdout
        # The group itself runs no workers: no health of its own, only its members'.
        with sqlite3.connect(router.storage / "index.sqlite") as db:
            names = {row[0] for row in db.execute("SELECT name FROM destination_state")}
        assert names == {"pacs1", "pacs2"}
        # The first node comes back: once its probe answers, new studies go to it again.
        pacs1.start()
        wait_until(lambda: state(router, "pacs1") == "ok", 30, message="pacs1 back")
        send(router, study_c)
        received(pacs1, a | c)
    assert pacs1.received_sops() == a | c  # nothing of B reached the node that was down
    assert pacs2.received_sops() == b  # B whole, A and C never split onto it


def test_round_robin_pair_spreads_studies_each_whole(tmp_path: Path) -> None:
    require_peers(dcmtk=True)
    ports = (free_port(), free_port())
    study_a = make_study(tmp_path / "in", 5, prefix="A", series_count=2)
    study_b = make_study(tmp_path / "in", 5, prefix="B", series_count=2)
    a, b = sop_uids(study_a), sop_uids(study_b)
    with (
        StoreSCP(ports[0], "PACS1", tmp_path / "pacs1") as pacs1,
        StoreSCP(ports[1], "PACS2", tmp_path / "pacs2") as pacs2,
        RouterProcess(tmp_path / "router", config(ports, "round_robin")) as router,
    ):
        send(router, study_a)
        received(pacs1, a)
        send(router, study_b)
        received(pacs2, b)
    assert pacs1.received_sops() == a
    assert pacs2.received_sops() == b
