"""TLS configuration: dicom.tls, destinations.<name>.tls, http.tls, the expiry alert;
files resolved beside the configuration file and checked when it is loaded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from dicomrouter.config import ConfigError, load_config, parse_config
from dicomrouter.config.lint import lint
from dicomrouter.control import versions
from tests.support.pki import Pki

DEST = {"ae_title": "PACS", "host": "pacs.example.org", "port": 2762}


def errors_of(data: dict, environ: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ=environ or {})
    return info.value.errors


def dicom_tls(pki: Pki, **extra: object) -> dict:
    return {
        "port": 2762,
        "certificate": str(pki.server_cert),
        "private_key": str(pki.server_key),
        **extra,
    }


def test_tls_sections_load(pki: Pki) -> None:
    config = parse_config(
        {
            "dicom": {
                "tls": dicom_tls(
                    pki, ca_certificates=str(pki.ca_cert), require_client_certificate=True
                )
            },
            "http": {
                "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key)}
            },
            "destinations": {
                "pacs": {**DEST, "tls": {"ca_certificates": str(pki.ca_cert)}},
                "mutual": {
                    **DEST,
                    "tls": {
                        "certificate": str(pki.client_cert),
                        "private_key": str(pki.client_key),
                        "verify_hostname": False,
                    },
                },
            },
        },
        environ={},
    )
    assert config.dicom.port == 11112 and config.dicom.tls is not None
    assert config.dicom.tls.port == 2762 and config.dicom.tls.require_client_certificate
    assert config.dicom.ports == [11112, 2762]
    assert config.http.tls is not None and config.http.tls.certificate == pki.server_cert
    pacs = config.destinations["pacs"].tls
    assert pacs is not None and pacs.verify_hostname and pacs.certificate is None
    mutual = config.destinations["mutual"].tls
    assert mutual is not None and mutual.ca_certificates is None  # the system trust store
    assert not mutual.verify_hostname
    assert config.alerts.events.certificate_expiry.before == 14 * 86400.0


def test_defaults_have_no_tls() -> None:
    config = parse_config({}, environ={})
    assert config.dicom.tls is None and config.http.tls is None
    assert config.dicom.ports == [11112]


def test_plain_listener_off(pki: Pki) -> None:
    config = parse_config({"dicom": {"port": None, "tls": dicom_tls(pki)}}, environ={})
    assert config.dicom.port is None and config.dicom.ports == [2762]
    env = {"DICOMROUTER_DICOM__PORT": "null"}
    config = parse_config({"dicom": {"tls": dicom_tls(pki)}}, environ=env)
    assert config.dicom.port is None
    assert errors_of({"dicom": {"port": None}}) == [
        "dicom: port is null and tls is not set: nothing would listen"
    ]
    assert errors_of({"dicom": {"port": 2762, "tls": dicom_tls(pki)}}) == [
        "dicom: tls.port 2762 is also the plain listener's port"
    ]


def test_file_errors_name_the_key(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    assert errors_of({"dicom": {"tls": dicom_tls(pki, certificate=str(missing))}}) == [
        f"dicom.tls.certificate: no such file: {missing}"
    ]
    assert errors_of({"http": {"tls": {"certificate": str(tmp_path), "private_key": "x"}}})[0] == (
        f"http.tls.certificate: not a file: {tmp_path}"
    )
    errors = errors_of({"destinations": {"pacs": {**DEST, "tls": {"ca_certificates": "nope"}}}})
    assert errors == [f"destinations.pacs.tls.ca_certificates: no such file: {Path.cwd()}/nope"]
    # The key does not belong to the certificate.
    (error,) = errors_of({"dicom": {"tls": dicom_tls(pki, private_key=str(pki.client_key))}})
    assert error == f"dicom.tls: {pki.client_key} is not the private key of {pki.server_cert}"
    key_as_cert = {"certificate": str(pki.server_key), "private_key": str(pki.server_key)}
    (error,) = errors_of({"http": {"tls": key_as_cert}})
    assert error.startswith("http.tls: certificate ")
    assert errors_of({"dicom": {"tls": dicom_tls(pki, require_client_certificate=True)}}) == [
        "dicom.tls: require_client_certificate needs ca_certificates"
    ]
    cert_only = {"certificate": str(pki.client_cert)}
    assert errors_of({"destinations": {"pacs": {**DEST, "tls": cert_only}}}) == [
        "destinations.pacs.tls: certificate and private_key go together: set both or neither"
    ]
    assert errors_of({"dicom": {"tls": {"certificate": str(pki.server_cert)}}}) == [
        "dicom.tls.port: required key is missing",
        "dicom.tls.private_key: required key is missing",
    ]


def test_unreadable_file(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "server.key"
    shutil.copy(pki.server_key, key)
    key.chmod(0)
    if os.geteuid() == 0:  # root reads any file: answer os.access as the service user would
        real_access = os.access

        def access(path: object, mode: int) -> bool:
            if Path(str(path)) == key:
                return False
            return real_access(path, mode)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "access", access)
    assert errors_of({"dicom": {"tls": dicom_tls(pki, private_key=str(key))}}) == [
        f"dicom.tls.private_key: cannot read {key}: permission denied"
    ]


def test_relative_paths_are_beside_the_file(pki: Pki, tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    (folder / "tls").mkdir(parents=True)
    for source in (pki.server_cert, pki.server_key, pki.ca_cert):
        shutil.copy(source, folder / "tls" / source.name)
    data = {
        "dicom": {"port": None, "tls": {"port": 2762, "certificate": "tls/server.crt",
                                        "private_key": "tls/server.key"}},
        "http": {"tls": {"certificate": "tls/server.crt", "private_key": "tls/server.key"}},
        "destinations": {"pacs": {**DEST, "tls": {"ca_certificates": "tls/ca.crt"}}},
    }  # fmt: skip
    path = folder / "dicomrouter.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path, environ={})
    assert config.dicom.tls is not None and config.http.tls is not None
    assert config.dicom.tls.certificate == folder / "tls" / "server.crt"
    assert config.http.tls.private_key == folder / "tls" / "server.key"
    pacs_tls = config.destinations["pacs"].tls
    assert pacs_tls is not None and pacs_tls.ca_certificates == folder / "tls" / "ca.crt"
    (folder / "tls" / "ca.crt").unlink()
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.errors == [
        f"destinations.pacs.tls.ca_certificates: no such file: {folder}/tls/ca.crt"
    ]


def test_a_destination_on_our_tls_port_is_a_loop(pki: Pki) -> None:
    dest = {"ae_title": "DICOMROUTER", "host": "127.0.0.1", "port": 2762}
    (error,) = errors_of({"dicom": {"tls": dicom_tls(pki)}, "destinations": {"me": dest}})
    assert error.startswith("destinations.me: routing loop")
    config = parse_config(
        {
            "dicom": {"tls": dicom_tls(pki), "require_called_ae": True},
            "destinations": {"other": {**dest, "ae_title": "OTHER"}},
            "routes": [{"name": "r", "to": ["other"]}],
        },
        environ={},
    )
    assert [(f.where, f.severity) for f in lint(config)] == [("destinations.other", "warning")]


def test_tls_changes_need_a_restart(pki: Pki) -> None:
    running = parse_config({}, environ={})
    new = parse_config(
        {
            "dicom": {"port": None, "tls": dicom_tls(pki)},
            "http": {
                "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key)}
            },
        },
        environ={},
    )
    changed = versions.changed_keys(running, new)
    assert versions.restart_required(changed) == ["dicom.port", "dicom.tls", "http.tls"]
    effective = versions.effective(new, running)
    assert effective.dicom.tls is None and effective.http.tls is None
    assert effective.dicom.port == 11112
    other = new.model_copy(deep=True)
    assert other.dicom.tls is not None
    other.dicom.tls.require_client_certificate = True
    assert versions.restart_required(versions.changed_keys(new, other)) == [
        "dicom.tls.require_client_certificate"
    ]


def test_check_reports_certificates_that_expire(pki: Pki, tmp_path: Path) -> None:
    soon_cert, soon_key = pki.issue("soon", days=3, directory=tmp_path)
    tls = {"certificate": str(soon_cert), "private_key": str(soon_key)}
    config = parse_config({"http": {"tls": tls}}, environ={})
    (finding,) = lint(config)
    assert (finding.severity, finding.where) == ("warning", "http.tls.certificate")
    assert finding.message.startswith(f"the certificate in {soon_cert} expires on ")
    assert lint(parse_config({"dicom": {"tls": dicom_tls(pki)}}, environ={})) == []
    within = {"alerts": {"events": {"certificate_expiry": {"before": "400d"}}}}
    config = parse_config({**within, "dicom": {"tls": dicom_tls(pki)}}, environ={})
    assert [(f.severity, f.where) for f in lint(config)] == [("warning", "dicom.tls.certificate")]
    # Expired a quarter of an hour ago: loads (dates are not validation), but is an error.
    gone_cert, gone_key = pki.issue("gone", days=-0.01, directory=tmp_path)
    tls = {"certificate": str(gone_cert), "private_key": str(gone_key)}
    (finding,) = lint(parse_config({"http": {"tls": tls}}, environ={}))
    assert (finding.severity, finding.where) == ("error", "http.tls.certificate")
    assert "expired on" in finding.message
