"""The README's install, exactly as written, on a clean copy of the checkout: into a
fresh virtual environment (pip downloads the dependencies), then `dicomrouter --help`
and `dicomrouter check` on every example configuration. The commands are read from
the README, so that this test fails when the README stops working."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*.yaml"))
INSTALL_TIMEOUT = 900


def readme_block_after(marker: str) -> list[str]:
    """The command lines of the first ```bash block after ``marker`` in the README."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme[readme.index(marker) :]
    block = re.search(r"```bash\n(.*?)```", after, re.S)
    assert block, f"no bash block after {marker!r} in README.md"
    return [line.strip() for line in block[1].splitlines() if line.strip()]


def run_command() -> str:
    """The README's first command: the first line after `# 1.` that is no comment."""
    lines = readme_block_after("## Two commands")
    index = next(i for i, line in enumerate(lines) if line.startswith("# 1."))
    command = next(line for line in lines[index:] if not line.startswith("#"))
    return command.split(" #")[0].strip()


def clean_checkout(target: Path) -> Path:
    """The files git knows (committed or not, ignored ones left out): what a fresh
    clone has, without a .venv, build or data left from earlier runs."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def clean_env() -> dict[str, str]:
    """This test's environment without what would let the install lean on the
    developer's: an active virtual environment, PYTHONPATH, router overrides."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHON")
    return {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith("DICOMROUTER_")
    }


def shell(command: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=clean_env(),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_examples_exist() -> None:
    assert EXAMPLES, "examples/*.yaml"


@pytest.mark.timeout(2 * INSTALL_TIMEOUT)
def test_the_readme_run_command_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    command = run_command()
    assert command == "bash scripts/run.sh", command  # arguments replace `serve`
    checkout = clean_checkout(tmp_path / "checkout")
    assert not (checkout / ".venv").exists()
    result = shell(f"{command} --help", checkout, INSTALL_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Usage: dicomrouter" in result.stdout and "serve" in result.stdout
    venv = checkout / ".venv"
    assert (venv / "pyvenv.cfg").is_file() and (venv / "bin" / "dicomrouter").is_file()
    # The router is the checkout's, not the developer's installation.
    where = shell(".venv/bin/python -c 'import dicomrouter; print(dicomrouter.__file__)'", checkout)
    assert where.stdout.strip() == str(checkout / "src" / "dicomrouter" / "__init__.py")
    for example in EXAMPLES:
        check = shell(f"{command} check --config {example}", checkout)
        assert check.returncode == 0, f"{example}: {check.stdout}{check.stderr}"
        assert "0 error(s)" in check.stdout
    # A second run reuses the environment: no second install.
    again = shell(f"{command} version", checkout)
    assert again.returncode == 0 and "installing" not in again.stdout, again.stdout


@pytest.mark.timeout(2 * INSTALL_TIMEOUT)
def test_the_readme_install_by_hand_works_as_written(tmp_path: Path) -> None:
    lines = readme_block_after("The same by hand:")
    apt, *rest = lines
    # Debian's python3 needs python3-venv for `python3 -m venv` (ensurepip). The line is
    # run when it is missing; as root, sudo is not needed (nor always installed).
    assert apt == "sudo apt-get update && sudo apt-get install -y python3-venv", apt
    checkout = clean_checkout(tmp_path / "checkout")
    if shell("python3 -c 'import ensurepip'", checkout).returncode != 0:
        command = apt.replace("sudo ", "") if os.getuid() == 0 else apt
        installed = shell(command, checkout, INSTALL_TIMEOUT)
        assert installed.returncode == 0, installed.stderr
    for line in rest:
        result = shell(line, checkout, INSTALL_TIMEOUT)
        assert result.returncode == 0, f"{line}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert rest[-1] == ".venv/bin/dicomrouter --help" and "Usage: dicomrouter" in result.stdout
    for example in EXAMPLES:
        check = shell(f".venv/bin/dicomrouter check --config {example}", checkout)
        assert check.returncode == 0, f"{example}: {check.stdout}{check.stderr}"
