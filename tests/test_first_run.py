"""The first hour: which file `serve` runs on and says so, what it says when nobody can
log in, the overrides `serve --help` lists, and the README's quick start on `init`."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from dicomrouter.cli.main import app as cli
from dicomrouter.config import parse_config
from dicomrouter.config.loader import ENV_PREFIX, NODE_KEYS
from dicomrouter.config.models import RouterConfig
from tests.support.api import api_env

ROOT = Path(__file__).resolve().parents[1]


def serve_until_it_fails(
    cwd: Path, port: int, extra_env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """``serve`` with its DICOM port taken: it logs its start-up lines, then fails
    fast (no router left running)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(extra_env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "dicomrouter", "serve", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_serve_names_its_configuration_file_and_says_how_to_create_a_user(
    tmp_path: Path,
) -> None:
    config = tmp_path / "router.yaml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(f"dicom: {{port: {port}, bind: 127.0.0.1}}\nstorage: {{path: data}}\n")
        result = serve_until_it_fails(tmp_path, port, {}, "--config", "router.yaml")
    assert result.returncode != 0
    assert f"configuration: {config.resolve()}" in result.stderr
    no_users = next(line for line in result.stderr.splitlines() if "no users" in line)
    assert "WARNING" in no_users and "port 8080" in no_users
    assert "dicomrouter hash-password admin --role admin" in no_users
    assert f"--write --config {config.resolve()}" in no_users


def test_serve_on_the_embedded_defaults_says_so_and_names_the_overrides(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        overrides = {
            f"{ENV_PREFIX}DICOM__PORT": str(port),
            f"{ENV_PREFIX}DICOM__BIND": "127.0.0.1",
            f"{ENV_PREFIX}HTTP__PORT": "18081",
            f"{ENV_PREFIX}DATABASE": "sqlite:///secret-in-a-url",
        }
        result = serve_until_it_fails(tmp_path, port, overrides)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr  # the override applied
    assert "configuration: the embedded defaults" in result.stderr
    assert "'dicomrouter init'" in result.stderr
    assert (
        "overridden by the environment: DICOMROUTER_DATABASE, DICOMROUTER_DICOM__BIND, "
        "DICOMROUTER_DICOM__PORT, DICOMROUTER_HTTP__PORT"
    ) in result.stderr
    assert "secret-in-a-url" not in result.stderr  # names, never values
    assert "dashboard on port 18081" in result.stderr


def test_serve_help_and_the_reference_list_every_overridable_section() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0
    help_text = " ".join(result.output.split())
    reference = " ".join((ROOT / "docs" / "configuration.md").read_text().split())
    for section in NODE_KEYS:
        annotation = RouterConfig.model_fields[section].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        name = ENV_PREFIX + section.upper() + ("__<KEY>" if is_section else "")
        assert name in help_text, name
        assert f"`{name}`" in reference, name
    assert "DICOMROUTER_HTTP__PORT=9090" in help_text
    assert "`DICOMROUTER_HTTP__<KEY>`" in reference


def test_the_readme_quick_start_appends_to_what_init_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") :]
    appended = re.search(r"cat >> (\S+) <<'YAML'\n(.*?)\nYAML\n", quick_start, re.S)
    assert appended, "the quick start appends destinations and routes to init's file"
    file_name, block = appended.groups()
    assert file_name == "dicomrouter.yaml"
    # Every command of the quick start uses the file init writes.
    configs = set(re.findall(r"--config (\S+)", quick_start.split("```")[1]))
    assert configs == {file_name}, configs
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(cli, ["init"]).exit_code == 0  # the default file name
    with open(file_name, "a", encoding="utf-8") as out:
        out.write(block + "\n")
    result = runner.invoke(cli, ["check", "--config", file_name])
    assert result.exit_code == 0, result.output
    assert "1 route(s), 1 destination(s), 0 error(s)" in result.output


def test_the_login_page_says_how_to_create_the_first_user(tmp_path: Path) -> None:
    empty = api_env(tmp_path / "empty", {"auth": {"users": {}}})
    page = empty.anonymous.get("/login")
    assert page.status_code == 200
    assert 'id="no-users"' in page.text and "dicomrouter init" in page.text
    assert "dicomrouter hash-password admin --role admin" in page.text
    failed = empty.anonymous.post("/login", data={"username": "admin", "password": "x"})
    assert failed.status_code == 401 and 'id="no-users"' in failed.text
    with_users = api_env(tmp_path / "users")
    assert 'id="no-users"' not in with_users.anonymous.get("/login").text


def test_init_output_loads_as_written(tmp_path: Path) -> None:
    import yaml

    target = tmp_path / "elsewhere.yaml"
    result = CliRunner().invoke(cli, ["init", "--config", str(target)])
    assert result.exit_code == 0
    assert f"dicomrouter serve --config {target}" in result.output
    parse_config(yaml.safe_load(target.read_text()), environ={})
