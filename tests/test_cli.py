"""The command line as an operator uses it: exit codes and messages, real peers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import run_cli as run
from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.router import wait_until
from tests.support.synth import make_study


@pytest.mark.interop
def test_echo_reports_success_and_failure(pacs: StoreSCP) -> None:
    ok = run("echo", f"PACS@{HOST}:{pacs.port}")
    assert ok.returncode == 0, ok.stderr
    assert "succeeded" in ok.stdout
    closed = run("echo", f"PACS@{HOST}:{free_port()}", "--timeout", "2")
    assert closed.returncode == 1
    assert "C-ECHO to PACS@" in closed.stderr and "failed" in closed.stderr


def test_echo_rejects_a_malformed_target(tmp_path: Path) -> None:
    result = run("echo", "PACS-127.0.0.1-104", cwd=tmp_path)
    assert result.returncode == 1
    # Not AE@HOST:PORT, so a destination's name: none by that name is configured, and
    # no file was found to configure one.
    assert "no destination 'PACS-127.0.0.1-104'" in result.stderr
    assert "the embedded defaults have no destinations" in result.stderr
    assert "give it as AE@HOST:PORT" in result.stderr
    result = run("echo", "PACS@127.0.0.1-104")
    assert result.returncode == 1
    assert "expected AE@HOST:PORT" in result.stderr


@pytest.mark.interop
def test_send_delivers_files_and_prints_a_summary(tmp_path: Path, pacs: StoreSCP) -> None:
    files = make_study(tmp_path / "in", 5)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    result = run("send", str(tmp_path / "in"), "--to", f"PACS@{HOST}:{pacs.port}")
    wait_until(lambda: len(pacs.received_files()) == 5, 20, message="5 files at storescp")
    assert pacs.received_sops() == sop_uids(files)
    # The file that is not DICOM is reported, and only skipped: the exit code is 0.
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "notes.txt" in result.stderr
    assert "skipped 1 file(s) that are not DICOM instances" in result.stdout
    assert "sent to PACS@" in result.stdout
    assert pacs.association_count() >= 1


@pytest.mark.interop
def test_send_to_a_closed_port_fails_clearly(tmp_path: Path, dcmtk: None) -> None:
    files = make_study(tmp_path / "in", 1)
    result = run("send", str(files[0]), "--to", f"PACS@{HOST}:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach PACS@" in result.stderr


def test_queue_commands_explain_missing_index_and_bad_state(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(f"storage: {{path: {tmp_path / 'data'}}}\n")
    missing = run("queue", "list", "--config", str(config))
    assert missing.returncode == 1 and "no index at" in missing.stderr
    bad = run("queue", "list", "--config", str(config), "--state", "lost")
    assert bad.returncode == 1 and "unknown state 'lost'" in bad.stderr


def test_check_json_on_the_issue_example() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "dicomrouter.yaml"
    result = run("check", "--config", str(example), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "valid": True,
        "file": str(example),
        "errors": [],
        "warnings": [],
    }


BROKEN = """\
dicom:
  max_assocations: 4
destinations:
  pacs: {ae_title: PACS, host: 10.0.0.5, port: 104}
routes:
  - name: ct-to-pacs
    triger: series
    to: [pacs, archive]
log_level: INFO
log_level: DEBUG
"""


def test_check_json_prints_every_error_on_stdout(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(BROKEN.replace("log_level: DEBUG\n", ""))
    result = run("check", "--config", str(config), "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout) == {
        "valid": False,
        "file": str(config),
        "errors": [
            {
                "key": "dicom.max_assocations",
                "message": "unknown key; did you mean 'max_associations'?",
            },
            {
                "key": "routes[0] (ct-to-pacs).triger",
                "message": "unknown key; did you mean 'trigger'?",
            },
            {
                "key": "routes[0] (ct-to-pacs).to[1]",
                "message": "unknown destination 'archive' (known: pacs)",
            },
        ],
        "warnings": [],
    }
    # A duplicate key stops the file before validation; in text, on stderr.
    config.write_text(BROKEN)
    text = run("check", "--config", str(config))
    assert text.returncode == 2 and text.stdout.startswith("INVALID")
    assert "error: log_level: duplicate key 'log_level' at line 10 (first at line 9)" in text.stderr


def test_commands_find_the_file_by_env_var_or_in_the_current_folder(tmp_path: Path) -> None:
    here = tmp_path / "site"
    here.mkdir()
    missing = run("check", cwd=here)
    assert missing.returncode == 2
    assert "give --config FILE, set DICOMROUTER_CONFIG" in missing.stderr
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text("log_level: LOUD\n")
    by_env = run("check", "--json", cwd=here, env={"DICOMROUTER_CONFIG": str(elsewhere)})
    assert by_env.returncode == 2
    assert json.loads(by_env.stdout)["file"] == str(elsewhere)
    (here / "dicomrouter.yaml").write_text(f"storage: {{path: {tmp_path / 'data'}}}\n")
    by_default = run("check", "--json", cwd=here)
    assert by_default.returncode == 0, by_default.stderr
    assert json.loads(by_default.stdout)["file"] == "dicomrouter.yaml"
    # --config wins over the variable; queue commands find the file the same way.
    explicit = run(
        "check", "--config", "dicomrouter.yaml", cwd=here, env={"DICOMROUTER_CONFIG": "/nope"}
    )
    assert explicit.returncode == 0, explicit.stderr
    queue = run("queue", "list", cwd=here)
    assert queue.returncode == 1 and f"no index at {tmp_path / 'data'}" in queue.stderr


def test_config_docs_matches_the_committed_reference() -> None:
    committed = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert run("config-docs").stdout == committed.read_text(encoding="utf-8")


def test_serve_fails_fast_when_the_port_is_taken(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "router.yaml"
        config.write_text(
            f"dicom: {{port: {port}, bind: 127.0.0.1}}\nstorage: {{path: {tmp_path / 'data'}}}\n"
        )
        result = subprocess.run(
            [sys.executable, "-m", "dicomrouter", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_a_second_router_on_the_same_storage_is_refused(tmp_path: Path, dcmtk: None) -> None:
    from tests.support.router import RouterProcess

    with RouterProcess(tmp_path / "first", {}) as first:
        config = tmp_path / "second.yaml"
        config.write_text(f"dicom: {{port: {free_port()}}}\nstorage: {{path: {first.storage}}}\n")
        result = run("serve", "--config", str(config))
    assert result.returncode == 1
    assert "is in use by another dicomrouter process" in result.stderr
