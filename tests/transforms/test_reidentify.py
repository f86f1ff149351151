"""The re-identification mapping: what a deidentify step with ``mapping`` records,
how the dispatch side commits it, how ``control.reidentify`` reads it back.

The contract (issue 12): off by default; encrypted at rest (the original is nowhere
in the index file's bytes); idempotent; nothing is sent unrecorded (a missing key or
a failed commit makes the delivery wait); readable only by admin, every read
audited without the decrypted value; another key gives a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import Engine, text

from dicomrouter.config import RouterConfig, parse_config
from dicomrouter.control import reidentify as control
from dicomrouter.control.errors import Forbidden, NotFound, Unavailable
from dicomrouter.destinations.outgoing import OutgoingInstance, prepared
from dicomrouter.destinations.status import Outcome
from dicomrouter.dispatch.transforming import Transforms, preparer
from dicomrouter.queue import QueuedInstance
from dicomrouter.security import Principal, Role
from dicomrouter.store import audit, create_index_engine
from dicomrouter.store import pseudonyms as rows
from dicomrouter.transforms import MappingRecord, ObjectContext, TransformUnavailable
from dicomrouter.transforms.lint import lint_pipelines
from dicomrouter.transforms.mapping import MappingKey, MappingKeyError
from tests.support.synth import make_study
from tests.transforms.helpers import pipeline

SECRET = "a test secret, long enough to key an HMAC"
KEY = "another secret for the mapping key, 32+ chars"
ENV = {"DEID_SECRET": SECRET, "REID_KEY": KEY}
PATIENT_ID = "PHI-PATIENT-7391"
PATIENT_NAME = "Zyxwvut^Qponmlk"
STEP = {
    "deidentify": {
        "secret_env": "DEID_SECRET",
        "options": ["retain_longitudinal_modified_dates"],
        "mapping": {"key_env": "REID_KEY"},
    }
}
ADMIN = Principal("alice", Role.admin, "user")


def config_for(tmp_path: Path, step: dict[str, Any] | None = None) -> RouterConfig:
    return parse_config(
        {
            "storage": {"path": str(tmp_path / "data")},
            "transforms": {"research": [step or STEP]},
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
            "routes": [{"name": "all", "to": ["pacs"], "transform": "research"}],
        },
        environ={},
    )


class Ctx:
    def __init__(self, config: RouterConfig, engine: Engine) -> None:
        self.config, self.engine, self.reader = config, engine, engine


def _index(tmp_path: Path) -> Engine:
    """The index of ``config_for(tmp_path)`` (SQLite or PostgreSQL: conftest.py)."""
    config = config_for(tmp_path)
    config.storage.path.mkdir(parents=True, exist_ok=True)
    return create_index_engine(config.database_url)


def deidentified(tmp_path: Path, n: int = 2, env: dict[str, str] = ENV) -> tuple[Engine, Any]:
    """``n`` instances of one study through the pipeline, as the dispatch worker does
    it; returns the index and the transformed copies' data sets."""
    files = make_study(
        tmp_path / "in", n, patient_id=PATIENT_ID, patient_name=PATIENT_NAME, series_count=1
    )
    engine = _index(tmp_path)
    transforms = Transforms(config_for(tmp_path), engine, tmp_path / "outgoing", environ=env)
    transforms.prepare_workdir()
    chain = transforms.chain("research", None)
    assert not isinstance(chain, str)
    copies = []
    for path in files:
        prepare = preparer(chain, _item(), path, transforms.workdir, transforms.recorder)
        assert prepare is not None
        prepared_file = prepare()
        copies.append(dcmread(prepared_file.path))
        prepared_file.path.unlink()
    return engine, copies


def _item() -> QueuedInstance:
    return QueuedInstance(
        job_id=1,
        instance_id=1,
        path="",
        sop_class_uid="",
        sop_instance_uid="",
        transfer_syntax_uid="",
        transform="research",
        calling_ae="CT1",
        called_ae="ROUTER",
        source_address="127.0.0.1",
    )


def test_off_by_default_nothing_is_reported(tmp_path: Path) -> None:
    seen: list[MappingRecord] = []
    p = pipeline([{"deidentify": {"secret_env": "DEID_SECRET"}}], ENV)
    files = make_study(tmp_path, 1)
    p.apply(dcmread(files[0]), ObjectContext(record=seen.append))
    assert seen == []


