"""``/readyz`` fails, naming the process, when the receiver or dispatch is not running.

In process: heartbeats as the node and the dispatch process write them. End to end:
a real router whose dispatch child is stopped (SIGSTOP), then killed and restarted
by the node.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dicomrouter.store import heartbeat
from tests.support.api import api_env
from tests.support.router import RouterProcess, wait_until


def _beat(engine, role: str, ok: bool = True, detail: str = "", age: float = 0.0) -> None:  # type: ignore[no-untyped-def]
    heartbeat.beat(
        engine, socket.gethostname(), role, time.time() - 60, ok, detail, now=time.time() - age
    )


#: One receive process: the node itself, role ``receiver`` (the default depends on the
#: machine's CPUs).
ONE_RECEIVER = {"dicom": {"processes": 1}}


def test_ready_when_both_processes_beat(tmp_path: Path) -> None:
    env = api_env(tmp_path, ONE_RECEIVER)
    _beat(env.engine, "receiver", detail="listening on 0.0.0.0:104")
    _beat(env.engine, "dispatch")
    answer = env.anonymous.get("/readyz")
    assert answer.status_code == 200, answer.text
    checks = answer.json()["checks"]
    assert checks["receiver"]["ok"] and checks["dispatch"]["ok"]
    assert checks["receiver"]["pid"] == os.getpid()


@pytest.mark.parametrize(
    ("role", "how", "says"),
    [
        ("dispatch", "missing", "has not started"),
        ("receiver", "stale", "no heartbeat from the receiver process"),
        ("receiver", "failing", "the DICOM listener is not accepting connections"),
        ("dispatch", "gone", "is not running"),
    ],
)
def test_not_ready_names_the_process(tmp_path: Path, role: str, how: str, says: str) -> None:
    env = api_env(tmp_path, ONE_RECEIVER)
    other = "receiver" if role == "dispatch" else "dispatch"
    _beat(env.engine, other)
    if how == "stale":
        _beat(env.engine, role, age=heartbeat.STALE_AFTER + 5)
    elif how == "failing":
        _beat(env.engine, role, ok=False, detail="the DICOM listener is not accepting connections")
    elif how == "gone":
        _beat(env.engine, role)
        dead = subprocess.Popen(["true"])
        dead.wait()
        with env.engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE process_heartbeats SET pid = {dead.pid}")
    answer = env.anonymous.get("/readyz")
    assert answer.status_code == 503
    checks = answer.json()["checks"]
    assert checks[role]["ok"] is False
    assert says in checks[role]["error"]
    if how != "gone":
        assert checks[other]["ok"] is True


def test_with_several_receive_processes_each_must_beat(tmp_path: Path) -> None:
    env = api_env(tmp_path, {"dicom": {"processes": 2}})
    _beat(env.engine, "dispatch")
    _beat(env.engine, "receiver-1")
    answer = env.anonymous.get("/readyz")
    assert answer.status_code == 503
    checks = answer.json()["checks"]
    assert checks["receiver-1"]["ok"] is True
    assert "the receiver-2 process has not started" in checks["receiver-2"]["error"]
    assert "receiver" not in checks  # the node itself does not receive then
    _beat(env.engine, "receiver-2")
    assert env.anonymous.get("/readyz").status_code == 200


def _readyz(port: int) -> tuple[int, dict]:  # type: ignore[type-arg]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _dispatch_pids(router: RouterProcess) -> list[int]:
    return [int(p) for p in re.findall(r"dispatch process started \(pid (\d+)\)", router.log())]


@pytest.mark.sqlite_only
@pytest.mark.interop
@pytest.mark.timeout(240)
def test_readyz_follows_the_dispatch_process_of_a_running_router(tmp_path: Path) -> None:
    with RouterProcess(tmp_path / "router", ONE_RECEIVER) as router:
        port = int(router.config["http"]["port"])
        status, body = wait_until(lambda: _readyz(port), 30, message="/readyz answers")
        assert status == 200, body
        (dispatch,) = _dispatch_pids(router)
        os.kill(dispatch, signal.SIGSTOP)  # hung: alive, but doing nothing
        try:
            status, body = wait_until(
                lambda: (answer := _readyz(port))[0] == 503 and answer,
                heartbeat.STALE_AFTER + 30,
                interval=1.0,
                message="/readyz to fail",
            )
            assert body["checks"]["dispatch"]["ok"] is False
            assert "dispatch" in body["checks"]["dispatch"]["error"]
            assert body["checks"]["receiver"]["ok"] is True
        finally:
            os.kill(dispatch, signal.SIGKILL)  # the node restarts it
        wait_until(lambda: len(_dispatch_pids(router)) == 2, 60, message="dispatch restarted")
        status, body = wait_until(
            lambda: (answer := _readyz(port))[0] == 200 and answer,
            30,
            interval=0.5,
            message="/readyz to pass again",
        )
        assert body["checks"]["dispatch"]["pid"] == _dispatch_pids(router)[-1]
