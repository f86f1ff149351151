"""Hot reload with a real router: SIGHUP and PUT /api/v1/config.

Contract under test (issue 3): an invalid configuration never replaces a valid one
(the router keeps routing on the old one), and a valid one takes effect without
losing jobs: jobs queued for a destination that was unreachable before the reload
are all delivered after it, none twice; a new route and destination start at once.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import Engine, select

from dicomrouter.config import parse_config
from dicomrouter.control import versions
from dicomrouter.dispatch.service import Dispatcher
from dicomrouter.receive import Receiver
from dicomrouter.store import InstanceIndex, ObjectStore, audit, create_index_engine
from dicomrouter.store.schema import audit_log, jobs
from tests.support.api import TOKENS, auth_section
from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.router import RouterProcess, wait_until
from tests.support.synth import make_study

pytestmark = pytest.mark.interop

FAST_OUTAGE: dict[str, Any] = {
    "pause_after_failures": 2,
    "probe_interval": "1s",
    "retry": {"initial_delay": "1s", "max_delay": "2s", "max_attempts": 3},
}


def _dest(aet: str, port: int) -> dict[str, Any]:
    return {"ae_title": aet, "host": HOST, "port": port, **FAST_OUTAGE}


def _engine(router: RouterProcess) -> Engine:
    return create_index_engine(
        f"sqlite:///{router.storage / 'index.sqlite'}", create=False, writer=False
    )


def _audit(router: RouterProcess, action: str) -> list[tuple[str, str]]:
    with _engine(router).connect() as conn:
        rows = conn.execute(
            select(audit_log.c.outcome, audit_log.c.actor)
            .where(audit_log.c.action == action)
            .order_by(audit_log.c.id)
        ).all()
    return [(row.outcome, row.actor) for row in rows]


def _send(router: RouterProcess, files: list[Path]) -> None:
    result = router.send(files)
    assert result.returncode == 0, f"storescu failed:\n{result.stderr}\n{router.log()[-2000:]}"


def _by_destination(router: RouterProcess) -> dict[str, dict[str, int]]:
    """Jobs by destination and state, from the index (the CLI would read the file,
    which this test makes invalid on purpose)."""
    counts: dict[str, dict[str, int]] = {}
    with _engine(router).connect() as conn:
        for destination, state in conn.execute(select(jobs.c.destination, jobs.c.state)):
            states = counts.setdefault(destination, {})
            states[state] = states.get(state, 0) + 1
    return counts


def _wait_jobs(router: RouterProcess, expected: dict[str, dict[str, int]], timeout: float) -> None:
    """Until the jobs of the destinations in ``expected`` are exactly those."""

    def check() -> bool:
        counts = _by_destination(router)
        return all(counts.get(name) == states for name, states in expected.items())

    try:
        wait_until(check, timeout, interval=0.3, message=str(expected))
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; got {_by_destination(router)}\n{router.log()[-3000:]}"
        ) from None


def _rewrite(router: RouterProcess, config: dict[str, Any]) -> None:
    router.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def test_sighup_invalid_keeps_routing_valid_delivers_queued_jobs_once(
    tmp_path: Path, dcmtk: None
) -> None:
    dead_port = free_port()  # "broken" points here: nobody listens
    config: dict[str, Any] = {
        "destinations": {
            "pacs": {"ae_title": "PACS", "host": HOST, "port": 0},
            "broken": _dest("BROKEN", dead_port),
        },
        "routes": [
            {"name": "to-pacs", "to": ["pacs"]},
            {"name": "to-broken", "to": ["broken"]},
        ],
    }
    first, during, after = (
        make_study(tmp_path / "in", 8, prefix="a"),
        make_study(tmp_path / "in", 4, prefix="b"),
        make_study(tmp_path / "in", 3, prefix="c"),
    )
    with StoreSCP(free_port(), "PACS", tmp_path / "pacs") as pacs:
        config["destinations"]["pacs"]["port"] = pacs.port
        with RouterProcess(tmp_path / "router", config) as router:
            good = dict(router.config)
            _send(router, first)
            _wait_jobs(router, {"pacs": {"completed": 8}, "broken": {"pending": 8}}, 60)

            # An invalid file: refused with its key-path error, nothing changes.
            invalid = yaml.safe_load(yaml.safe_dump(good))
            invalid["routes"].append({"name": "bad", "to": ["nowhere"]})
            _rewrite(router, invalid)
            router.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(lambda: _audit(router, "config.reload"), 30, message="reload audited")
            assert _audit(router, "config.reload") == [("failed", "system")]
            assert "routes[2] (bad).to[0]: unknown destination 'nowhere'" in router.log()
            _send(router, during)  # still routed by the old configuration
            _wait_jobs(router, {"pacs": {"completed": 12}, "broken": {"pending": 12}}, 60)
            assert len(versions.list_versions(_engine(router))[1]) == 1

            # A valid file: broken is fixed (its peer is up now), a route is added.
            with (
                StoreSCP(free_port(), "BROKEN", tmp_path / "broken") as fixed,
                StoreSCP(free_port(), "EXTRA", tmp_path / "extra") as extra,
            ):
                valid = yaml.safe_load(yaml.safe_dump(good))
                valid["destinations"]["broken"]["port"] = fixed.port
                valid["destinations"]["extra"] = {
                    "ae_title": "EXTRA",
                    "host": HOST,
                    "port": extra.port,
                }
                valid["routes"].append({"name": "to-extra", "to": ["extra"]})
                _rewrite(router, valid)
                router.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
                _wait_jobs(router, {"broken": {"completed": 12}}, 60)
                _send(router, after)
                _wait_jobs(router, {"extra": {"completed": 3}, "broken": {"completed": 15}}, 60)
                queued = sop_uids(first + during)
                assert fixed.received_sops() == queued | sop_uids(after)
                assert fixed.store_requests() == len(queued) + len(after)  # none twice
                assert extra.received_sops() == sop_uids(after)
            assert pacs.received_sops() == sop_uids(first + during + after)
            assert pacs.store_requests() == 15
            listed = versions.list_versions(_engine(router))[1]
            assert [(v.source, v.author) for v in listed] == [
                ("sighup", "system"),
                ("startup", "system"),
            ]
            assert _audit(router, "config.reload") == [("failed", "system"), ("ok", "system")]
            assert "dispatch runs on configuration version 2" in router.log()
            assert "HTTP service runs on configuration version 2" in router.log()


def test_put_config_reloads_the_router_and_an_invalid_one_is_refused(
    tmp_path: Path, dcmtk: None
) -> None:
    config: dict[str, Any] = {
        "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": 0}},
        "routes": [{"name": "to-pacs", "to": ["pacs"]}],
        "auth": auth_section(),
    }
    with (
        StoreSCP(free_port(), "PACS", tmp_path / "pacs") as pacs,
        StoreSCP(free_port(), "AI", tmp_path / "ai") as ai,
    ):
        config["destinations"]["pacs"]["port"] = pacs.port
        with RouterProcess(tmp_path / "router", config) as router:
            client = httpx.Client(
                base_url=f"http://{HOST}:{router.config['http']['port']}",
                headers={"Authorization": f"Bearer {TOKENS['admin']}"},
                timeout=30,
            )

            def http_up() -> bool:
                try:
                    return client.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(http_up, 60, message="HTTP service")
            active = client.get("/api/v1/config").json()
            assert active["version"]["source"] == "startup"
            good = yaml.safe_load(active["yaml"])

            bad = client.put("/api/v1/config", json={"yaml": "routes: [{name: r, to: [x]}]"})
            assert bad.status_code == 422 and "unknown destination" in str(bad.json())
            assert yaml.safe_load(router.config_path.read_text()) == good

            new = yaml.safe_load(yaml.safe_dump(good))
            new["destinations"]["ai"] = {"ae_title": "AI", "host": HOST, "port": ai.port}
            new["routes"] = [{"name": "to-ai", "to": ["ai"]}]  # pacs no longer routed
            new["dicom"]["port"] = free_port()
            applied = client.put(
                "/api/v1/config",
                content=yaml.safe_dump(new, sort_keys=False),
                headers={"Content-Type": "application/yaml"},
            )
            assert applied.status_code == 200, applied.text
            assert applied.json()["restart_required"] == ["dicom.port"]
            wait_until(lambda: "dispatch runs on configuration version 2" in router.log(), 30)

            files = make_study(tmp_path / "in", 4)
            _send(router, files)  # the old port still listens until a restart
            _wait_jobs(router, {"ai": {"completed": 4}}, 60)
            assert set(_by_destination(router)) == {"ai"}
            assert ai.received_sops() == sop_uids(files) and pacs.store_requests() == 0
            assert client.get("/api/v1/config/versions").json()["versions"][0]["source"] == "api"
            assert ("ok", "admin-token") in _audit(router, "config.apply")
            assert ("ok", "system") in _audit(router, "config.reload")


def test_dispatcher_apply_replaces_removes_and_adds_destinations(tmp_path: Path) -> None:
    """In-process: a changed destination's workers are replaced, a removed one's stop,
    an added one's start; the planner routes with the new rules."""
    data: dict[str, Any] = {
        "node": {"name": "router-7"},
        "storage": {"path": str(tmp_path / "data")},
        "destinations": {"a": _dest("A", free_port()), "b": _dest("B", free_port())},
        "routes": [{"name": "r", "to": ["a", "b"]}],
        "dispatch": {"poll_interval": "20ms"},
    }
    config = parse_config(data, environ={})
    store = ObjectStore(config.storage.path, config.node.name)
    store.prepare()
    dispatcher = Dispatcher(config, create_index_engine(config.database_url), store)
    dispatcher.start()
    try:
        old_a = dispatcher.destinations["a"].workers
        data["destinations"]["a"]["port"] = free_port()
        del data["destinations"]["b"]
        data["destinations"]["c"] = _dest("C", free_port())
        data["routes"] = [{"name": "r2", "to": ["c"]}]
        new = parse_config(data, environ={})
        dispatcher.apply(new)
        # "a" is retired at once and restarted once its old workers left; idle workers
        # may leave before the next line runs, so only "b" is sure to be gone here.
        assert "b" not in dispatcher.destinations and "c" in dispatcher.destinations
        assert dispatcher.destinations.get("a") is None or (
            dispatcher.destinations["a"].workers is not old_a
        )
        wait_until(lambda: not any(w.is_alive() for w in old_a), 10, message="a retired")
        wait_until(lambda: "a" in dispatcher.destinations, 10, message="a restarted")
        assert not set(dispatcher.destinations["a"].workers) & set(old_a)
        assert dispatcher.destinations["a"].workers[0].dest.port == new.destinations["a"].port
        assert "b" not in dispatcher.destinations
        wait_until(lambda: [r.name for r in dispatcher.planner.routes] == ["r2"], 10)
        # Probes of a paused destination are leased under this node's name (shared
        # health: another node sees which node probes).
        health = dispatcher.destinations["c"].workers[0].health
        assert health.owner == f"router-7:{os.getpid()}"
    finally:
        dispatcher.stop()
    assert not any(t.is_alive() for t in dispatcher.threads)


