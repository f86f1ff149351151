"""Configuration errors as the first hour meets them: duplicate keys, every error in
one run, routes named in key paths, "did you mean" for misspelt keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomrouter.config import ConfigError, load_config, load_config_text, load_yaml
from dicomrouter.config.loader import known_keys

DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}


def errors_of_text(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "<test>", Path.cwd(), environ={})
    return info.value.errors


def test_a_second_auth_block_is_a_duplicate_key_with_both_lines() -> None:
    text = (
        "auth:\n"  # 1
        "  users:\n"  # 2
        "    admin: {password_hash: 'scrypt$x', role: admin}\n"  # 3
        "dicom:\n"  # 4
        "  port: 11112\n"  # 5
        "auth:\n"  # 6
        "  tokens:\n"  # 7
        "    ci: {token_hash: 'sha256$x', role: viewer}\n"  # 8
    )
    assert errors_of_text(text) == [
        "auth: duplicate key 'auth' at line 6 (first at line 1); YAML would keep only the last"
    ]


def test_nested_duplicates_are_all_reported_with_their_key_path() -> None:
    text = (
        "auth:\n"
        "  users:\n"
        "    alice: {role: admin}\n"
        "  users:\n"  # 4
        "    bob: {role: viewer}\n"
        "routes:\n"
        "  - name: r\n"  # 7
        "    to: [pacs]\n"
        "    name: s\n"  # 9
    )
    with pytest.raises(ConfigError) as info:
        load_yaml(text)
    assert info.value.errors == [
        "auth.users: duplicate key 'users' at line 4 (first at line 2); "
        "YAML would keep only the last",
        "routes[0].name: duplicate key 'name' at line 9 (first at line 7); "
        "YAML would keep only the last",
    ]
    assert [issue.key for issue in info.value.issues] == ["auth.users", "routes[0].name"]


def test_overriding_a_merged_key_is_not_a_duplicate() -> None:
    text = "base: &b {port: 104, host: a}\npacs:\n  <<: *b\n  port: 11112\n"
    assert load_yaml(text)["pacs"] == {"port": 11112, "host": "a"}
    # Keys that YAML reads as the same value are duplicates however written;
    # keys that differ in type are not.
    with pytest.raises(ConfigError, match="duplicate key 'True'"):
        load_yaml("yes: 1\ntrue: 2\n")
    assert load_yaml("1: a\n'1': b\n") == {1: "a", "1": "b"}


def test_a_duplicate_key_in_the_file_stops_loading(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("dicom: {port: 104}\nlog_level: INFO\nlog_level: DEBUG\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.errors == [
        "log_level: duplicate key 'log_level' at line 3 (first at line 2); "
        "YAML would keep only the last"
    ]


def test_every_error_is_reported_in_one_run_with_route_names() -> None:
    text = """
dicom:
  max_assocations: 5
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 4242}
routes:
  - name: ct-to-pacs
    triger: series
    to: [pacs]
  - name: mr
    when: {Modality: {equalz: MR}}
    to: [nowhere]
  - name: mr
    to: [pacs]
"""
    assert errors_of_text(text) == [
        "dicom.max_assocations: unknown key; did you mean 'max_associations'?",
        "routes[0] (ct-to-pacs).triger: unknown key; did you mean 'trigger'?",
        "routes[1] (mr).when.Modality.equalz: unknown operator 'equalz' "
        "(did you mean 'equals'?); valid: equals, in, contains, startswith, regex, exists, "
        "lt, le, gt, ge, between, not",
        "routes[1] (mr).to[0]: unknown destination 'nowhere' (known: pacs)",
        "routes[2] (mr).name: duplicate route name 'mr' (also routes[1])",
    ]


def test_cross_checks_report_every_problem_when_the_sections_are_valid() -> None:
    text = """
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 4242}
routes:
  - {name: a, to: [one, pacs, two]}
alerts:
  events:
    job_failed: {webhooks: [w1, w2]}
"""
    assert errors_of_text(text) == [
        "alerts.events.job_failed.webhooks: unknown webhook 'w1' (known: none defined)",
        "alerts.events.job_failed.webhooks: unknown webhook 'w2' (known: none defined)",
        "routes[0] (a).to[0]: unknown destination 'one' (known: pacs)",
        "routes[0] (a).to[2]: unknown destination 'two' (known: pacs)",
    ]


def test_did_you_mean_knows_each_level_of_the_model() -> None:
    assert "max_associations" in known_keys(("dicom",))
    assert "retry" in known_keys(("destinations", "pacs"))
    assert "initial_delay" in known_keys(("destinations", "pacs", "retry"))
    assert "trigger" in known_keys(("routes", 0))
    assert known_keys(("routes", 0, "when")) == []  # free-form: the rules check it
    errors = errors_of_text(
        "destinations:\n  pacs: {ae_title: PACS, host: h, port: 1, retry: {max_atempts: 3}}\n"
        "storage: {pathh: ./data}\nzzz: 1\n"
    )
    assert errors == [  # in the models' order
        "storage.pathh: unknown key; did you mean 'path'?",
        "destinations.pacs.retry.max_atempts: unknown key; did you mean 'max_attempts'?",
        "zzz: unknown key",  # nothing close: no guess
    ]
