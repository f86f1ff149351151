"""Routing loops at run time, with real routers and dcmtk peers (issue 9, "Loops").

- An instance is not sent back to the peer that sent it (its calling AE at that
  address), unless ``dispatch.send_back_to_sender``; the trace says why.
- Two routers that forward everything to each other: the copy that comes back is
  held (not forwarded again), counted in the status, alerted, and releasable; the
  queues stop growing instead of storming.
- A destination that is this router under another spelling of its address, applied
  live with SIGHUP, is refused and changes nothing.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import yaml

from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.router import RouterProcess, all_settled, wait_until
from tests.support.synth import make_study


def _rows(router: RouterProcess, query: str, *args: Any) -> list[tuple[Any, ...]]:
    index = router.storage / "index.sqlite"
    with sqlite3.connect(f"file:{index}?mode=ro", uri=True) as conn:
        return conn.execute(query, args).fetchall()


def _send(router: RouterProcess, files: list[Path], calling: str) -> None:
    result = router.send(files, calling=calling)
    assert result.returncode == 0, f"storescu failed:\n{result.stderr}\n{router.log()[-2000:]}"


def _cli_json(router: RouterProcess, *args: str) -> Any:
    result = router.cli(*args, "--config", str(router.config_path), "--json", check=True)
    return json.loads(result.stdout)


def _reload(router: RouterProcess, config: dict[str, Any]) -> None:
    versions = len(_rows(router, "SELECT id FROM config_versions"))
    router.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    router.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(
        lambda: len(_rows(router, "SELECT id FROM config_versions")) > versions,
        30,
        message="the new configuration recorded",
    )
    # Recorded by the node is not yet applied by the planner: wait for dispatch to
    # take it, or an instance sent right after may still be planned on the old one.
    version = max(row[0] for row in _rows(router, "SELECT id FROM config_versions"))
    wait_until(
        lambda: f"dispatch runs on configuration version {version}" in router.log(),
        30,
        message=f"dispatch on configuration version {version}",
    )


def test_an_instance_is_not_sent_back_to_the_peer_that_sent_it(tmp_path: Path, dcmtk: None) -> None:
    from_pacs = make_study(tmp_path / "in", 2, prefix="p")
    from_ct = make_study(tmp_path / "in", 2, prefix="c")
    with StoreSCP(free_port(), "PACS", tmp_path / "pacs") as pacs:
        config = {
            "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": pacs.port}},
            "routes": [{"name": "everything", "to": ["pacs"]}],
        }
        with RouterProcess(tmp_path / "router", config) as router:
            _send(router, from_pacs, calling="PACS")  # the PACS itself sends these
            _send(router, from_ct, calling="CT")
            # Planned in arrival order: once CT's jobs are done, PACS's were decided.
            router.wait_jobs(lambda j: len(j) == 2 and all_settled(j), 60, "CT's jobs")
            assert pacs.received_sops() == sop_uids(from_ct)
            skipped = _rows(
                router,
                "SELECT sop_instance_uid, destination, reason FROM loop_events "
                "WHERE kind = 'not_sent_back'",
            )
            assert {row[0] for row in skipped} == sop_uids(from_pacs)
            assert all(row[1] == "pacs" and "send_back_to_sender" in row[2] for row in skipped)
            assert "back to pacs, which sent them" in router.log()

            # Allowed by configuration: the next copies from PACS go back to it.
            config = dict(router.config)
            config["dispatch"] = {**config["dispatch"], "send_back_to_sender": True}
            _reload(router, config)
            _send(router, from_pacs, calling="PACS")
            router.wait_jobs(lambda j: len(j) == 4 and all_settled(j), 60, "PACS's jobs")
            assert pacs.received_sops() == sop_uids(from_ct) | sop_uids(from_pacs)


def test_two_routers_forwarding_to_each_other_hold_the_copy_that_comes_back(
    tmp_path: Path, dcmtk: None
) -> None:
    """A sends to B, B sends everything back (a peer that does not check), and A
    holds what comes back instead of sending it to B again: no storm."""
    files = make_study(tmp_path / "in", 3, prefix="s")
    port_a, port_b = free_port(), free_port()
    config_a = {
        "ae_title": "ROUTERA",
        "dicom": {"port": port_a},
        "destinations": {"b": {"ae_title": "ROUTERB", "host": HOST, "port": port_b}},
        "routes": [{"name": "to-b", "to": ["b"]}],
        # Only the hold may stop the loop here, not the send-back guard.
        "dispatch": {"send_back_to_sender": True},
    }
    config_b = {
        "ae_title": "ROUTERB",
        "dicom": {"port": port_b},
        "destinations": {"a": {"ae_title": "ROUTERA", "host": "localhost", "port": port_a}},
        "routes": [{"name": "back-to-a", "to": ["a"]}],
        "dispatch": {"send_back_to_sender": True},
    }
    with (
        RouterProcess(tmp_path / "a", config_a) as a,
        RouterProcess(tmp_path / "b", config_b) as b,
    ):
        _send(a, files, calling="CT")
        wait_until(
            lambda: len(_cli_json(a, "loops", "list")["held"]) == 3,
            60,
            message=f"three held instances at A; log:\n{a.log()[-3000:]}",
        )
        b.wait_jobs(lambda j: len(j) == 3 and all_settled(j), 60, "B's jobs back to A")
        # Each instance went A -> B -> A once. A queued nothing for the copy that came
        # back (the hold is decided in the same transaction as any job would be).
        a_jobs = a.wait_jobs(lambda j: all_settled(j), 60, "A's jobs")
        assert len(a_jobs) == 3 and {j["state"] for j in a_jobs} == {"completed"}
        generations = _rows(a, "SELECT generation FROM instances")
        assert sorted(g for (g,) in generations) == [2, 2, 2]
        held = _cli_json(a, "loops", "list")["held"]
        assert {h["sop_instance_uid"] for h in held} == sop_uids(files)
        assert all(h["destination"] == "b" and "routing loop" in h["reason"] for h in held)
        assert "routing loop" in a.log()

        # Released by hand, the copies are routed again: A sends them to B once more,
        # and now B holds them (it had sent them to A a moment ago). Still no storm.
        released = _cli_json(a, "loops", "release", "--all")["released"]
        assert len(released) == 3
        assert _cli_json(a, "loops", "list")["held"] == []
        wait_until(
            lambda: len(_cli_json(b, "loops", "list")["held"]) == 3,
            60,
            message=f"three held instances at B; log:\n{b.log()[-3000:]}",
        )
        a_jobs = a.wait_jobs(lambda j: len(j) == 6 and all_settled(j), 60, "A's jobs")
        assert {j["state"] for j in a_jobs} == {"completed"}
        assert len(b.jobs()) == 3  # B forwarded nothing more
        audit = _rows(a, "SELECT actor, outcome FROM audit_log WHERE action = 'loop.release'")
        assert len(audit) == 1 and audit[0][1] == "ok"


def test_a_destination_that_is_this_router_is_refused_when_applied_live(
    tmp_path: Path, dcmtk: None
) -> None:
    files = make_study(tmp_path / "in", 2, prefix="h")
    with StoreSCP(free_port(), "PACS", tmp_path / "pacs") as pacs:
        config = {
            "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": pacs.port}},
            "routes": [{"name": "to-pacs", "to": ["pacs"]}],
        }
        with RouterProcess(tmp_path / "router", config) as router:
            looped = dict(router.config)
            looped["destinations"] = {
                **looped["destinations"],
                "me": {"ae_title": router.ae_title, "host": "0x7f000001", "port": router.port},
            }
            looped["routes"] = [*looped["routes"], {"name": "to-me", "to": ["me"]}]
            router.config_path.write_text(yaml.safe_dump(looped, sort_keys=False))
            router.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(
                lambda: _rows(router, "SELECT id FROM audit_log WHERE action = 'config.reload'"),
                30,
                message="the reload audited",
            )
            assert "destinations.me: routing loop" in router.log()
            _send(router, files, calling="CT")
            # (Read from the index: the CLI would refuse the file, as it should.)
            query = "SELECT destination, state FROM jobs"
            wait_until(
                lambda: sorted(_rows(router, query)) == [("pacs", "completed")] * 2,
                60,
                message="both instances delivered to pacs only",
            )
            assert pacs.received_sops() == sop_uids(files)
            assert len(_rows(router, "SELECT id FROM instances")) == 2  # nothing came back