def _echo(port: int, calling: str) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate(HOST, port, ae_title="DICOMROUTER")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_receiver_apply_and_rejections_are_audited(tmp_path: Path) -> None:
    data: dict[str, Any] = {
        "storage": {"path": str(tmp_path / "data")},
        "dicom": {"port": free_port(), "bind": HOST},
    }
    config = parse_config(data, environ={})
    store = ObjectStore(config.storage.path, config.node.name)
    store.prepare()
    engine = create_index_engine(config.database_url)
    receiver = Receiver(config, store, InstanceIndex(engine))
    saved_tempdir = tempfile.tempdir  # the receiver points tempfile at its tmp folder
    receiver.start()
    try:
        port = config.dicom.port
        assert _echo(port, "INTRUDER")
        data["dicom"]["allowed_callers"] = ["CT1"]
        receiver.apply(parse_config(data, environ={}))
        assert not _echo(port, "INTRUDER") and _echo(port, "CT1")
        data["dicom"]["allowed_networks"] = ["192.0.2.0/24"]
        receiver.apply(parse_config(data, environ={}))
        assert not _echo(port, "CT1")
        del data["dicom"]["allowed_networks"]
        receiver.apply(parse_config(data, environ={}))
        assert _echo(port, "CT1")
    finally:
        receiver.stop()  # waits for the audit writer
        tempfile.tempdir = saved_tempdir
    _, entries = audit.query(engine, action="dicom.association.rejected")
    assert [(e["actor"], e["source"], e["outcome"], e["detail"]["reason"]) for e in entries] == [
        ("?", HOST, "denied", "source address not in dicom.allowed_networks"),
        ("INTRUDER", HOST, "denied", "calling AE title not in dicom.allowed_callers"),
    ]


