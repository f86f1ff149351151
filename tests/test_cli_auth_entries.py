"""``hash-password`` and ``token``: entries that merge into the file, never a second
``auth:`` block that silently replaces the first (and the admin with it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicomrouter.cli.security_cmd import merge_auth_entry
from dicomrouter.config import ConfigError, load_config_text, load_yaml
from tests.support.cli import run_cli as run

ADMIN_HASH = (
    "scrypt$16384$8$1$C/YwWmqwXtXJ64BQ1GvJEA==$qKbs7Se8YI/2mYfpKFC9XFTsJcvJ+tnFXNWAXpDgJLc="
)
ENTRY = {"token_hash": "sha256$" + "0" * 64, "role": "operator"}
INIT_STYLE = f"""\
# written by init
ae_title: DICOMROUTER
auth:
  users:
    admin:
      password_hash: {ADMIN_HASH}
      role: admin
  # tokens come here
destinations: {{}}
"""


def test_an_entry_goes_into_the_existing_sections_and_keeps_the_comments() -> None:
    merged = merge_auth_entry(INIT_STYLE, "tokens", "ci", ENTRY)
    assert load_yaml(merged)["auth"] == {
        "users": {"admin": {"password_hash": ADMIN_HASH, "role": "admin"}},
        "tokens": {"ci": ENTRY},
    }
    assert merged.startswith("# written by init\n") and "  # tokens come here\n" in merged
    assert merged.endswith("destinations: {}\n")
    again = merge_auth_entry(merged, "users", "alice", {"password_hash": "p", "role": "viewer"})
    assert list(load_yaml(again)["auth"]["users"]) == ["admin", "alice"]
    assert load_yaml(again)["auth"]["tokens"] == {"ci": ENTRY}


@pytest.mark.parametrize(
    "text",
    ["", "ae_title: X", "ae_title: X\n", "dicom:\n    port: 104\n"],
)
def test_without_an_auth_section_one_is_added(text: str) -> None:
    merged = merge_auth_entry(text, "tokens", "ci", ENTRY)
    assert load_yaml(merged)["auth"] == {"tokens": {"ci": ENTRY}}
    assert merged.startswith(text)


def test_other_indentation_is_followed() -> None:
    text = "auth:\n    users:\n        admin: {password_hash: a, role: admin}\nlog_level: INFO\n"
    merged = merge_auth_entry(text, "users", "bob", {"password_hash": "b", "role": "viewer"})
    assert load_yaml(merged)["auth"]["users"]["bob"] == {"password_hash": "b", "role": "viewer"}
    assert "\n        bob:\n" in merged and merged.endswith("log_level: INFO\n")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("auth:\n  tokens:\n    ci: {token_hash: x, role: viewer}\n", "exists already"),
        ("auth: {users: {a: {password_hash: x, role: admin}}}\n", "flow style"),
        ("auth:\n  tokens: {}\n", "flow style"),
        ("auth:\n  users: {}\nauth:\n  tokens: {}\n", "duplicate key 'auth' at line 3"),
    ],
)
def test_what_cannot_be_merged_safely_is_refused(text: str, reason: str) -> None:
    with pytest.raises((ValueError, ConfigError), match=reason):
        merge_auth_entry(text, "tokens", "ci", ENTRY)


def test_the_commands_print_a_pastable_entry_or_write_it(tmp_path: Path) -> None:
    config = tmp_path / "dicomrouter.yaml"
    config.write_text(INIT_STYLE)
    config.chmod(0o600)
    printed = run("token", "ci", "--role", "operator", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    # Only the entry (and comments), never a second auth block.
    assert [line for line in printed.stdout.splitlines() if not line.startswith(" ")] == [
        line for line in printed.stdout.splitlines() if line.startswith("# ")
    ]
    pasted = INIT_STYLE.replace("  # tokens", "  tokens:\n" + printed.stdout + "  # tokens")
    assert load_yaml(pasted)["auth"]["tokens"]["ci"]["role"] == "operator"
    assert config.read_text() == INIT_STYLE  # printing writes nothing

    written = run("token", "ci", "--role", "operator", "--write", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    assert "added auth.tokens.ci (role operator) to dicomrouter.yaml" in written.stderr
    assert "# token (shown once): drt_" in written.stderr
    settings = load_config_text(config.read_text(), "x", tmp_path, environ={})
    assert set(settings.auth.users) == {"admin"} and settings.auth.tokens["ci"].role == "operator"
    assert config.stat().st_mode & 0o777 == 0o600
    before = config.read_text()
    taken = run("token", "ci", "--write", cwd=tmp_path)
    assert taken.returncode == 1 and "exists already; nothing was written" in taken.stderr
    assert "shown once" not in taken.stderr and config.read_text() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_write_as_root_keeps_the_service_users_ownership(tmp_path: Path) -> None:
    """Under systemd the file belongs to the service user; `sudo hash-password --write`
    must not hand it to root, or the next reload cannot read it."""
    config = tmp_path / "dicomrouter.yaml"
    config.write_text(INIT_STYLE)
    config.chmod(0o600)
    os.chown(config, 65534, 65534)  # nobody
    written = run("token", "ci", "--role", "operator", "--write", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    status = config.stat()
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (65534, 65534, 0o600)
    assert "ci:" in config.read_text()
