"""Several nodes on one index and one storage folder: the node's name, its own
``tmp/`` and ``outgoing/``, the per-node storage lock, and two router processes
sharing a PostgreSQL index and a folder."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from dicomrouter import __version__
from dicomrouter.cli.main import app as cli
from dicomrouter.config import ConfigError, parse_config
from dicomrouter.control import nodes, versions
from dicomrouter.control.errors import Conflict
from dicomrouter.dispatch.worker import owner_prefix
from dicomrouter.store import ObjectStore, StorageError, audit, create_index_engine, heartbeat
from dicomrouter.store.schema import instances
from tests.support.api import ApiEnv, api_env
from tests.support.dcmtk import HOST
from tests.support.router import RouterProcess, wait_until
from tests.support.synth import make_study


def test_node_name_defaults_to_the_host_name_and_is_checked() -> None:
    assert parse_config({}, environ={}).node.name == os.uname().nodename
    assert parse_config({"node": {"name": "router-2.site_a"}}, environ={}).node.name == (
        "router-2.site_a"
    )
    env = {"DICOMROUTER_NODE__NAME": "from-env"}
    assert parse_config({}, environ=env).node.name == "from-env"
    for bad in ("a/b", "../x", "", ".hidden", "a:b", "x" * 65, "é"):
        with pytest.raises(ConfigError) as caught:
            parse_config({"node": {"name": bad}}, environ={})
        assert any(error.startswith("node.name:") for error in caught.value.errors), bad


def test_a_version_from_another_node_keeps_this_nodes_name() -> None:
    running = parse_config({"node": {"name": "alpha"}}, environ={})
    other = parse_config({"node": {"name": "beta"}, "log_level": "DEBUG"}, environ={})
    changed = versions.changed_keys(running, other)
    assert "node.name" in versions.restart_required(changed)
    effective = versions.effective(other, running)
    assert effective.node.name == "alpha" and effective.log_level == "DEBUG"


def test_lease_owners_start_with_the_node_name() -> None:
    assert owner_prefix(parse_config({"node": {"name": "n1"}}, environ={})) == "n1:"


def test_a_heartbeat_says_what_the_process_runs(tmp_path: Path, index_url: str) -> None:
    engine = create_index_engine(index_url)
    runs = {"version": 3, "open": 2}
    thread = heartbeat.HeartbeatThread(
        engine,
        "n1",
        heartbeat.RECEIVER,
        lambda: (True, "listening"),
        config_version=lambda: runs["version"],
        open_associations=lambda: runs["open"],
    )
    thread.beat_once()
    (row,) = heartbeat.read(engine, "n1")
    assert (row.software_version, row.config_version, row.open_associations) == (
        __version__,
        3,
        2,
    )
    runs.update(version=4, open=0)  # a new version loaded, the association closed
    thread.beat_once()
    (row,) = heartbeat.read(engine, "n1")
    assert (row.config_version, row.open_associations, row.ok) == (4, 0, True)
    engine.dispose()


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def test_each_node_sweeps_only_its_own_temporary_files(tmp_path: Path) -> None:
    a, b = ObjectStore(tmp_path, "a"), ObjectStore(tmp_path, "b")
    a.prepare()
    b.prepare()
    assert a.tmp == tmp_path / "tmp" / "a" and b.outgoing == tmp_path / "outgoing" / "b"
    assert a.objects == b.objects and a.trash == b.trash
    (a.tmp / "a.part").write_bytes(b"1")
    (b.tmp / "b.part").write_bytes(b"2")
    assert a.sweep_tmp() == 1
    assert _files(a.tmp) == set() and _files(b.tmp) == {"b.part"}


def test_loose_files_of_the_single_node_layout_go_at_the_first_start(tmp_path: Path) -> None:
    """Before node.name, partial files and outgoing copies lay directly in ``tmp/``
    and ``outgoing/``; no process of that release can run beside a node of this one
    (the lock), so they are leftovers."""
    for folder in ("tmp", "outgoing"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "old.part").write_bytes(b"x")
    store = ObjectStore(tmp_path, "n")
    store.prepare()
    assert store.sweep_tmp() == 2
    assert _files(tmp_path / "tmp") == _files(tmp_path / "outgoing") == set()


def test_every_nodes_stale_partial_files_go_with_the_orphan_scan(tmp_path: Path) -> None:
    """A node removed for good leaves its partial files; the purge's orphan scan
    removes those untouched for its grace period, fresh ones stay."""
    gone, here = ObjectStore(tmp_path, "gone"), ObjectStore(tmp_path, "here")
    gone.prepare()
    here.prepare()
    stale, fresh = gone.tmp / "stale.part", here.tmp / "fresh.part"
    stale.write_bytes(b"s")
    fresh.write_bytes(b"f")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert here.sweep_every_tmp(older_than=3600) == 1
    assert not stale.exists() and fresh.exists()


def test_two_nodes_share_a_folder_but_one_name_cannot_run_twice(tmp_path: Path) -> None:
    first, other = ObjectStore(tmp_path, "alpha"), ObjectStore(tmp_path, "beta")
    for store in (first, other):
        store.prepare()
        store.lock()
    again = ObjectStore(tmp_path, "alpha")
    with pytest.raises(StorageError, match=r"with node.name 'alpha' \(pid \d+\)"):
        again.lock()


def test_a_release_that_owns_the_whole_folder_and_a_node_refuse_each_other(
    tmp_path: Path,
) -> None:
    with open(tmp_path / ".lock", "a+") as old:  # what a release before node.name holds
        fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
        store = ObjectStore(tmp_path, "n")
        store.prepare()
        with pytest.raises(StorageError, match="owns the whole folder"):
            store.lock()
    store.lock()
    with open(tmp_path / ".lock", "a+") as old, pytest.raises(BlockingIOError):
        fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_two_routers_share_one_postgresql_index_and_one_folder(
    tmp_path: Path, postgres_url: str, dcmtk: None
) -> None:
    """Two nodes (node.name alpha and beta) on one storage folder and one index:
    both start, both receive from storescu into the shared objects/, each beats
    under its own name and keeps its partial files in its own tmp/."""
    shared = tmp_path / "shared"

    def node(name: str) -> RouterProcess:
        config = {
            "node": {"name": name},
            "database": postgres_url,
            "storage": {"path": str(shared)},
        }
        return RouterProcess(tmp_path / name, config)

    with node("alpha") as alpha, node("beta") as beta:
        for router in (alpha, beta):
            files = make_study(tmp_path / f"in-{router.config['node']['name']}", 3)
            result = router.send(files)
            assert result.returncode == 0, result.stderr + router.log()[-2000:]
        engine = create_index_engine(postgres_url, create=False)
        try:
            with engine.connect() as conn:
                paths = list(conn.execute(select(instances.c.path)).scalars())
            assert len(paths) == 6
            assert all((shared / "objects" / path).is_file() for path in paths)
            # Each node recorded its own file at start (alpha first: version 1, beta
            # version 2); alpha then runs the newest, 2, under its own name, and its
            # file, which names it, is not overwritten by beta's.
            expected = {
                (name, role): (__version__, 2)
                for name in ("alpha", "beta")
                for role in ("receiver", "dispatch")
            }

            def running() -> dict[tuple[str, str], tuple[str, int | None]]:
                beats = heartbeat.read(engine)
                return {(b.node, b.role): (b.software_version, b.config_version) for b in beats}

            wait_until(lambda: running() == expected, 30, message=f"{expected}")
            assert yaml.safe_load(alpha.config_path.read_text())["node"]["name"] == "alpha"
            # An association held open shows in alpha's receiver heartbeat.
            ae = AE(ae_title="HOLDER")
            ae.add_requested_context(Verification)
            assoc = ae.associate(HOST, alpha.port, ae_title=alpha.ae_title)
            assert assoc.is_established
            try:
                wait_until(lambda: _open(engine, "alpha") == 1, 20, message="1 open association")
            finally:
                assoc.release()
            wait_until(lambda: _open(engine, "alpha") == 0, 20, message="none open")
        finally:
            engine.dispose()
        assert {p.name for p in (shared / "tmp").iterdir()} == {"alpha", "beta"}
        assert {p.name for p in (shared / "nodes").iterdir()} == {"alpha.lock", "beta.lock"}


def _open(engine: Engine, node: str) -> int:
    (receiver,) = [b for b in heartbeat.read(engine, node) if b.role == heartbeat.RECEIVER]
    return receiver.open_associations


# -- the nodes view: control, API, CLI, dashboard, metrics ---------------------------------
def _beat(engine: Engine, node: str, age: float, version: int, associations: int = 0) -> None:
    """Both processes of ``node`` as if they last beat ``age`` seconds ago."""
    for role in heartbeat.REQUIRED_ROLES:
        heartbeat.beat(
            engine,
            node,
            role,
            time.time() - 3600,
            True,
            "",
            now=time.time() - age,
            config_version=version,
            open_associations=associations if role == heartbeat.RECEIVER else 0,
        )


def _cluster(tmp_path: Path) -> ApiEnv:
    """Node alpha up on version 2 (the newest) with 3 open associations; node beta
    down for a minute, on version 1."""
    env = api_env(tmp_path)
    for text in ("log_level: INFO\n", "log_level: DEBUG\n"):
        versions.record_version(env.engine, text, author="test", source="api")
    _beat(env.engine, "alpha", age=1, version=2, associations=3)
    _beat(env.engine, "beta", age=heartbeat.STALE_AFTER + 40, version=1)
    return env


def test_the_api_lists_every_node_up_or_down_and_forgets_only_a_down_one(
    tmp_path: Path,
) -> None:
    env = _cluster(tmp_path)
    answer = env.viewer.get("/api/v1/nodes")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["newest_config_version"] == 2
    nodes = {n["name"]: n for n in body["nodes"]}
    assert set(nodes) == {"alpha", "beta"}
    alpha, beta = nodes["alpha"], nodes["beta"]
    assert (alpha["state"], alpha["config_version"], alpha["behind"]) == ("up", 2, False)
    assert (beta["state"], beta["config_version"], beta["behind"]) == ("down", 1, True)
    assert alpha["open_associations"] == 3 and alpha["software_version"] == __version__
    assert beta["last_heartbeat_age_s"] > heartbeat.STALE_AFTER
    assert {p["role"] for p in alpha["processes"]} == {"receiver", "dispatch"}
    assert env.viewer.get("/api/v1/nodes/beta").json()["state"] == "down"
    assert env.viewer.get("/api/v1/nodes/gamma").status_code == 404

    assert env.viewer.delete("/api/v1/nodes/beta").status_code == 403
    refused = env.operator.delete("/api/v1/nodes/alpha")
    assert refused.status_code == 409 and "is up" in refused.json()["detail"]
    forgotten = env.operator.delete("/api/v1/nodes/beta")
    assert forgotten.status_code == 200 and forgotten.json()["name"] == "beta"
    assert [n["name"] for n in env.viewer.get("/api/v1/nodes").json()["nodes"]] == ["alpha"]
    [entry] = audit.query(env.engine, action="node.forget")[1]
    assert entry["target"] == "beta" and entry["actor"] == "operator-token"


def test_a_node_that_beats_again_is_up_again(tmp_path: Path) -> None:
    env = _cluster(tmp_path)
    _beat(env.engine, "beta", age=0, version=2)
    beta = nodes.get_node(env.engine, "beta")
    assert (beta.state, beta.behind) == ("up", False)
    with pytest.raises(Conflict):
        nodes.forget(env.engine, "beta", actor="someone")


def test_the_cli_lists_nodes_and_forgets_a_down_one(tmp_path: Path) -> None:
    env = _cluster(tmp_path)
    config = tmp_path / "dicomrouter.yaml"
    config.write_text(yaml.safe_dump({"storage": {"path": str(env.config.storage.path)}}))
    runner = CliRunner()
    listed = runner.invoke(cli, ["nodes", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    assert "alpha" in listed.output and "beta" in listed.output
    assert listed.output.count("DOWN") == 1 and listed.output.count("(behind)") == 1
    as_json = runner.invoke(cli, ["nodes", "--json", "--config", str(config)])
    states = {n["name"]: n["state"] for n in json.loads(as_json.output)["nodes"]}
    assert states == {"alpha": "up", "beta": "down"}
    refused = runner.invoke(cli, ["nodes", "forget", "alpha", "--config", str(config)])
    assert refused.exit_code == 1 and "is up" in refused.output
    done = runner.invoke(cli, ["nodes", "forget", "beta", "--config", str(config)])
    assert done.exit_code == 0, done.output
    listed = runner.invoke(cli, ["nodes", "list", "--json", "--config", str(config)])
    assert [n["name"] for n in json.loads(listed.output)["nodes"]] == ["alpha"]
    [entry] = audit.query(env.engine, action="node.forget")[1]
    assert entry["source"] == "cli" and entry["target"] == "beta"


def test_the_dashboard_shows_nodes_and_flags_a_down_or_older_one(tmp_path: Path) -> None:
    env = _cluster(tmp_path)
    overview = env.viewer.get("/")
    assert overview.status_code == 200
    assert "node beta is down: no heartbeat for" in overview.text
    assert "node beta runs configuration version 1, older than the newest (2)" in overview.text
    assert "node alpha" not in overview.text
    page = env.viewer.get("/nodes")
    assert page.status_code == 200 and "alpha" in page.text and "beta" in page.text
    assert "/forget" not in page.text  # a viewer gets no button
    page = env.operator.get("/nodes").text
    assert 'action="/nodes/beta/forget"' in page and 'action="/nodes/alpha/forget"' not in page
    same = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert env.operator.post("/nodes/beta/forget", headers=same).status_code == 200
    assert [n.name for n in nodes.list_nodes(env.engine).nodes] == ["alpha"]
    assert "node beta" not in env.viewer.get("/").text


def test_metrics_say_which_nodes_are_up(tmp_path: Path) -> None:
    env = _cluster(tmp_path)
    text = env.viewer.get("/metrics").text
    assert 'dicomrouter_node_up{node="alpha"} 1.0' in text
    assert 'dicomrouter_node_up{node="beta"} 0.0' in text