def test_rejection_audits_are_bounded(tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    """A flood of refused associations must not queue audit rows without limit."""
    from dicomrouter.receive import scp

    config = parse_config({"storage": {"path": str(tmp_path / "data")}}, environ={})
    store = ObjectStore(config.storage.path, config.node.name)
    store.prepare()
    engine = create_index_engine(config.database_url)
    receiver = Receiver(config, store, InstanceIndex(engine))
    monkeypatch.setattr(scp, "MAX_PENDING_AUDITS", 3)
    gate = threading.Event()
    # The first row blocks the single audit thread, so the queue fills up.
    receiver._auditor.submit(gate.wait, 30)
    receiver._audits_pending += 1  # that blocker counts as waiting too
    for n in range(10):
        receiver._audit_rejected(f"FLOOD{n}", "192.0.2.1", "calling AE title not allowed")
    # 2 queued; 8 dropped: the first is logged at once, the next 7 counted for the
    # next log line (at most one a minute).
    assert receiver._audits_pending == 3 and receiver._audits_dropped == 7
    assert "not audited: the audit queue is full" in caplog.text
    gate.set()
    receiver._auditor.shutdown(wait=True)
    total, _ = audit.query(engine, action="dicom.association.rejected")
    assert total == 2


def test_a_refused_file_still_converges_every_process_on_the_newest_version(
    tmp_path: Path, dcmtk: None
) -> None:
    """The HTTP process recorded version 2 (as PUT /api/v1/config does), then the file
    was edited into an invalid state before the node read it: the node refuses the
    file but still runs, and makes its children run, the newest recorded version."""
    files = make_study(tmp_path / "in", 2)
    with (
        StoreSCP(free_port(), "PACS", tmp_path / "pacs") as pacs,
        StoreSCP(free_port(), "EXTRA", tmp_path / "extra") as extra,
    ):
        config: dict[str, Any] = {
            "destinations": {"pacs": _dest("PACS", pacs.port)},
            "routes": [{"name": "to-pacs", "to": ["pacs"]}],
        }
        with RouterProcess(tmp_path / "router", config) as router:
            newer = yaml.safe_load(yaml.safe_dump(router.config))
            newer["destinations"]["extra"] = _dest("EXTRA", extra.port)
            newer["routes"].append({"name": "to-extra", "to": ["extra"]})
            text = yaml.safe_dump(newer, sort_keys=False)
            versions.record_version(_engine(router), text, author="admin", source="api")
            router.config_path.write_text("routes: [unclosed\n")
            router.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(
                lambda: "dispatch runs on configuration version 2" in router.log(),
                30,
                message="dispatch on version 2",
            )
            assert "running the newest recorded configuration, version 2" in router.log()
            assert _audit(router, "config.reload") == [("failed", "system")]
            _send(router, files)
            _wait_jobs(router, {"pacs": {"completed": 2}, "extra": {"completed": 2}}, 60)
            assert extra.received_sops() == sop_uids(files)
