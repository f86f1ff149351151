"""Hostile and broken input: the router must refuse it precisely and keep serving.

Every test drives a real ``dicomrouter serve`` process from the outside. Inputs
dcmtk cannot produce (corrupt dataset bytes, invalid UIDs, a SOP Instance UID that
differs from the C-STORE request) are sent with pynetdicom streaming a hand-made
Part-10 file: pynetdicom builds the C-STORE command from the file meta and sends the
dataset bytes after it verbatim, so the router sees exactly the bytes we wrote.
"""

from __future__ import annotations

import copy
import os
import sqlite3
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import create_file_meta, encode_file_meta, split_dataset

from tests.support.dcmtk import HOST, free_port
from tests.support.router import AE_TITLE, RouterProcess, all_settled, wait_until
from tests.support.synth import make_small_study

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
INVALID_UID = 0xC001
UID_MISMATCH = 0xC002


# -- helpers ----------------------------------------------------------


@pytest.fixture(autouse=True)
def _stream_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom send our files' bytes as they are (never re-encoded)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def route_config(pacs: Any, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": pacs.port}},
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
    }
    for key, value in extra.items():
        config[key] = value
    return config


def template(folder: Path) -> Dataset:
    """A valid small CT dataset (read back from a synthetic file)."""
    return dcmread(make_small_study(folder, 1, prefix="TPL")[0])


