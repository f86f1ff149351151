"""``/api/v1/routes``: counters, history, the uploaded-file dry run and the backtest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dicomrouter.store import audit
from dicomrouter.store.schema import instances
from tests.support.api import ApiEnv, api_env
from tests.support.history import DEST, plan, receive, settle
from tests.support.synth import make_study

DAY = 86400.0
CONFIG: dict[str, Any] = {
    "destinations": {"pacs": DEST, "ai": {**DEST, "ae_title": "AI", "port": 4243}},
    "routes": [
        {"name": "ct-to-pacs", "when": {"Modality": "CT"}, "to": ["pacs"]},
        {
            "name": "mr-from-mr1",
            "when": {"Modality": "MR", "CallingAETitle": "MR1"},
            "to": ["ai", "pacs"],
        },
        {"name": "off", "enabled": False, "to": ["ai"]},
    ],
}


def env_with(tmp_path: Path) -> ApiEnv:
    return api_env(tmp_path, dict(CONFIG))


def indexed(env: ApiEnv) -> int:
    with env.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(instances)).scalar_one())


def test_roles(tmp_path: Path) -> None:
    env = env_with(tmp_path)
    backtest = {"route": {"to": ["pacs"]}, "days": 1}
    assert env.anonymous.get("/api/v1/routes").status_code == 401
    assert env.anonymous.get("/api/v1/routes/ct-to-pacs").status_code == 401
    assert env.viewer.get("/api/v1/routes").status_code == 200
    assert env.viewer.get("/api/v1/routes/ct-to-pacs").status_code == 200
    for path in ("/api/v1/routes/test", "/api/v1/routes/backtest"):
        assert env.anonymous.post(path, json=backtest).status_code == 401
        assert env.viewer.post(path, json=backtest).status_code == 403
        assert env.operator.post(path, json=backtest).status_code == 200
        assert env.admin.post(path, json=backtest).status_code == 200
    upload = {"files": ("x.dcm", b"not dicom", "application/dicom")}
    assert env.viewer.post("/api/v1/routes/test", files=upload).status_code == 403


def test_counters_rules_as_text_and_history(tmp_path: Path) -> None:
    env = env_with(tmp_path)
    ct = make_study(tmp_path / "ct", 3, modality="CT", patient_name="DOE^JOHN", prefix="C")
    receive(env, ct, calling_ae="CT1")
    plan(env)
    settle(env, "pacs")

    routes = {r["name"]: r for r in env.viewer.get("/api/v1/routes").json()["items"]}
    assert list(routes) == ["ct-to-pacs", "mr-from-mr1", "off"]  # file order
    ct_route = routes["ct-to-pacs"]
    assert ct_route["description"] == "Modality = CT"
    assert (ct_route["matched_instances"], ct_route["matched_last_24h"]) == (3, 3)
    assert ct_route["last_matched_at"] > time.time() - 60
    assert ct_route["jobs"] == {"completed": 3}
    assert (ct_route["trigger"], ct_route["forward"], ct_route["to"]) == (
        "instance",
        "instance",
        ["pacs"],
    )
    mr_route = routes["mr-from-mr1"]
    assert mr_route["description"] == "Modality = MR and CallingAETitle = MR1"
    assert (mr_route["matched_instances"], mr_route["last_matched_at"], mr_route["jobs"]) == (
        0,
        None,
        {},
    )
    assert routes["off"]["enabled"] is False and routes["off"]["description"] == "always"

    detail = env.viewer.get("/api/v1/routes/ct-to-pacs").json()
    assert detail["configured"] is True and detail["matched_instances"] == 3
    [entry] = detail["history"]
    assert entry["patient_name"] == "DOE^JOHN" and entry["matched_instances"] == 3
    assert env.viewer.get("/api/v1/routes/nope").status_code == 404


def test_a_removed_route_keeps_its_history(tmp_path: Path) -> None:
    env = env_with(tmp_path)
    receive(env, make_study(tmp_path / "ct", 1, modality="CT"))
    plan(env)
    env.ctx.config = env.ctx.config.model_copy(update={"routes": env.ctx.config.routes[1:]})
    detail = env.viewer.get("/api/v1/routes/ct-to-pacs").json()
    assert detail["configured"] is False and len(detail["history"]) == 1


def test_uploaded_files_dry_run(tmp_path: Path) -> None:
    env = env_with(tmp_path)
    [ct] = make_study(tmp_path / "up", 1, modality="CT", prefix="C")
    [mr] = make_study(tmp_path / "up", 1, modality="MR", prefix="M")
    files = [
        ("files", ("ct.dcm", ct.read_bytes(), "application/dicom")),
        ("files", ("mr.dcm", mr.read_bytes(), "application/dicom")),
        ("files", ("notes.txt", b"hello, not DICOM", "text/plain")),
    ]
    response = env.operator.post("/api/v1/routes/test", files=files, data={"calling_ae": "MR1"})
    assert response.status_code == 200, response.text
    report = {entry["file"]: entry for entry in response.json()["files"]}
    assert report["ct.dcm"]["destinations"] == ["pacs"]
    assert report["mr.dcm"]["destinations"] == ["ai", "pacs"]
    mr_routes = {r["name"]: r for r in report["mr.dcm"]["routes"]}
    assert mr_routes["mr-from-mr1"]["matched"] is True
    assert "CallingAETitle 'MR1'" in mr_routes["mr-from-mr1"]["explanation"]
    assert mr_routes["ct-to-pacs"] == {
        "name": "ct-to-pacs",
        "matched": False,
        "trigger": "instance",
        "forward": "instance",
        "destinations": [],
        "explanation": "Modality 'MR' does not equal 'CT'",
    }
    assert "off" not in mr_routes  # disabled routes never fire
    assert "not a readable DICOM file" in report["notes.txt"]["error"]

    # The pretended sender matters: the same MR from another AE goes nowhere.
    again = env.operator.post("/api/v1/routes/test", files=files[1:2]).json()["files"][0]
    assert again["destinations"] == []
    # A dry run stores and routes nothing, and leaves nothing in the store's tmp.
    assert indexed(env) == 0 and not any(env.store.tmp.iterdir())
    total, entries = audit.query(env.engine, action="route.test")
    assert total == 2 and entries[-1]["actor"] == "operator-token"


def test_dry_run_rejects_empty_or_wrong_requests(tmp_path: Path) -> None:
    env = env_with(tmp_path)
    assert env.operator.post("/api/v1/routes/test", data={"calling_ae": "X"}).status_code in (
        415,
        422,
    )
    no_files = env.operator.post(
        "/api/v1/routes/test", files={"other": ("a", b"x")}, data={"calling_ae": "X"}
    )
    assert no_files.status_code == 422
    assert env.operator.post("/api/v1/routes/test", content=b"x").status_code == 415


def seed_history(env: ApiEnv, tmp_path: Path) -> dict[str, str]:
    """A CT study 10 days old, a CT study of yesterday and an MR study of today."""
    from pydicom import dcmread

    now = time.time()
    made = {
        "old-ct": (make_study(tmp_path / "a", 2, modality="CT", prefix="A"), now - 10 * DAY),
        "new-ct": (make_study(tmp_path / "b", 3, modality="CT", prefix="B"), now - DAY),
        "mr": (make_study(tmp_path / "c", 2, modality="MR", prefix="M"), now - 60),
    }
    uids = {}
    for name, (files, at) in made.items():
        receive(env, files, received_at=at)
        uids[name] = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    return uids


def test_backtest_finds_the_studies_a_candidate_would_have_matched(tmp_path: Path) -> None:
    env = env_with(tmp_path)
    uids = seed_history(env, tmp_path)
    candidate = {"name": "ct-research", "when": {"Modality": "CT"}, "to": ["ai"]}

    week = env.operator.post("/api/v1/routes/backtest", json={"route": candidate, "days": 7})
    assert week.status_code == 200, week.text
    result = week.json()
    assert [s["study_instance_uid"] for s in result["matched_studies"]] == [uids["new-ct"]]
    [study] = result["matched_studies"]
    assert study["instances"] == 3 and study["reason"] == "Modality 'CT' equals 'CT'"
    # The MR study was evaluated instance by instance; the CT one stopped at its match.
    assert (result["evaluated_studies"], result["evaluated_instances"]) == (2, 3)
    assert result["truncated"] is False and result["description"] == "Modality = CT"

    month = env.operator.post("/api/v1/routes/test", json={"route": candidate, "days": 30})
    assert [s["study_instance_uid"] for s in month.json()["matched_studies"]] == [
        uids["new-ct"],
        uids["old-ct"],
    ]

    bounded = env.operator.post(
        "/api/v1/routes/backtest", json={"route": candidate, "days": 30, "limit": 3}
    ).json()
    # Newest first: 2 MR instances, then 1 of the new CT study (which then matched);
    # the old CT study was left out, and the answer says so.
    assert bounded["truncated"] is True and bounded["evaluated_instances"] == 3
    assert [s["study_instance_uid"] for s in bounded["matched_studies"]] == [uids["new-ct"]]
    total, _ = audit.query(env.engine, action="route.backtest")
    assert total == 3


def test_an_invalid_candidate_is_422_with_the_key_path(tmp_path: Path) -> None:
    env = env_with(tmp_path)

    def errors(route: Any) -> list[str]:
        response = env.operator.post("/api/v1/routes/backtest", json={"route": route, "days": 1})
        assert response.status_code == 422, response.text
        return response.json()["detail"]["errors"]  # type: ignore[no-any-return]

    [error] = errors({"when": {"Modalty": "CT"}, "to": ["pacs"]})
    assert error.startswith("route.when.Modalty:") and "Modality" in error
    [error] = errors({"when": {"Modality": "CT"}, "to": ["nowhere"]})
    assert error.startswith("route.to[0]: unknown destination 'nowhere'")
    assert any(e.startswith("route.forward:") for e in errors({"forward": "x", "to": ["ai"]}))
    assert any(e.startswith("route.to:") for e in errors({"when": {"Modality": "CT"}}))
    # Out-of-range parameters and broken JSON are ordinary validation errors.
    body = {"route": {"to": ["ai"]}, "days": 0}
    assert env.operator.post("/api/v1/routes/backtest", json=body).status_code == 422
    assert env.operator.post("/api/v1/routes/test", json=body).status_code == 422
    broken = env.operator.post(
        "/api/v1/routes/test", content=b"{", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422


def test_uploads_are_refused_by_size_before_they_are_read() -> None:
    import asyncio

    from fastapi import HTTPException
    from starlette.requests import Request

    from dicomrouter.edge.uploads import uploaded_files

    def request(headers: list[tuple[bytes, bytes]]) -> Request:
        async def receive() -> dict[str, object]:
            raise AssertionError("the body must not be read")

        return Request({"type": "http", "method": "POST", "headers": headers}, receive)

    async def attempt(headers: list[tuple[bytes, bytes]]) -> int:
        try:
            async with uploaded_files(request(headers), max_files=5, max_bytes=1000):
                return 200
        except HTTPException as exc:
            return exc.status_code

    type_ = (b"content-type", b"multipart/form-data; boundary=x")
    assert asyncio.run(attempt([type_, (b"content-length", b"1001")])) == 413
    assert asyncio.run(attempt([type_])) == 411
