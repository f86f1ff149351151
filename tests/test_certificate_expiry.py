"""The certificate_expiry alert and the dicomrouter_certificate_expiry_seconds metric,
over certificates of the test PKI (one valid for 3 days)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dicomrouter.config import parse_config
from dicomrouter.store import create_index_engine
from tests.support.api import api_env, auth_section
from tests.support.pki import Pki
from tests.test_alerts import Env, Receiver, alerts_section, receiver  # noqa: F401 - fixture
from tests.test_metrics import parse, value

DAY = 86400.0


def tls_config(pki: Pki, http_cert: Path, http_key: Path) -> dict[str, Any]:
    return {
        "dicom": {
            "tls": {
                "port": 2762,
                "certificate": str(pki.server_cert),
                "private_key": str(pki.server_key),
                "ca_certificates": str(pki.ca_cert),
            }
        },
        "http": {"tls": {"certificate": str(http_cert), "private_key": str(http_key)}},
        "destinations": {
            "pacs": {
                "ae_title": "PACS",
                "host": "pacs.example.org",
                "port": 2762,
                "tls": {
                    "ca_certificates": str(pki.ca_cert),
                    "certificate": str(pki.client_cert),
                    "private_key": str(pki.client_key),
                },
            }
        },
    }


def make_env(tmp_path: Path, webhooks: Receiver, data: dict[str, Any], **events: Any) -> Env:
    data = {
        **data,
        "storage": {"path": str(tmp_path / "data")},
        "alerts": alerts_section(webhooks, **events),
    }
    config = parse_config(data, environ={})
    config.storage.path.mkdir(parents=True)
    return Env(config, create_index_engine(config.database_url), config.storage.path)


def test_every_certificate_file_is_watched(pki: Pki) -> None:
    config = parse_config(tls_config(pki, pki.server_cert, pki.server_key), environ={})
    assert config.certificate_files() == {
        "dicom.tls.certificate": pki.server_cert,
        "dicom.tls.ca_certificates": pki.ca_cert,
        "http.tls.certificate": pki.server_cert,
        "destinations.pacs.tls.certificate": pki.client_cert,
        "destinations.pacs.tls.ca_certificates": pki.ca_cert,
    }
    assert parse_config({}, environ={}).certificate_files() == {}


def test_an_expiring_certificate_fires_once_then_resolves_when_renewed(
    tmp_path: Path,
    pki: Pki,
    receiver: Receiver,  # noqa: F811 - the fixture
) -> None:
    soon_cert, soon_key = pki.issue("soon", days=3, directory=tmp_path)
    env = make_env(
        tmp_path,
        receiver,
        tls_config(pki, soon_cert, soon_key),
        certificate_expiry={"webhooks": ["ops"]},
    )
    clock = [time.time()]
    evaluator = env.evaluator(lambda: clock[0])
    (alert,) = evaluator.run_once()  # only the 3-day certificate is within 14 days
    assert (alert.event, alert.status, alert.target) == (
        "certificate_expiry",
        "firing",
        "http.tls.certificate",
    )
    assert str(soon_cert) in alert.summary and "in 3 day(s)" in alert.summary
    assert alert.details["file"] == str(soon_cert)
    assert alert.details["key"] == "http.tls.certificate"
    assert 2.9 * DAY < alert.details["expires_in_s"] <= 3 * DAY
    (body,) = receiver.bodies("/ops")
    assert body["event"] == "certificate_expiry" and body["severity"] == "warning"
    assert body["details"]["not_after"].endswith("Z")
    assert evaluator.run_once() == []  # once per incident

    clock[0] += 4 * DAY  # expired now
    assert evaluator.run_once() == []  # the same incident
    restarted = env.evaluator(lambda: clock[0])  # a new HTTP process: nothing repeated
    assert restarted.run_once() == []

    # Renewed: the configuration names a certificate valid for a year.
    clock[0] = time.time()
    data = env.config.model_dump(mode="json")
    data["http"]["tls"] = {"certificate": str(pki.server_cert), "private_key": str(pki.server_key)}
    env.config = parse_config(data, environ={})
    (resolved,) = restarted.run_once()
    assert (resolved.status, resolved.target) == ("resolved", "http.tls.certificate")
    assert "is valid until" in resolved.summary
    audited = [(e["detail"]["payload"]["status"], e["target"]) for e in env.alert_audit()]
    assert audited == [("firing", "http.tls.certificate"), ("resolved", "http.tls.certificate")]


def test_before_and_an_expired_certificate(
    tmp_path: Path,
    pki: Pki,
    receiver: Receiver,  # noqa: F811 - the fixture
) -> None:
    env = make_env(
        tmp_path,
        receiver,
        tls_config(pki, pki.server_cert, pki.server_key),
        certificate_expiry={"before": "400d"},
    )
    fired = env.evaluator().run_once()
    assert sorted(a.target for a in fired) == [
        "destinations.pacs.tls.certificate",
        "dicom.tls.certificate",
        "http.tls.certificate",
    ]  # a year left: within 400 days; the CA (10 years) is not
    later = env.evaluator(lambda: time.time() + 3651 * DAY)
    expired = {a.target: a for a in later.run_once()}
    assert set(expired) == {"dicom.tls.ca_certificates", "destinations.pacs.tls.ca_certificates"}
    assert "has expired on" in expired["dicom.tls.ca_certificates"].summary


def test_disabled_certificate_expiry_sends_nothing(
    tmp_path: Path,
    pki: Pki,
    receiver: Receiver,  # noqa: F811 - the fixture
) -> None:
    soon_cert, soon_key = pki.issue("soon", days=1, directory=tmp_path)
    env = make_env(
        tmp_path,
        receiver,
        tls_config(pki, soon_cert, soon_key),
        certificate_expiry={"enabled": False},
    )
    assert env.evaluator().run_once() == []


def test_expiry_metric(tmp_path: Path, pki: Pki) -> None:
    soon_cert, soon_key = pki.issue("soon", days=3, directory=tmp_path)
    env = api_env(tmp_path, {**tls_config(pki, soon_cert, soon_key), "auth": auth_section()})
    s = parse(env.viewer.get("/metrics").text)
    left = value(s, "dicomrouter_certificate_expiry_seconds", key="http.tls.certificate")
    assert left is not None and 2.9 * DAY < left <= 3 * DAY
    year = value(s, "dicomrouter_certificate_expiry_seconds", key="dicom.tls.certificate")
    assert year is not None and 364 * DAY < year <= 365 * DAY
    ca = value(s, "dicomrouter_certificate_expiry_seconds", key="dicom.tls.ca_certificates")
    assert ca is not None and ca > 3649 * DAY
