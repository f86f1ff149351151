"""Several receive processes on one node (``dicom.processes``), and the grouped index
commits of concurrent associations, end to end: dcmtk ``storescu`` processes send at
once to a real router, which routes to a dcmtk ``storescp``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread

from tests.support.dcmtk import HOST, StoreSCP, dcmtk_env, dcmtk_tool, free_port, sop_uids
from tests.support.pki import Pki
from tests.support.router import (
    AE_TITLE,
    RouterProcess,
    all_settled,
    node_children,
    storescu,
    wait_until,
)
from tests.support.synth import make_small_study
from tests.test_dicom_tls import router_tls, tls_options

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]


def _to(pacs: StoreSCP, processes: int) -> dict[str, Any]:
    return {
        "dicom": {"processes": processes},
        "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": pacs.port}},
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
    }


def _studies(root: Path, senders: int, each: int) -> list[list[Path]]:
    return [make_small_study(root / f"modality{n}", each) for n in range(senders)]


def _storescu(port: int, files: list[Path], calling: str) -> subprocess.Popen[str]:
    """One modality: ``storescu -v`` (it names each file it sends and each response)."""
    command = [dcmtk_tool("storescu"), "-v", "-aet", calling, "-aec", AE_TITLE, HOST, str(port)]
    return subprocess.Popen(
        command + [str(f) for f in files],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dcmtk_env(),
    )


def _acknowledged(output: str) -> list[str]:
    """The files storescu got a success response for (its -v log, in order)."""
    acked, current = [], None
    for line in output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def _children(router: RouterProcess) -> dict[str, int]:
    """Role -> pid of the node's live child processes."""
    assert router.process is not None
    return node_children(router.process.pid)


def _readyz(router: RouterProcess) -> dict[str, Any]:
    url = f"http://127.0.0.1:{router.config['http']['port']}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def test_four_modalities_at_once_on_two_receive_processes_are_stored_and_routed(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    studies = _studies(tmp_path / "in", 4, 25)
    with RouterProcess(tmp_path / "router", _to(pacs, 2)) as router:
        # The node receives (receiver-1); receiver-2 is forked from it.
        roles = _children(router)
        assert sorted(roles) == ["dispatch", "http", "receiver-2"]
        senders = [_storescu(router.port, files, f"CT{n}") for n, files in enumerate(studies)]
        outputs = [sender.communicate(timeout=240)[0] for sender in senders]
        for sender, output in zip(senders, outputs, strict=True):
            assert sender.returncode == 0, output[-2000:]
        expected = set().union(*(sop_uids(files) for files in studies))
        jobs = router.wait_jobs(lambda js: len(js) == 100 and all_settled(js), 120)
        assert {j["state"] for j in jobs} == {"completed"}
        assert pacs.received_sops() == expected
        ready = _readyz(router)
        assert ready["checks"]["receiver-1"]["ok"] and ready["checks"]["receiver-2"]["ok"]


def test_a_killed_receive_process_is_restarted_and_the_port_keeps_serving(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    with RouterProcess(tmp_path / "router", _to(pacs, 2)) as router:
        killed = _children(router)["receiver-2"]
        os.kill(killed, signal.SIGKILL)
        # The other receive process still listens on the port meanwhile.
        first = make_small_study(tmp_path / "first", 5)
        assert router.send(first).returncode == 0
        wait_until(
            lambda: router.log().count("receiver-2 process started") == 2,
            60,
            message="receiver-2 restarted",
        )
        assert "receiver-2 process exited unexpectedly" in router.log()
        restarted = _children(router)["receiver-2"]
        assert restarted != killed
        wait_until(
            lambda: _readyz(router)["checks"]["receiver-2"].get("pid") == restarted,
            30,
            message="the new receiver-2 heartbeat",
        )
        assert _readyz(router)["status"] == "ready"
        # Several associations, so that both processes serve some after the restart.
        for run in range(4):
            files = make_small_study(tmp_path / f"then{run}", 3)
            assert router.send(files, calling=f"CT{run}").returncode == 0
        wait_until(lambda: len(pacs.received_sops()) == 17, 90, message="17 delivered")


def _indexed(storage: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{storage / 'index.sqlite'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT sop_instance_uid, path FROM instances WHERE purged_at IS NULL")
        return dict(rows.fetchall())


@pytest.mark.parametrize("processes", [1, 2])
def test_kill_9_after_concurrent_acknowledgements_loses_none_of_them(
    tmp_path: Path, pacs: StoreSCP, processes: int
) -> None:
    """Four storescu send at once (their rows share commits); the node is killed
    with SIGKILL while they send: every instance any of them got a success for is
    indexed and its file is on disk."""
    studies = _studies(tmp_path / "in", 4, 150)
    uid_of = {str(f): uid for files in studies for f, uid in _uids(files).items()}
    router = RouterProcess(tmp_path / "router", _to(pacs, processes)).start()
    try:
        senders = [_storescu(router.port, files, f"CT{n}") for n, files in enumerate(studies)]
        wait_until(lambda: _count_rows(router.storage) >= 80, 120, message="80 indexed")
        router.kill()
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
        acked = [uid_of[path] for output in outputs for path in _acknowledged(output)]
        assert 80 <= len(acked) < 600, "the kill must land mid-stream"
        rows = _indexed(router.storage)
        missing = sorted(set(acked) - set(rows))
        assert missing == [], f"{len(missing)} acknowledged instance(s) not indexed"
        objects = router.storage / "objects"
        assert all((objects / rows[uid]).is_file() for uid in acked)
    finally:
        router.stop()


def _uids(files: list[Path]) -> dict[Path, str]:
    return {f: str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def _count_rows(storage: Path) -> int:
    try:
        with sqlite3.connect(f"file:{storage / 'index.sqlite'}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_sighup_reaches_every_receive_process(tmp_path: Path, pacs: StoreSCP) -> None:
    """A reload that stops accepting a caller applies in each receive process: none
    of several associations from it (spread over the processes by the kernel) gets
    through, and each process logs the version it now runs."""
    files = make_small_study(tmp_path / "in", 1)
    with RouterProcess(tmp_path / "router", _to(pacs, 2)) as router:
        assert router.send(files, calling="OLDCT").returncode == 0
        config = router.config
        config["dicom"]["allowed_callers"] = ["NEWCT"]
        router.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        assert router.process is not None
        router.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: "receiver-2 runs on configuration version 2" in router.log(),
            60,
            message="receiver-2 reloaded",
        )
        refused = [router.send(files, calling="OLDCT").returncode for _ in range(8)]
        assert all(code != 0 for code in refused), refused
        assert router.send(files, calling="NEWCT").returncode == 0


def test_each_receive_process_serves_the_tls_listener(
    tmp_path: Path, pacs: StoreSCP, pki: Pki
) -> None:
    tls_port = free_port()
    config = _to(pacs, 2)
    config["dicom"]["tls"] = router_tls(pki, tls_port)
    client = tls_options(pki, pki.client_cert, pki.client_key)
    with RouterProcess(tmp_path / "router", config) as router:
        lines = router.log().splitlines()
        for role in ("MainProcess", "receiver-2"):
            line = next(x for x in lines if f"{role} dicomrouter.receive: listening" in x)
            assert f":{tls_port} (TLS)" in line, line
        sent: set[str] = set()
        for run in range(6):
            files = make_small_study(tmp_path / f"in{run}", 2)
            result = storescu(files, tls_port, calling=f"CT{run}", extra=client)
            assert result.returncode == 0, result.stderr
            sent |= sop_uids(files)
        wait_until(lambda: pacs.received_sops() == sent, 90, message="12 delivered")
