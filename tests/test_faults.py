"""Faults: crashes, aborts, hung and failing peers. The durability contract under fire.

The router runs as a real process (``RouterProcess``); senders and destinations are
dcmtk tools or small pynetdicom peers living in this test process. What is checked
is what an operator would see: what the destination received, the queue as the CLI
shows it, the storage folder and the index on disk.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.sop_class import Verification

from tests.support.dcmtk import HOST, StoreSCP, free_port
from tests.support.nodelay import install_tcp_nodelay
from tests.support.router import (
    AE_TITLE,
    RouterProcess,
    all_settled,
    node_children,
    wait_until,
)
from tests.support.synth import make_large_study, make_small_study

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


# -- helpers ----------------------------------------------------------


@pytest.fixture(autouse=True)
def _stream_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def dest(port: int, ae_title: str = "PACS", **extra: Any) -> dict[str, Any]:
    return {"ae_title": ae_title, "host": HOST, "port": port, **extra}


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def index_db(router: RouterProcess) -> sqlite3.Connection:
    db = router.storage / "index.sqlite"
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)


def indexed(router: RouterProcess) -> dict[str, str]:
    con = index_db(router)
    try:
        return dict(con.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
    finally:
        con.close()


def job_states(router: RouterProcess) -> Counter[str]:
    con = index_db(router)
    try:
        return Counter(state for (state,) in con.execute("SELECT state FROM jobs").fetchall())
    finally:
        con.close()


def assert_index_consistent(router: RouterProcess) -> dict[str, str]:
    """Every indexed row points at a file that exists under ``objects``."""
    rows = indexed(router)
    missing = [uid for uid, rel in rows.items() if not (router.storage / "objects" / rel).is_file()]
    assert missing == [], f"{len(missing)} indexed instance(s) without a file: {missing[:5]}"
    return rows


def tmp_files(router: RouterProcess) -> list[Path]:
    return router.files_under("tmp")


def received_uids(scp: StoreSCP) -> Counter[str]:
    """SOP Instance UID -> how many copies storescp wrote (use ``+uf`` for copies)."""
    uids: Counter[str] = Counter()
    for path in scp.received_files():
        try:
            uids[sop_uid(path)] += 1
        except Exception:  # noqa: S112 - a file storescp is still writing
            continue
    return uids


def show_job(router: RouterProcess, job_id: int) -> dict[str, Any]:
    import json

    result = router.cli("queue", "show", str(job_id), "--config", str(router.config_path), "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def rewrite_config(router: RouterProcess) -> None:
    router.config_path.write_text(yaml.safe_dump(router.config, sort_keys=False))


class PynetdicomSCP:
    """A storage SCP in this process; ``handler(uid) -> status`` decides each C-STORE."""

    def __init__(self, handler: Callable[[str], int], aet: str = "PEER") -> None:
        self.aet = aet
        self.port = free_port()
        self.handler = handler
        self.calls: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=aet)
        ae.maximum_pdu_size = 0
        ae.network_timeout = 300
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(
            (HOST, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.calls.append(uid)
        return self.handler(uid)

    def count(self, uid: str) -> int:
        with self._lock:
            return self.calls.count(uid)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def peer() -> Iterator[Callable[..., PynetdicomSCP]]:
    peers: list[PynetdicomSCP] = []
    releases: list[threading.Event] = []

    def start(handler: Callable[[str], int], aet: str = "PEER") -> PynetdicomSCP:
        scp = PynetdicomSCP(handler, aet)
        peers.append(scp)
        return scp

    start.releases = releases  # type: ignore[attr-defined]
    yield start
    for release in releases:
        release.set()
    for scp in peers:
        scp.close()


def hung_handler(peer_factory: Any, entered: threading.Event | None = None) -> Callable[[str], int]:
    """A handler that never answers (until the test ends)."""
    release = threading.Event()
    peer_factory.releases.append(release)

    def handler(uid: str) -> int:
        if entered is not None:
            entered.set()
        release.wait(120)
        return 0x0000

    return handler


# -- kill -9 while receiving -----------------------------------------------------------


def test_kill_during_receive_loses_nothing_acknowledged(tmp_path: Path, pacs: StoreSCP) -> None:
    files = make_small_study(tmp_path / "in", 300)
    uid_of = {f: sop_uid(f) for f in files}
    config = {
        "destinations": {"pacs": dest(pacs.port)},
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
        "dispatch": {"lease": "3s"},
    }
    router = RouterProcess(tmp_path / "router", config).start()
    acked: list[str] = []
    refused: list[tuple[str, Any]] = []

    def modality() -> None:
        install_tcp_nodelay()  # a realistic, fast sender
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(HOST, router.port, ae_title=AE_TITLE)
        if not assoc.is_established:
            return
        try:
            for path in files:
                try:
                    rsp = assoc.send_c_store(path)
                except Exception as exc:  # the router died under us
                    refused.append((uid_of[path], exc))
                    return
                if rsp.get("Status") == 0x0000:
                    acked.append(uid_of[path])
                else:
                    refused.append((uid_of[path], rsp.get("Status")))
                    return
        finally:
            if assoc.is_established:
                assoc.abort()

    sender = threading.Thread(target=modality, daemon=True)
    try:
        sender.start()
        wait_until(lambda: len(acked) >= 60 or not sender.is_alive(), 60, message="60 acks")
        router.kill()
        sender.join(60)
        assert 60 <= len(acked) < len(files), "the kill must land mid-stream"
        # What was acknowledged is on disk and indexed, even before the restart.
        rows = assert_index_consistent(router)
        assert set(acked) <= set(rows)

        router.start()
        assert tmp_files(router) == [], "partial files survived the restart"
        wait_until(
            lambda: set(acked) <= set(received_uids(pacs)),
            90,
            message="every acknowledged instance at storescp",
        )
        jobs = router.wait_jobs(
            lambda js: all_settled(js) and {j["resource_uid"] for j in js} >= set(acked), 60
        )
        assert {j["state"] for j in jobs} == {"completed"}
        assert_index_consistent(router)
    finally:
        router.stop()


# -- kill -9 while dispatching ---------------------------------------------------------


def test_kill_during_dispatch_delivers_everything_after_restart(
    tmp_path: Path, dcmtk: None
) -> None:
    files = make_large_study(tmp_path / "in", 200)
    uids = {sop_uid(f) for f in files}
    with StoreSCP(free_port(), "PACS", tmp_path / "pacs", extra_args=["+uf"]) as pacs:
        config = {
            "destinations": {"pacs": dest(pacs.port, batch_size=50, enabled=False)},
            "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
            "dispatch": {"lease": "3s"},
        }
        router = RouterProcess(tmp_path / "router", config)
        try:
            # 1. Receive everything with delivery disabled: a full queue.
            router.start()
            result = router.send(files)
            assert result.returncode == 0, result.stderr
            router.wait_jobs(lambda js: len(js) == 200, 60, message="200 jobs planned")
            router.stop()
            # 2. Enable delivery and crash the node while it is busy.
            router.config["destinations"]["pacs"]["enabled"] = True
            rewrite_config(router)
            router.start(wait_ready=False)  # delivery starts while the HTTP child starts
            wait_until(
                lambda: job_states(router)["in_progress"] > 0 and len(pacs.received_files()) >= 10,
                60,
                interval=0.02,
                message="jobs in progress and some delivered",
            )
            router.kill()
            before = job_states(router)
            delivered_before = len(pacs.received_files())
            assert before["in_progress"] > 0, before
            assert delivered_before < 200, "the kill came too late to test anything"
            # 3. Restart: the node reclaims its own leases and finishes the work.
            router.start()
            jobs = router.wait_jobs(
                lambda js: len(js) == 200 and all_settled(js), 120, message="all jobs settled"
            )
            assert Counter(j["state"] for j in jobs) == {"completed": 200}
            got = received_uids(pacs)
        finally:
            router.stop()
    assert set(got) == uids, f"missing at destination: {len(uids - set(got))}"
    duplicates = sum(got.values()) - len(uids)
    # At-least-once: only copies delivered before the kill may arrive a second time.
    assert 0 <= duplicates <= delivered_before, duplicates
    print(f"kill during dispatch: {delivered_before} delivered before, {duplicates} duplicate(s)")


# -- A-ABORT from the sender in the middle of an instance ------------------------------


def _pdata(context_id: int, payload: bytes, command: bool, last: bool) -> bytes:
    header = (1 if command else 0) | (2 if last else 0)
    item = struct.pack(">IBB", len(payload) + 2, context_id, header) + payload
    return struct.pack(">BBI", 0x04, 0x00, len(item)) + item


def _store_command(sop_class: str, uid: str) -> bytes:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = 0x0001
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = uid
    body = encode(cmd, True, True)
    assert body is not None
    full = Dataset()
    full.CommandGroupLength = len(body)
    full.update(cmd)
    encoded = encode(full, True, True)
    assert encoded is not None
    return encoded


def test_sender_abort_mid_instance_leaves_nothing(tmp_path: Path, pacs: StoreSCP) -> None:
    template = dcmread(make_small_study(tmp_path / "tpl", 1, prefix="TPL")[0])
    uid = str(template.SOPInstanceUID)
    del template.PixelData
    template.Rows = template.Columns = 5000  # 50 MB of 16-bit pixels announced...
    tpl_path = tmp_path / "header.dcm"
    template.save_as(tpl_path, enforce_file_format=True)
    _, offset = split_dataset(tpl_path)
    header = tpl_path.read_bytes()[offset:]
    announced = 5000 * 5000 * 2
    header += struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<I", announced)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    config = {
        "destinations": {"pacs": dest(pacs.port)},
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        ae = AE(ae_title="ABORTER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(HOST, router.port, ae_title=AE_TITLE)
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        assert sock is not None
        # ...of which 20 MB are sent, as raw P-DATA fragments, then A-ABORT.
        sock.sendall(_pdata(context_id, _store_command(CTImageStorage, uid), True, True))
        sock.sendall(_pdata(context_id, header, False, False))
        for _ in range(20):
            sock.sendall(_pdata(context_id, chunk, False, False))
        wait_until(
            lambda: sum(p.stat().st_size for p in tmp_files(router)) >= 10 * 2**20,
            30,
            message="the partial instance streaming into <storage>/tmp",
        )
        assoc.abort()
        time.sleep(1.0)
        # The router still serves, and the next instance goes through.
        good = make_small_study(tmp_path / "good", 1, prefix="OK")[0]
        result = router.send([good])
        assert result.returncode == 0, result.stderr
        wait_until(lambda: len(pacs.received_files()) == 1, 30, message="valid instance routed")
        jobs = router.wait_jobs(all_settled, 30)
        assert [j["resource_uid"] for j in jobs] == [sop_uid(good)]
        assert list(indexed(router)) == [sop_uid(good)]
        assert uid not in received_uids(pacs)
        lingering = tmp_files(router)
    if lingering:
        print(f"partial file(s) kept in tmp until restart: {lingering}")
    router.start()
    try:
        assert tmp_files(router) == []
        assert list(indexed(router)) == [sop_uid(good)]
        assert router.jobs()[0]["state"] == "completed"
    finally:
        router.stop()


# -- hung destination ----------------------------------------------------------


def test_hung_destination_times_out_and_does_not_block_others(
    tmp_path: Path, pacs: StoreSCP, peer: Any
) -> None:
    hung = peer(hung_handler(peer), aet="HUNG")
    files = make_small_study(tmp_path / "in", 5)
    uids = {sop_uid(f) for f in files}
    config = {
        "destinations": {
            "hung": dest(
                hung.port,
                "HUNG",
                dimse_timeout="2s",
                retry={"initial_delay": "1s", "max_delay": "1s"},
            ),
            "pacs": dest(pacs.port),
        },
        "routes": [{"name": "both", "trigger": "instance", "to": ["hung", "pacs"]}],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        started = time.monotonic()
        assert router.send(files).returncode == 0
        wait_until(lambda: set(received_uids(pacs)) == uids, 20, message="healthy got all")
        healthy_time = time.monotonic() - started
        jobs = router.wait_jobs(
            lambda js: (
                len(js) == 10
                and all(j["state"] == "completed" for j in js if j["destination"] == "pacs")
                and all(
                    j["state"] in ("pending", "in_progress") and j["attempts"] >= 2
                    for j in js
                    if j["destination"] == "hung"
                )
            ),
            40,
            message="healthy completed, hung timed out and retried (2 attempts)",
        )
        assert healthy_time < 15
        for job in (j for j in jobs if j["destination"] == "hung"):
            assert job["last_error"], job
            assert "2s" in job["last_error"] or "timeout" in job["last_error"].lower(), job
            detail = show_job(router, job["id"])
            finished = [a for a in detail["attempts"] if a.get("outcome")]
            assert len(finished) >= 2 and all(a["outcome"] == "retry" for a in finished), detail
            assert all(i["state"] == "pending" for i in detail["instances"])
        print("hung last_error:", jobs[0]["last_error"] if jobs else None)


# -- statuses from the destination -----------------------------------------------------


@pytest.fixture(scope="module")
def status_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One router, one pynetdicom peer answering per SOP Instance UID:
    0xC000 (permanent), 0xA700 twice then success (transient), 0xB007 (warning), 0x0000.
    All four instances are queued while the destination is disabled, then delivered
    together, so they share one claim (the realistic case under load)."""
    tmp_path = tmp_path_factory.mktemp("statuses")
    files = make_small_study(tmp_path / "in", 4)
    uids = [sop_uid(f) for f in files]
    refused, busy, warned, fine = uids
    answers = {refused: [0xC000], busy: [0xA700, 0xA700, 0x0000], warned: [0xB007], fine: [0x0]}
    served: Counter[str] = Counter()

    def handler(uid: str) -> int:
        sequence = answers[uid]
        status = sequence[min(served[uid], len(sequence) - 1)]
        served[uid] += 1
        return status

    with pynetdicom_config_chunked():
        scp = PynetdicomSCP(handler, aet="PICKY")
        config = {
            "destinations": {
                "picky": dest(
                    scp.port,
                    "PICKY",
                    enabled=False,
                    retry={"initial_delay": "1s", "max_delay": "1s", "jitter": 0},
                )
            },
            "routes": [{"name": "all", "trigger": "instance", "to": ["picky"]}],
        }
        router = RouterProcess(tmp_path / "router", config)
        try:
            router.start()
            assert router.send(files).returncode == 0
            router.wait_jobs(lambda js: len(js) == 4, 30)
            router.stop()
            router.config["destinations"]["picky"]["enabled"] = True
            rewrite_config(router)
            router.start()
            router.wait_jobs(all_settled, 60, message="all status jobs settled")
            time.sleep(3)  # a wrongful retry of the permanent failure would come now
            jobs = router.jobs()
            by_uid = {j["resource_uid"]: j for j in jobs}
            details = {uid: show_job(router, by_uid[uid]["id"]) for uid in uids}
            yield {
                "uids": dict(refused=refused, busy=busy, warned=warned, fine=fine),
                "jobs": by_uid,
                "details": details,
                "calls": Counter(scp.calls),
            }
        finally:
            router.stop()
            scp.close()