def test_the_step_reports_patient_offset_and_uids_sealed(tmp_path: Path) -> None:
    seen: list[MappingRecord] = []
    p = pipeline([STEP], ENV, name="research")
    ds = dcmread(make_study(tmp_path, 1, patient_id=PATIENT_ID)[0])
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    p.apply(ds, ObjectContext(record=seen.append))
    kinds = {r.kind: r for r in seen}
    assert set(kinds) == {"patient", "date_offset", "study", "series", "instance"}
    assert {r.pipeline for r in seen} == {"research"}
    assert kinds["patient"].pseudonym == ds.PatientID == kinds["date_offset"].pseudonym
    assert kinds["study"].pseudonym == ds.StudyInstanceUID
    assert kinds["instance"].pseudonym == ds.SOPInstanceUID
    key = MappingKey(KEY.encode())
    opened = key.open("research", "study", kinds["study"].pseudonym, kinds["study"].sealed)
    assert opened == {"uid": study}
    assert key.open("research", "series", ds.SeriesInstanceUID, kinds["series"].sealed) == {
        "uid": series
    }
    assert (
        key.open("research", "instance", ds.SOPInstanceUID, kinds["instance"].sealed)["uid"] == sop
    )
    for record in seen:  # nothing in clear but the pseudonym
        assert PATIENT_ID not in record.sealed and study not in record.sealed
    # A sealed original moved to another row does not open there.
    with pytest.raises(MappingKeyError):
        key.open("research", "series", kinds["study"].pseudonym, kinds["study"].sealed)


def test_a_missing_or_short_key_makes_the_step_unavailable(tmp_path: Path) -> None:
    ds = dcmread(make_study(tmp_path, 1)[0])
    for env in ({"DEID_SECRET": SECRET}, {"DEID_SECRET": SECRET, "REID_KEY": "tiny-key"}):
        with pytest.raises(TransformUnavailable, match="REID_KEY") as info:
            pipeline([STEP], env).apply(ds, ObjectContext())
        assert "tiny-key" not in str(info.value)  # never the value


def test_recording_is_idempotent_and_encrypted_at_rest(tmp_path: Path) -> None:
    engine, copies = deidentified(tmp_path, 3)
    # One patient, one offset, one study, one series, three instances.
    assert rows.count(engine) == 7
    # The same again, by a new recorder (another worker, after a restart): no new row.
    transforms = Transforms(config_for(tmp_path), engine, tmp_path / "out2", environ=ENV)
    records = []
    p = transforms.chain("research", None)
    assert not isinstance(p, str)
    for ds in [dcmread(f) for f in sorted((tmp_path / "in").glob("*.dcm"))]:
        p.pipelines[0].apply(ds, ObjectContext(record=records.append))
    transforms.recorder.commit(records)
    transforms.recorder.commit(records)
    assert rows.count(engine) == 7
    # What the index holds: its files on SQLite, every row of the mapping on both.
    with engine.connect() as conn:
        raw = repr(conn.execute(text("SELECT * FROM pseudonym_map")).all()).encode()
    engine.dispose()
    raw += b"".join(p.read_bytes() for p in (tmp_path / "data").glob("index.sqlite*"))
    originals = [dcmread(f) for f in sorted((tmp_path / "in").glob("*.dcm"))]
    assert raw  # the file is there
    for ds in originals:
        for value in (PATIENT_ID, "Zyxwvut", ds.StudyInstanceUID, ds.SOPInstanceUID):
            assert value.encode() not in raw, value
    assert copies[0].PatientID.encode() in raw  # the pseudonym is in clear


def test_a_failed_commit_sends_nothing_and_the_delivery_waits(tmp_path: Path) -> None:
    engine = _index(tmp_path)
    transforms = Transforms(config_for(tmp_path), engine, tmp_path / "outgoing", environ=ENV)
    transforms.prepare_workdir()
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE pseudonym_map"))
    chain = transforms.chain("research", None)
    assert not isinstance(chain, str)
    path = make_study(tmp_path / "in", 1)[0]
    inst = OutgoingInstance(
        1,
        path,
        "",
        "",
        "",
        prepare=preparer(chain, _item(), path, transforms.workdir, transforms.recorder),
    )
    with prepared(inst) as ready:
        assert not isinstance(ready, OutgoingInstance)
        assert ready.outcome is Outcome.TRANSIENT
        assert "re-identification mapping" in ready.message
    assert list(transforms.workdir.iterdir()) == []  # the copy is gone


def test_a_missing_key_makes_deliveries_wait(tmp_path: Path) -> None:
    engine = _index(tmp_path)
    env = {"DEID_SECRET": SECRET}
    transforms = Transforms(config_for(tmp_path), engine, tmp_path / "outgoing", environ=env)
    transforms.prepare_workdir()
    chain = transforms.chain("research", None)
    assert not isinstance(chain, str)
    path = make_study(tmp_path / "in", 1)[0]
    prepare = preparer(chain, _item(), path, transforms.workdir, transforms.recorder)
    with prepared(OutgoingInstance(1, path, "", "", "", prepare=prepare)) as ready:
        assert not isinstance(ready, OutgoingInstance)
        assert ready.outcome is Outcome.TRANSIENT and "REID_KEY" in ready.message
    assert rows.count(engine) == 0


