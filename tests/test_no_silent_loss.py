"""No silent loss, end to end with a real router and dcmtk peers.

An acknowledged instance that could not be planned is planned later, and the jobs of
a destination removed from the configuration are shown and can be moved.

The reported scenario: storage on an 8 MB tmpfs with
``storage.min_free_space: 0``, a real router process, dcmtk ``storescu`` sending 30
images of 512 KB to it and a dcmtk ``storescp`` as the destination. The filesystem
fills up: some C-STOREs are acknowledged, the rest refused, and the dispatch process
cannot write the plans of some acknowledged instances to the index. Once the
filesystem has room again, without any restart, every acknowledged instance reaches
the destination.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from tests.support import mounted_tmpfs
from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.router import RouterProcess, storescu, wait_until
from tests.support.synth import make_large_study, make_small_study

pytestmark = [pytest.mark.interop, pytest.mark.timeout(400)]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs."""
    with mounted_tmpfs(tmp_path / "small", "8m") as mount:
        yield mount


def acknowledged(storescu_output: str, files: list[Path]) -> set[str]:
    """SOP Instance UIDs storescu got a success status for, from its verbose log:
    each ``Sending file: PATH`` is followed by the response to that file."""
    ok: set[str] = set()
    current: str | None = None
    for line in storescu_output.splitlines():
        sending = re.search(r"Sending file: (\S+)", line)
        if sending:
            current = sending.group(1)
        elif "Received Store Response" in line and current is not None:
            if "(Success)" in line:
                ok.add(str(dcmread(current, stop_before_pixels=True).SOPInstanceUID))
            current = None
    assert len(files) >= len(ok)
    return ok


def fill(mount: Path, leave: int) -> None:
    """A filler file that leaves ``leave`` bytes free on ``mount``."""
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    (mount / "filler").write_bytes(b"\0" * max(0, free - leave))


def dispatch_pid(router: RouterProcess) -> int:
    return int(re.findall(r"dispatch process started \(pid (\d+)\)", router.log())[-1])


def unplanned_in_index(router: RouterProcess) -> int:
    db = sqlite3.connect(f"file:{router.storage / 'index.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return int(db.execute("SELECT count(*) FROM instances WHERE routed = -1").fetchone()[0])
    finally:
        db.close()


@pytest.mark.interop
def test_acknowledged_instances_are_delivered_after_the_disk_fills_up_without_restart(
    tmp_path: Path, small_fs: Path, pacs: StoreSCP
) -> None:
    files = make_large_study(tmp_path / "in", 30)
    config = {
        "storage": {"path": str(small_fs / "data"), "min_free_space": 0},
        "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": pacs.port}},
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        # The dispatch process is held while the disk fills, so that it plans the
        # received instances only once the filesystem is full: its index writes fail.
        held = dispatch_pid(router)
        os.kill(held, signal.SIGSTOP)
        try:
            sent = storescu(files, router.port, router.ae_title, extra=["-v"])
            output = sent.stdout + sent.stderr
            ok = acknowledged(output, files)
            assert 0 < len(ok) < len(files), output[-3000:]
            # What the refused image left free is too little for an image but plenty
            # for the plans: take most of it, as any other writer on the disk would.
            fill(small_fs, leave=48 * 1024)
        finally:
            os.kill(held, signal.SIGCONT)
        wait_until(
            lambda: "cannot plan instance" in router.log(),
            60,
            message="the planner to fail on the full index",
        )
        assert unplanned_in_index(router) > 0
        # Room again, the router still running.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
        wait_until(
            lambda: ok <= pacs.received_sops(),
            120,
            interval=1.0,
            message="every acknowledged instance at the destination",
        )
        assert dispatch_pid(router) == held  # no restart of the dispatch process either
        assert unplanned_in_index(router) == 0


@pytest.mark.interop
@pytest.mark.timeout(240)
def test_jobs_of_a_removed_destination_are_shown_and_moved_to_another(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    """A destination that never answered is removed from the configuration while it
    still has jobs: ``queue list`` names them orphaned, ``queue move`` hands them to
    a working destination, which receives every instance."""
    gone = {"ae_title": "GONE", "host": HOST, "port": free_port()}  # nobody listens
    working = {"ae_title": "PACS", "host": HOST, "port": pacs.port}
    config = {
        "destinations": {
            "gone": {**gone, "retry": {"initial_delay": "1h", "max_delay": "1h"}},
            "pacs": working,
        },
        "routes": [{"name": "all", "trigger": "instance", "to": ["gone"]}],
    }
    files = make_small_study(tmp_path / "in", 3)
    with RouterProcess(tmp_path / "router", config) as router:
        assert router.send(files).returncode == 0
        router.wait_jobs(
            lambda jobs: len(jobs) == 3 and all(j["state"] == "pending" for j in jobs),
            60,
            "three jobs waiting for the unreachable destination",
        )
        config["destinations"] = {"pacs": working}
        config["routes"] = [{"name": "all", "trigger": "instance", "to": ["pacs"]}]
        router.config_path.write_text(yaml.safe_dump({**router.config, **config}, sort_keys=False))
        assert router.process is not None
        router.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: "dispatch runs on configuration version 2" in router.log(), 30, message="reload"
        )
        args = ["--config", str(router.config_path)]
        listed = json.loads(router.cli("queue", "list", "--json", *args, check=True).stdout)
        [orphan] = listed["orphaned"]
        assert (orphan["destination"], orphan["total"]) == ("gone", 3)
        shown = router.cli("queue", "list", *args, check=True).stdout
        assert "orphaned" in shown and "no longer configured" in shown
        moved = router.cli("queue", "move", "--from", "gone", "--to", "pacs", *args, check=True)
        assert "moved 3 job(s)" in moved.stdout
        wait_until(lambda: pacs.received_sops() == sop_uids(files), 60, message="delivered to pacs")
        after = json.loads(router.cli("queue", "list", "--json", *args, check=True).stdout)
        assert after["orphaned"] == []