class pynetdicom_config_chunked:  # noqa: N801 - a tiny context manager
    def __enter__(self) -> None:
        self.saved = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True

    def __exit__(self, *exc: object) -> None:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = self.saved


def test_status_a700_is_retried_until_delivered(status_run: dict[str, Any]) -> None:
    uid = status_run["uids"]["busy"]
    job, detail = status_run["jobs"][uid], status_run["details"][uid]
    assert status_run["calls"][uid] == 3
    assert job["state"] == "completed"
    assert [a["outcome"] for a in detail["attempts"]][:2] == ["retry", "retry"]
    assert detail["instances"][0]["status"] == 0x0000


def test_status_c000_fails_the_instance_without_retry(status_run: dict[str, Any]) -> None:
    uid = status_run["uids"]["refused"]
    job, detail = status_run["jobs"][uid], status_run["details"][uid]
    assert status_run["calls"][uid] == 1
    assert job["state"] == "failed"
    assert detail["instances"][0]["state"] == "failed"
    assert detail["instances"][0]["status"] == 0xC000
    assert len(detail["attempts"]) == 1


def test_failed_job_last_error_names_its_own_status(status_run: dict[str, Any]) -> None:
    uid = status_run["uids"]["refused"]
    assert "0xC000" in (status_run["jobs"][uid]["last_error"] or "")


