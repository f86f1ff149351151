"""Configuration contract: the issue's example loads unchanged; errors name the key path."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from dicomrouter.config import ConfigError, load_config, parse_config
from dicomrouter.config.lint import lint
from dicomrouter.config.reference import render_reference
from dicomrouter.units import TimeWindow, parse_duration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dicomrouter.yaml"
DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}


def errors_of(data: dict, environ: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ=environ or {})
    return info.value.errors


def test_issue_example_loads_unchanged() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.ae_title == "DICOMROUTER"
    assert config.dicom.port == 11112
    assert config.storage.path == (EXAMPLE.parent / "data").resolve()
    assert config.database_url.endswith("/data/index.sqlite")
    research = config.destinations["research"]
    assert research.max_associations == 2
    assert research.retry.max_attempts == 20
    assert research.retry.initial_delay == 10.0
    assert research.retry.max_delay == 1800.0
    assert research.send_window is not None
    assert research.send_window.contains(datetime(2026, 1, 5, 23, 0))
    assert not research.send_window.contains(datetime(2026, 1, 5, 12, 0))
    first, second = config.routes
    assert (first.trigger, first.forward_level, first.to) == ("instance", "instance", ["pacs"])
    assert (second.trigger, second.stable_after, second.forward_level) == ("study", 30.0, "study")
    assert lint(config) == []


def test_defaults_are_the_embedded_node() -> None:
    config = load_config(None, environ={})
    assert (config.ae_title, config.dicom.port) == ("DICOMROUTER", 11112)
    assert config.database_url.startswith("sqlite:///")
    assert config.routes == [] and config.destinations == {}


def test_environment_overrides_node_settings() -> None:
    env = {
        "DICOMROUTER_AE_TITLE": "EDGE1",
        "DICOMROUTER_DICOM__PORT": "104",
        "DICOMROUTER_STORAGE__PATH": "/srv/dicom",
        "DICOMROUTER_ROUTES": "ignored: routes are not node settings",
    }
    config = parse_config({"dicom": {"port": 11112}}, environ=env)
    assert config.ae_title == "EDGE1"
    assert config.dicom.port == 104
    assert config.storage.path == Path("/srv/dicom")


def test_environment_override_errors_name_the_key() -> None:
    assert any(
        e.startswith("dicom.port:") for e in errors_of({}, {"DICOMROUTER_DICOM__PORT": "abc"})
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"colour": "blue"}, "colour: unknown key"),
        ({"dicom": {"port": 70000}}, "dicom.port:"),
        (
            {"destinations": {"pacs": {"ae_title": "PACS", "host": "h"}}},
            "destinations.pacs.port: required",
        ),
        (
            {"destinations": {"pacs": {**DEST, "send_window": "7pm-7am"}}},
            "destinations.pacs.send_window:",
        ),
        (
            {"destinations": {"pacs": {**DEST, "retry": {"initial_delay": "10 parsecs"}}}},
            "destinations.pacs.retry.initial_delay: invalid duration",
        ),
        (
            {"destinations": {"pacs": DEST}, "routes": [{"name": "r", "to": ["nope"]}]},
            "routes[0] (r).to[0]: unknown destination 'nope'",
        ),
        (
            {
                "destinations": {"pacs": DEST},
                "routes": [{"name": "r", "to": ["pacs"], "when": {"Modaltiy": "CT"}}],
            },
            "Modaltiy",
        ),
        (
            {
                "destinations": {"pacs": DEST},
                "routes": [{"name": "r", "to": ["pacs"], "trigger": "patient"}],
            },
            "routes[0] (r).trigger:",
        ),
        ({"ae_title": "THIS AE TITLE IS FAR TOO LONG"}, "ae_title: "),
    ],
)
def test_errors_name_the_offending_key(data: dict, expected: str) -> None:
    assert any(expected in error for error in errors_of(data)), errors_of(data)


def test_unknown_keyword_error_points_inside_when() -> None:
    data = {
        "destinations": {"pacs": DEST},
        "routes": [{"name": "r", "to": ["pacs"], "when": {"Modaltiy": "CT"}}],
    }
    (error,) = errors_of(data)
    assert error.startswith("routes[0] (r).when.Modaltiy:")
    assert "did you mean 'Modality'" in error


def test_routing_loop_is_refused() -> None:
    data = {
        "ae_title": "ROUTER",
        "dicom": {"port": 11112},
        "destinations": {"me": {"ae_title": "ROUTER", "host": "localhost", "port": 11112}},
    }
    (error,) = errors_of(data)
    assert "destinations.me: routing loop" in error


def _own_non_loopback_address() -> str:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet sent: picks the outgoing interface
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.fail("this machine has no non-loopback IPv4 address to test with")
    return str(address)


def test_a_loop_through_one_of_our_interface_addresses_is_refused() -> None:
    me = _own_non_loopback_address()
    data = {
        "ae_title": "ROUTER",
        "dicom": {"port": 11112},
        "destinations": {"me": {"ae_title": "ROUTER", "host": me, "port": 11112}},
    }
    (error,) = errors_of(data)
    assert "destinations.me: routing loop" in error
    # Another machine's address (TEST-NET-1, never assigned) is no loop.
    data["destinations"]["me"]["host"] = "192.0.2.77"
    parse_config(data, environ={})  # loads


def test_without_the_called_ae_check_any_ae_title_at_our_port_is_a_loop() -> None:
    data = {
        "ae_title": "ROUTER",
        "dicom": {"port": 11112, "require_called_ae": False},
        "destinations": {"me": {"ae_title": "ANYTHING", "host": "127.0.0.1", "port": 11112}},
    }
    (error,) = errors_of(data)
    assert "destinations.me: routing loop" in error
    data["dicom"]["require_called_ae"] = True  # ANYTHING is then refused by us: no loop
    parse_config(data, environ={})  # loads


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  port: [1, 2\nstorage: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, environ={})
    assert "line" in info.value.errors[0] and "YAML syntax error" in info.value.errors[0]


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml", environ={})
    assert "cannot read file" in info.value.errors[0]


def test_lint_flags_dead_duplicate_and_unused() -> None:
    config = parse_config(
        {
            "destinations": {"pacs": DEST, "spare": {**DEST, "port": 4243}},
            "routes": [
                {"name": "a", "to": ["pacs"], "when": {"Modality": "CT"}},
                {"name": "b", "to": ["pacs"], "when": {"Modality": "CT"}},
                {
                    "name": "dead",
                    "to": ["pacs"],
                    "when": {"StudyDate": {"between": ["20250101", "20240101"]}},
                },
            ],
        },
        environ={},
    )
    text = "\n".join(str(f) for f in lint(config))
    assert "routes 'a' and 'b'" in text and "same data" in text
    assert "dead" in text and "can never match" in text
    assert "destinations.spare: is not used" in text


def test_lint_sees_the_same_conditions_written_differently() -> None:
    when_a = {"Modality": "CT", "StudyDescription": {"contains": "HEAD"}}
    when_b = {"all": [{"StudyDescription": {"contains": "HEAD"}}, {"Modality": {"equals": "CT"}}]}
    routes = [
        {"name": "a", "to": ["pacs"], "when": when_a},
        {"name": "b", "to": ["pacs"], "when": when_b},
    ]
    config = parse_config({"destinations": {"pacs": DEST}, "routes": routes}, environ={})
    text = "\n".join(str(f) for f in lint(config))
    assert "routes 'a' and 'b'" in text and "same data" in text
    routes[1]["when"] = {"Modality": "MR", "StudyDescription": {"contains": "HEAD"}}
    config = parse_config({"destinations": {"pacs": DEST}, "routes": routes}, environ={})
    assert "same data" not in "\n".join(str(f) for f in lint(config))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), (15, 15)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_window_weekdays_and_midnight() -> None:
    window = TimeWindow.parse("Mon-Fri 19:00-07:00")
    assert window.contains(datetime(2026, 11, 20, 20, 0))  # Friday evening
    assert window.contains(datetime(2026, 11, 21, 6, 0))  # Saturday morning: Friday's window
    assert not window.contains(datetime(2026, 11, 21, 20, 0))  # Saturday evening
    assert window.next_open(datetime(2026, 11, 21, 12, 0)) == datetime(2026, 11, 23, 19, 0)


def test_configuration_reference_is_current() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render_reference(), (
        "docs/configuration.md is stale: run `dicomrouter config-docs -o docs/configuration.md`"
    )


@pytest.mark.parametrize("value", [0, -1, 65, "two"])
def test_dicom_processes_out_of_range_names_the_key(value: object) -> None:
    (error,) = errors_of({"dicom": {"processes": value}})
    assert error.startswith("dicom.processes"), error


def test_dicom_processes_defaults_to_the_cpus_but_one_at_most_four(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for cpus, expected in ((1, 1), (2, 1), (3, 2), (16, 4), (None, 1)):
        monkeypatch.setattr("os.cpu_count", lambda cpus=cpus: cpus)
        assert parse_config({}, environ={}).dicom.process_count == expected
    assert parse_config({"dicom": {"processes": 8}}, environ={}).dicom.process_count == 8