def test_reidentify_by_pseudonym_is_admin_only_and_audited(tmp_path: Path) -> None:
    engine, copies = deidentified(tmp_path, 2)
    ctx = Ctx(config_for(tmp_path), engine)
    pseudonym = str(copies[0].PatientID)
    for role in (Role.viewer, Role.operator):
        with pytest.raises(Forbidden):
            control.reidentify(ctx, Principal("eve", role, "user"), pseudonym, environ=ENV)
    result = control.reidentify(ctx, ADMIN, pseudonym, source="10.0.0.1", environ=ENV)
    kinds = {e["kind"]: e for e in result["entries"]}
    assert set(kinds) == {"patient", "date_offset"} and result["count"] == 2
    assert kinds["patient"]["original"]["PatientID"] == PATIENT_ID
    assert kinds["patient"]["original"]["PatientName"] == PATIENT_NAME
    assert -3652 <= kinds["date_offset"]["original"]["days"] < 0
    uid = control.reidentify(ctx, ADMIN, str(copies[1].SOPInstanceUID), environ=ENV)
    assert uid["entries"][0]["kind"] == "instance"
    with pytest.raises(NotFound):
        control.reidentify(ctx, ADMIN, "NOPE", environ=ENV)
    _, entries = audit.query(engine, action="pseudonym.reidentify")
    assert [(e["actor"], e["outcome"]) for e in reversed(entries)] == [
        ("eve", "denied"),
        ("eve", "denied"),
        ("alice", "ok"),
        ("alice", "ok"),
        ("alice", "ok"),
    ]
    ok = entries[2]
    assert ok["target"] == pseudonym and ok["source"] == "10.0.0.1"
    assert ok["detail"] == {
        "kinds": ["date_offset", "patient"],
        "pipelines": ["research"],
        "results": 2,
    }
    assert entries[0]["detail"] == {"results": 0}
    assert all(PATIENT_ID not in str(e) and "Zyxwvut" not in str(e) for e in entries)


def test_reidentify_by_original(tmp_path: Path) -> None:
    engine, copies = deidentified(tmp_path, 1)
    ctx = Ctx(config_for(tmp_path), engine)
    result = control.reidentify_original(ctx, ADMIN, PATIENT_ID, environ=ENV)
    assert {e["pseudonym"] for e in result["entries"]} == {str(copies[0].PatientID)}
    study = dcmread(next((tmp_path / "in").glob("*.dcm"))).StudyInstanceUID
    result = control.reidentify_original(ctx, ADMIN, study, environ=ENV)
    assert [e["pseudonym"] for e in result["entries"]] == [str(copies[0].StudyInstanceUID)]
    with pytest.raises(NotFound):
        control.reidentify_original(ctx, ADMIN, PATIENT_ID, issuer="OTHER", environ=ENV)
    _, entries = audit.query(engine, action="pseudonym.reidentify")
    assert {e["target"] for e in entries} == {"by original"}
    assert all(PATIENT_ID not in str(e) and study not in str(e) for e in entries)


def test_another_key_gives_a_clear_error(tmp_path: Path) -> None:
    engine, copies = deidentified(tmp_path, 1)
    ctx = Ctx(config_for(tmp_path), engine)
    other = {"REID_KEY": "a different key, also long enough to use"}
    with pytest.raises(Unavailable, match="recorded under key id") as info:
        control.reidentify(ctx, ADMIN, str(copies[0].PatientID), environ=other)
    assert MappingKey(KEY.encode()).key_id in str(info.value)
    with pytest.raises(Unavailable, match="REID_KEY is missing"):
        control.reidentify(ctx, ADMIN, str(copies[0].PatientID), environ={})
    _, entries = audit.query(engine, action="pseudonym.reidentify")
    assert [e["outcome"] for e in entries] == ["failed", "failed"]


def test_check_warns_when_the_key_is_not_set(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    findings = lint_pipelines(config, {"DEID_SECRET": SECRET})
    assert any(
        f.severity == "warning" and f.where == "transforms.research[0].deidentify.mapping.key_env"
        for f in findings
    )
    assert not [f for f in lint_pipelines(config, ENV) if "key_env" in f.where]


def test_retention_keeps_the_mapping_and_purges_around_it(tmp_path: Path) -> None:
    from dicomrouter.control.retention import purge
    from dicomrouter.store import ObjectStore

    engine, _ = deidentified(tmp_path, 2)
    config = parse_config(
        {
            "storage": {"path": str(tmp_path / "data")},
            "retention": {"keep_history": "1h"},
        },
        environ={},
    )
    store = ObjectStore(config.storage.path, config.node.name)
    store.prepare()
    report = purge(config, engine, store, actor="test", source="test")
    assert report.purged == 0
    assert rows.count(engine) == 6