def test_status_b007_is_a_warning(status_run: dict[str, Any]) -> None:
    uid = status_run["uids"]["warned"]
    job, detail = status_run["jobs"][uid], status_run["details"][uid]
    assert status_run["calls"][uid] == 1
    assert job["state"] == "warning"
    assert detail["instances"][0]["state"] == "warning"
    assert detail["instances"][0]["status"] == 0xB007
    fine = status_run["uids"]["fine"]
    assert status_run["jobs"][fine]["state"] == "completed"
    assert status_run["calls"][fine] == 1


# -- clean stop while a destination hangs ----------------------------------------------


def test_sigterm_stops_promptly_while_destination_hangs(tmp_path: Path, peer: Any) -> None:
    entered = threading.Event()
    hung = peer(hung_handler(peer, entered), aet="HUNG")
    files = make_small_study(tmp_path / "in", 3)
    config = {
        "destinations": {"hung": dest(hung.port, "HUNG", dimse_timeout="60s")},
        "routes": [{"name": "all", "trigger": "instance", "to": ["hung"]}],
    }
    router = RouterProcess(tmp_path / "router", config).start()
    try:
        assert router.send(files).returncode == 0
        assert entered.wait(30), "the router never sent to the hung destination"
    finally:
        started = time.monotonic()
        code = router.stop(timeout=20)  # then SIGKILL: a failed clean stop
        elapsed = time.monotonic() - started
    assert code == 0, router.log()[-3000:]
    assert elapsed < 10, f"SIGTERM took {elapsed:.1f}s with a hung destination"
    assert "dicomrouter stopped" in router.log()
    # Nothing was lost: the jobs wait for the next start.
    assert {j["state"] for j in router.jobs()} <= {"pending", "in_progress"}