def with_values(ds: Dataset, **values: Any) -> Dataset:
    """A deep copy of ``ds`` with ``values`` set, however invalid they are."""
    clone = copy.deepcopy(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pydicom_config.disable_value_validation():
            for keyword, value in values.items():
                setattr(clone, keyword, value)
    return clone


def dataset_body(ds: Dataset) -> bytes:
    """The dataset bytes (Explicit VR LE) of ``ds``, without preamble and file meta."""
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    tmp = folder / f"dr-body-{os.getpid()}-{generate_uid()[-12:]}.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pydicom_config.disable_value_validation():
            dcmwrite(tmp, ds, enforce_file_format=True)
    try:
        _, offset = split_dataset(tmp)
        return tmp.read_bytes()[offset:]
    finally:
        tmp.unlink()


def part10(path: Path, body: bytes, affected_sop_uid: str, sop_class: str = CTImageStorage) -> Path:
    """Write preamble + file meta + ``body``; the meta's SOP Instance UID becomes the
    C-STORE request's AffectedSOPInstanceUID when pynetdicom streams the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pydicom_config.disable_value_validation():
            meta = create_file_meta(
                sop_class_uid=sop_class,
                sop_instance_uid=affected_sop_uid,
                transfer_syntax=ExplicitVRLittleEndian,
            )
            encoded_meta = encode_file_meta(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + encoded_meta + body)
    return path


def c_store(port: int, files: list[Path], calling: str = "BADSCU") -> list[int | None]:
    """Send ``files`` over one pynetdicom association; the status of each (None: none)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, port, ae_title=AE_TITLE)
    assert assoc.is_established, "router refused the association"
    statuses: list[int | None] = []
    try:
        for path in files:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rsp = assoc.send_c_store(path)
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def start_without_echo(router: RouterProcess) -> RouterProcess:
    """Start a router whose access rules refuse the C-ECHO ``RouterProcess.start()``
    probes with: wait for its "ready" log line instead."""
    log = open(router.log_path, "ab")  # noqa: SIM115 - handed to the child
    router.process = subprocess.Popen(
        [sys.executable, "-m", "dicomrouter", "serve", "--config", str(router.config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    process = router.process
    wait_until(
        lambda: "dicomrouter ready" in router.log() or process.poll() is not None,
        60,
        message="router ready",
    )
    assert process.poll() is None, router.log()
    return router


def associate_status(port: int, calling: str, called: str = AE_TITLE) -> str:
    """Try one association: 'established', 'rejected' or 'aborted'."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 15
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return "established"
    return "rejected" if assoc.is_rejected else "aborted"


def indexed(router: RouterProcess) -> dict[str, str]:
    """SOP Instance UID -> relative path of every row in the router's index."""
    db = router.storage / "index.sqlite"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return dict(con.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
    finally:
        con.close()


def stored_files(router: RouterProcess) -> list[Path]:
    return sorted(p for p in (router.storage / "objects").rglob("*") if p.is_file())


def received_uids(pacs: Any) -> list[str]:
    """SOP Instance UIDs of what storescp wrote (its file names are ``CT.<uid>``)."""
    return [p.name.split(".", 1)[1] for p in pacs.received_files()]


def stores(pacs: Any) -> int:
    """C-STORE requests storescp received (its verbose log has one line each)."""
    return pacs.log().count("Received Store Request")


def send_valid(router: RouterProcess, folder: Path, prefix: str = "OK") -> str:
    """A valid instance through dcmtk storescu; returns its SOP Instance UID."""
    path = make_small_study(folder, 1, prefix=prefix)[0]
    result = router.send([path])
    assert result.returncode == 0, result.stderr
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- malformed datasets ----------------------------------------------------------


def _corruptions(ds: Dataset) -> dict[str, bytes]:
    body = dataset_body(ds)
    # The first element is (0008,0005) SpecificCharacterSet, "CS": replace its VR.
    assert body[:6] == b"\x08\x00\x05\x00CS"
    bad_vr = body[:4] + b"ZZ" + body[6:]
    # An undefined-length sequence whose "items" are garbage.
    bad_sequence = (
        struct.pack("<HH", 0x0008, 0x1115)
        + b"SQ\x00\x00"
        + struct.pack("<I", 0xFFFFFFFF)
        + b"\x01\x02\x03\x04garbage!" * 16
    )
    return {"unknown VR": bad_vr, "garbage sequence item": bad_sequence}


def test_malformed_dataset_is_refused_with_c000(tmp_path: Path, pacs: Any) -> None:
    ds = template(tmp_path / "tpl")
    bad = {
        name: part10(tmp_path / "bad" / f"{i}.dcm", body, generate_uid())
        for i, (name, body) in enumerate(_corruptions(ds).items())
    }
    with RouterProcess(tmp_path / "router", route_config(pacs)) as router:
        statuses = dict(zip(bad, c_store(router.port, list(bad.values())), strict=True))
        assert statuses == dict.fromkeys(bad, CANNOT_UNDERSTAND), router.log()[-2000:]
        good = send_valid(router, tmp_path / "good")
        wait_until(lambda: received_uids(pacs) == [good], 30, message="valid instance routed")
        jobs = router.wait_jobs(all_settled, 30)
        assert [j["resource_uid"] for j in jobs] == [good]
        assert list(indexed(router)) == [good]
        assert len(stored_files(router)) == 1
        assert router.files_under("tmp") == []


def test_garbage_and_truncated_dataset_is_c000(tmp_path: Path) -> None:
    ds = template(tmp_path / "tpl")
    body = dataset_body(ds)
    cut = body.find(str(ds.SOPInstanceUID).encode()) + 5  # inside SOPInstanceUID's value
    files = [
        part10(tmp_path / "bad" / "ff.dcm", b"\xff" * 4096, generate_uid()),
        part10(tmp_path / "bad" / "cut.dcm", body[:cut], str(ds.SOPInstanceUID)),
    ]
    with RouterProcess(tmp_path / "router", {}) as router:
        statuses = c_store(router.port, files)
        assert indexed(router) == {}
    assert statuses == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND]


# -- invalid UIDs ----------------------------------------------------------

_BAD_UIDS = ["../../etc/passwd", "1.2.3/../../x", "1." + "2" * 70, ""]


def _walk(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def test_invalid_uids_are_refused_with_c001_and_never_touch_the_disk(
    tmp_path: Path, pacs: Any
) -> None:
    ds = template(tmp_path / "tpl")
    files: list[tuple[str, Path]] = []
    for i, bad in enumerate(_BAD_UIDS):
        # Bad SOPInstanceUID, in the dataset and (when not empty) in the request too.
        sop = with_values(ds, SOPInstanceUID=bad)
        # pynetdicom cannot put an empty or over-long UID in the command set: the
        # request then names a valid UID and only the dataset carries the bad one.
        affected = bad if bad and len(bad) <= 64 else generate_uid()
        files.append(
            (
                f"SOPInstanceUID={bad!r}",
                part10(tmp_path / "bad" / f"sop{i}.dcm", dataset_body(sop), affected),
            )
        )
        # Bad StudyInstanceUID with a valid SOP Instance UID.
        study = with_values(ds, SOPInstanceUID=generate_uid(), StudyInstanceUID=bad)
        files.append(
            (
                f"StudyInstanceUID={bad!r}",
                part10(
                    tmp_path / "bad" / f"study{i}.dcm",
                    dataset_body(study),
                    str(study.SOPInstanceUID),
                ),
            )
        )
    outside_before = _walk(tmp_path)
    with RouterProcess(tmp_path / "router", route_config(pacs)) as router:
        before = _walk(tmp_path)
        statuses = dict(
            zip([n for n, _ in files], c_store(router.port, [p for _, p in files]), strict=True)
        )
        assert statuses == dict.fromkeys(statuses, INVALID_UID), router.log()[-3000:]
        assert indexed(router) == {}
        assert stored_files(router) == []
        # Nothing was created anywhere, in storage or around it, but the router's own
        # log, index and metrics files (a refusal is counted).
        created = {p for p in _walk(tmp_path) - before if p.name not in ("router.log",)}
        created = {
            p
            for p in created
            if not p.name.startswith("index.sqlite")
            and router.storage / "tmp" not in p.parents
            and router.storage / ".metrics" not in p.parents
        }
        assert created == set()
        assert not Path("/etc/passwd.dcm").exists()
        assert router.files_under("tmp") == []
        # Still up and routing.
        good = send_valid(router, tmp_path / "good")
        wait_until(lambda: received_uids(pacs) == [good], 30, message="valid instance routed")
    assert outside_before <= _walk(tmp_path)


def test_sop_instance_uid_differs_from_request_c002(tmp_path: Path) -> None:
    ds = template(tmp_path / "tpl")
    mismatched = part10(tmp_path / "bad" / "mismatch.dcm", dataset_body(ds), generate_uid())
    with RouterProcess(tmp_path / "router", {}) as router:
        assert c_store(router.port, [mismatched]) == [UID_MISMATCH]
        assert indexed(router) == {}
        assert stored_files(router) == []
        # The same bytes with a matching request are fine.
        matching = part10(tmp_path / "ok" / "ok.dcm", dataset_body(ds), str(ds.SOPInstanceUID))
        assert c_store(router.port, [matching]) == [SUCCESS]
        assert list(indexed(router)) == [str(ds.SOPInstanceUID)]


# -- who may connect ----------------------------------------------------------


def test_unknown_calling_and_wrong_called_ae_are_rejected(tmp_path: Path, dcmtk: None) -> None:
    files = make_small_study(tmp_path / "in", 2)
    config = {"dicom": {"allowed_callers": ["CT1"]}}
    router = start_without_echo(RouterProcess(tmp_path / "router", config))
    try:
        stranger = router.send(files[:1], calling="INTRUDER")
        assert stranger.returncode != 0, stranger.stdout + stranger.stderr
        assert associate_status(router.port, "INTRUDER") == "rejected"
        wrong_called = subprocess.run(
            [*_storescu(router.port, "CT1", "NOTME"), str(files[0])],
            capture_output=True,
            text=True,
            timeout=60,
            env=_dcmtk_env(),
        )
        assert wrong_called.returncode != 0
        assert associate_status(router.port, "CT1", called="NOTME") == "rejected"
        assert indexed(router) == {}
        # The allowed caller is still served.
        ok = router.send(files, calling="CT1")
        assert ok.returncode == 0, ok.stderr
        assert associate_status(router.port, "CT1") == "established"
        assert len(indexed(router)) == 2
        assert "INTRUDER" in router.log()
    finally:
        assert router.stop() == 0


def _storescu(port: int, calling: str, called: str) -> list[str]:
    from tests.support.dcmtk import dcmtk_tool

    return [dcmtk_tool("storescu"), "-aet", calling, "-aec", called, HOST, str(port)]


def _dcmtk_env() -> dict[str, str]:
    from tests.support.dcmtk import dcmtk_env

    return dcmtk_env()


def test_allowed_networks_refuse_loopback(tmp_path: Path, dcmtk: None) -> None:
    files = make_small_study(tmp_path / "in", 1)
    port = free_port()
    config = {"dicom": {"port": port, "allowed_networks": ["10.0.0.0/8"]}}
    router = start_without_echo(RouterProcess(tmp_path / "router", config))
    try:
        refused = router.send(files)
        assert refused.returncode != 0
        assert associate_status(port, "STORESCU") != "established"
        assert "not in dicom.allowed_networks" in router.log()
        assert indexed(router) == {}
        assert router.process.poll() is None
    finally:
        assert router.stop() == 0
    # The same router without the restriction serves the same caller.
    del config["dicom"]["allowed_networks"]
    with RouterProcess(tmp_path / "router2", config) as open_router:
        assert open_router.send(files).returncode == 0
        assert len(indexed(open_router)) == 1


# -- duplicates ----------------------------------------------------------


@pytest.mark.parametrize("policy", ["overwrite", "ignore"])
def test_duplicate_sop_instance_uid(tmp_path: Path, pacs: Any, policy: str) -> None:
    first = make_small_study(tmp_path / "in", 1)[0]
    ds = dcmread(first)
    uid = str(ds.SOPInstanceUID)
    ds.StudyDescription = "SECOND COPY"
    second = tmp_path / "second.dcm"
    ds.save_as(second, enforce_file_format=True)
    config = route_config(pacs, storage={"on_duplicate": policy})
    with RouterProcess(tmp_path / "router", config) as router:
        assert router.send([first]).returncode == 0
        wait_until(lambda: len(pacs.received_files()) == 1, 30, message="first delivery")
        router.wait_jobs(all_settled, 30)
        result = router.send([second])
        assert result.returncode == 0, result.stderr
        stored = router.storage / "objects" / indexed(router)[uid]
        if policy == "overwrite":
            wait_until(lambda: stores(pacs) == 2, 30, message="second delivery")
            jobs = router.wait_jobs(lambda js: len(js) == 2 and all_settled(js), 30)
            assert [j["state"] for j in jobs] == ["completed", "completed"]
            assert dcmread(stored).StudyDescription == "SECOND COPY"
            # storescp keeps one file per UID: the latest copy is the second one.
            assert dcmread(pacs.received_files()[0]).StudyDescription == "SECOND COPY"
        else:
            time.sleep(3)  # give a wrongful second delivery the time to happen
            jobs = router.jobs()
            assert len(jobs) == 1 and jobs[0]["state"] == "completed"
            assert dcmread(stored).StudyDescription == "SYNTHETIC STUDY"
            assert dcmread(pacs.received_files()[0]).StudyDescription == "SYNTHETIC STUDY"
            assert stores(pacs) == 1
        assert list(indexed(router)) == [uid]


# -- full disk ----------------------------------------------------------


def test_full_disk_answers_a700_and_stores_nothing(tmp_path: Path, pacs: Any) -> None:
    files = make_small_study(tmp_path / "in", 2)
    huge = 1 << 60  # an exabyte: more than any test machine has free
    config = route_config(pacs, storage={"min_free_space": huge})
    with RouterProcess(tmp_path / "router", config) as router:
        statuses = c_store(router.port, files)
        assert statuses == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
        result = router.send(files[:1])
        assert "0xa700" in (result.stdout + result.stderr).lower() or result.returncode != 0
        assert indexed(router) == {}
        assert stored_files(router) == []
        assert router.files_under("tmp") == []
        assert router.jobs() == []
        assert pacs.received_files() == []


# -- bad configuration files ----------------------------------------------------------


def _base_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "dicom": {"port": free_port()},
        "storage": {"path": str(tmp_path / "data")},
        "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": 11113}},
        "routes": [{"name": "all", "to": ["pacs"]}],
    }


def _bad_configs() -> Iterator[Any]:
    def case(name: str, mutate: Any, *expected: str) -> Any:
        return pytest.param(mutate, expected, id=name)

    def unknown_top(c: dict[str, Any]) -> None:
        c["bogus_section"] = 1

    def port_range(c: dict[str, Any]) -> None:
        c["dicom"]["port"] = 70000

    def missing_port(c: dict[str, Any]) -> None:
        del c["destinations"]["pacs"]["port"]

    def unknown_dest(c: dict[str, Any]) -> None:
        c["routes"][0]["to"] = ["nope"]

    def typo_keyword(c: dict[str, Any]) -> None:
        c["routes"][0]["when"] = {"Modaltiy": "CT"}

    def bad_window(c: dict[str, Any]) -> None:
        c["destinations"]["pacs"]["send_window"] = "25:00-07:00"

    def parsecs(c: dict[str, Any]) -> None:
        c["destinations"]["pacs"]["retry"] = {"initial_delay": "10 parsecs"}

    yield case("unknown-top-level-key", unknown_top, "bogus_section", "unknown key")
    yield case("port-out-of-range", port_range, "dicom.port")
    yield case("destination-port-missing", missing_port, "destinations.pacs.port", "missing")
    yield case("unknown-destination", unknown_dest, "routes[0] (all).to[0]", "nope")
    yield case("misspelled-keyword", typo_keyword, "routes[0]", "when.Modaltiy", "Modality")
    yield case("invalid-send-window", bad_window, "destinations.pacs.send_window")
    yield case("invalid-duration", parsecs, "destinations.pacs.retry.initial_delay", "parsecs")


def _serve(
    config_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "COLUMNS": "400", **(env or {})}
    try:
        return subprocess.run(
            [sys.executable, "-m", "dicomrouter", "serve", "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=environ,
        )
    except subprocess.TimeoutExpired as exc:  # it started: the config was accepted
        raise AssertionError(f"serve accepted {config_path} and kept running") from exc


@pytest.mark.parametrize(("mutate", "expected"), list(_bad_configs()))
def test_bad_config_exits_2_naming_the_key(
    tmp_path: Path, mutate: Any, expected: tuple[str, ...]
) -> None:
    config = _base_config(tmp_path)
    mutate(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = _serve(path)
    stderr = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stdout + result.stderr
    for text in expected:
        assert text in stderr, stderr
    assert "Traceback" not in result.stderr


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "ae_title: ROUTER\ndicom:\n  port: 11112\n  allowed_callers: [CT1\nlog_level: INFO\n"
    )
    result = _serve(path)
    stderr = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "YAML syntax error" in stderr
    assert "line 5" in stderr or "line 4" in stderr, stderr
    assert "Traceback" not in result.stderr


def test_env_override_error_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(_base_config(tmp_path)))
    result = _serve(path, {"DICOMROUTER_DICOM__PORT": "abc"})
    stderr = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "dicom.port" in stderr, stderr
    assert "Traceback" not in result.stderr