# -- the dispatch process dies on its own ----------------------------------------------


def _everything_to(pacs: Any) -> dict[str, Any]:
    return {
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
    }


@pytest.mark.interop
def test_a_killed_dispatch_process_is_restarted_and_delivers(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    with RouterProcess(tmp_path / "router", _everything_to(pacs)) as router:
        assert router.process is not None
        wait_until(lambda: "dicomrouter ready" in router.log(), 60, message="dispatch started")
        started = re.findall(r"dispatch process started \(pid (\d+)\)", router.log())
        assert len(started) == 1, router.log()
        children = subprocess.run(
            ["pgrep", "-P", str(router.process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert started[0] in children  # the logged pid is a live child of the node
        os.kill(int(started[0]), signal.SIGKILL)
        files = make_small_study(tmp_path / "in", 5)
        assert router.send(files).returncode == 0  # receiving never stopped
        wait_until(lambda: len(pacs.received_files()) == 5, 60, message="5 files after restart")
        assert "dispatch process exited unexpectedly" in router.log()


# -- the processes of a node ------------------------------------------------------------


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.interop
@pytest.mark.parametrize("processes", [1, 2])
def test_a_node_runs_its_children_and_numpy_only_where_pixels_are_decoded(
    tmp_path: Path, pacs, processes: int
) -> None:  # type: ignore[no-untyped-def]
    """Nothing but the dispatch and HTTP children (no multiprocessing resource
    tracker), and the receive processes with ``dicom.processes`` above 1; numpy
    loaded only in the dispatch process, which may decompress; the processes that
    receive and the HTTP process parse headers without it."""
    config = {**_everything_to(pacs), "dicom": {"processes": processes}}
    with RouterProcess(tmp_path / "router", config) as router:
        assert router.process is not None
        wait_until(lambda: "dicomrouter ready" in router.log(), 60, message="ready")
        files = make_small_study(tmp_path / "in", 3)
        assert router.send(files).returncode == 0  # the receiver has parsed headers
        wait_until(lambda: len(pacs.received_files()) == 3, 60, message="3 delivered")
        node = router.process.pid
        roles = node_children(node)
        # The node receives; with dicom.processes N, receiver-2..N are forked from it.
        receivers = [f"receiver-{n}" for n in range(2, processes + 1)]
        assert sorted(roles) == ["dispatch", "http", *receivers], roles
        for pid in (node, roles["http"], *(roles[r] for r in receivers)):
            assert "/numpy/" not in _maps(pid)
        assert "/numpy/" in _maps(roles["dispatch"])
        assert "http process started" in router.log()
