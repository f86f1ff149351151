"""``GET /metrics`` after real traffic, through the real router's three processes.

dcmtk storescu sends synthetic studies to ``python -m dicomrouter serve``; a dcmtk
storescp is the destination. The metrics page is scraped over HTTP and parsed with
prometheus-client's own parser, and the values are checked against what was sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select

from dicomrouter.observe import metrics
from dicomrouter.store.schema import instances
from tests.support.api import api_env, auth_section
from tests.support.dcmtk import StoreSCP, free_port
from tests.support.router import RouterProcess, all_settled, wait_until
from tests.support.synth import make_small_study

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape(router: RouterProcess) -> httpx.Response:
    port = router.config["http"]["port"]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)


def http_ready(router: RouterProcess) -> RouterProcess:
    """The router answers C-ECHO before its HTTP child is up: wait for that too."""

    def up() -> bool:
        try:
            return scrape(router).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, 60, interval=0.2, message="the HTTP service")
    return router


def sizes(files: Iterable[Path]) -> int:
    return sum(path.stat().st_size for path in files)


def stored_bytes(router: RouterProcess) -> dict[str, int]:
    """Bytes stored per calling AE, from the index (the receiver rewrites the file
    meta, so a stored file is a few bytes longer than the one sent)."""
    engine = create_engine(f"sqlite:///{router.storage / 'index.sqlite'}")
    try:
        with engine.connect() as conn:
            query = select(instances.c.calling_ae, func.sum(instances.c.size)).group_by(
                instances.c.calling_ae
            )
            return {ae: int(total) for ae, total in conn.execute(query)}
    finally:
        engine.dispose()


def route_to(pacs_port: int, **dest: Any) -> dict[str, Any]:
    return {
        "destinations": {
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, **dest}
        },
        "routes": [{"name": "all", "to": ["pacs"]}],
        "http": {"bind": "127.0.0.1"},
    }


@pytest.mark.sqlite_only
def test_metrics_after_real_traffic(tmp_path: Path, dcmtk: None) -> None:
    ct = make_small_study(tmp_path / "ct", 5, prefix="CT")
    mr = make_small_study(tmp_path / "mr", 3, prefix="MR", modality="MR")
    pacs_port = free_port()
    with (
        StoreSCP(pacs_port, "PACS", tmp_path / "pacs") as pacs,
        RouterProcess(tmp_path / "router", route_to(pacs_port)) as started,
    ):
        router = http_ready(started)
        assert router.send(ct, calling="MODALITY_CT").returncode == 0
        assert router.send(mr, calling="MODALITY_MR").returncode == 0
        router.wait_jobs(lambda jobs: len(jobs) == 8 and all_settled(jobs), 60, "deliveries")

        response = scrape(router)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        s = parse(response.text)
        assert value(s, "dicomrouter_received_instances_total", calling_ae="MODALITY_CT") == 5
        assert value(s, "dicomrouter_received_instances_total", calling_ae="MODALITY_MR") == 3
        stored = stored_bytes(router)
        for ae, files in (("MODALITY_CT", ct), ("MODALITY_MR", mr)):
            received = value(s, "dicomrouter_received_bytes_total", calling_ae=ae)
            assert received == stored[ae]
            assert abs(received - sizes(files)) < 0.01 * sizes(files)
        assert value(s, "dicomrouter_delivered_instances_total", destination="pacs") == 8
        assert value(s, "dicomrouter_failed_instances_total", destination="pacs") is None
        count = value(s, "dicomrouter_delivery_latency_seconds_count", destination="pacs")
        assert count == 8
        latency_sum = value(s, "dicomrouter_delivery_latency_seconds_sum", destination="pacs")
        assert latency_sum is not None and 0 < latency_sum < 8 * 60
        assert value(s, "dicomrouter_queue_jobs", destination="pacs", state="pending") == 0
        assert value(s, "dicomrouter_queue_oldest_pending_age_seconds", destination="pacs") == 0
        assert value(s, "dicomrouter_destination_state", destination="pacs", state="ok") == 1
        free = value(s, "dicomrouter_storage_free_bytes")
        assert free is not None and free > 0
        assert value(s, "dicomrouter_index_up") == 1
        # Every association has ended: storescu's, and the dispatcher's once idle (2 s).
        wait_until(
            lambda: (
                value(
                    parse(scrape(router).text),
                    "dicomrouter_open_associations",
                    direction="outbound",
                )
                == 0
            ),
            15,
            message="outbound associations closed",
        )
        assert value(s, "dicomrouter_open_associations", direction="inbound") == 0
        assert len(pacs.received_files()) == 8

        # The destination goes down: the queue backs up and the metrics say so.
        pacs.stop()
        late = make_small_study(tmp_path / "late", 4, prefix="LATE")
        assert router.send(late, calling="MODALITY_CT").returncode == 0

        def backed_up() -> Samples | None:
            s = parse(scrape(router).text)
            pending = value(s, "dicomrouter_queue_jobs", destination="pacs", state="pending")
            age = value(s, "dicomrouter_queue_oldest_pending_age_seconds", destination="pacs")
            return s if pending == 4 and age and age > 1.0 else None

        s = wait_until(backed_up, 30, interval=0.5, message="queue depth 4 with an age")
        assert value(s, "dicomrouter_received_instances_total", calling_ae="MODALITY_CT") == 9
        assert value(s, "dicomrouter_delivered_instances_total", destination="pacs") == 8
        # Unreachable: no instance was refused, nothing counted as failed.
        assert value(s, "dicomrouter_failed_instances_total", destination="pacs") is None


@pytest.mark.sqlite_only
def test_outbound_association_counted_while_open(tmp_path: Path, dcmtk: None) -> None:
    """The dispatcher keeps an idle association 2 s; a scrape right after delivery
    sees it open, and the livesum gauge returns to 0 when it closes."""
    files = make_small_study(tmp_path / "ct", 2)
    pacs_port = free_port()
    with (
        StoreSCP(pacs_port, "PACS", tmp_path / "pacs"),
        RouterProcess(tmp_path / "router", route_to(pacs_port)) as started,
    ):
        router = http_ready(started)
        assert router.send(files).returncode == 0
        wait_until(
            lambda: (
                value(
                    parse(scrape(router).text),
                    "dicomrouter_open_associations",
                    direction="outbound",
                )
                == 1
            ),
            20,
            interval=0.05,
            message="an open outbound association",
        )
        wait_until(
            lambda: (
                value(
                    parse(scrape(router).text),
                    "dicomrouter_open_associations",
                    direction="outbound",
                )
                == 0
            ),
            20,
            message="the association closed",
        )


def test_metrics_need_viewer_when_probes_are_closed(tmp_path: Path) -> None:
    env = api_env(
        tmp_path,
        {
            "storage": {"path": str(tmp_path / "data")},
            "auth": auth_section(),
            "http": {"open_probes": False},
        },
    )
    assert env.anonymous.get("/metrics").status_code == 401
    response = env.viewer.get("/metrics")
    assert response.status_code == 200
    assert value(parse(response.text), "dicomrouter_index_up") == 1


def test_metrics_open_without_credentials_by_default(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    response = env.anonymous.get("/metrics")
    assert response.status_code == 200
    assert "dicomrouter_storage_free_bytes" in response.text


def test_index_collector_queue_and_state(tmp_path: Path) -> None:
    """Queue depth by state, the oldest late job and the destination state, from a
    seeded index (in process: no DICOM peers needed)."""
    import time

    from dicomrouter.store.schema import destination_state, jobs

    env = api_env(
        tmp_path,
        {
            "storage": {"path": str(tmp_path / "data")},
            "auth": auth_section(),
            "destinations": {
                "a": {"ae_title": "A", "host": "127.0.0.1", "port": 104},
                "b": {"ae_title": "B", "host": "127.0.0.1", "port": 105, "enabled": False},
            },
        },
    )
    now = time.time()
    rows = [
        ("a", "pending", now - 600),
        ("a", "pending", now - 60),
        ("a", "in_progress", now - 30),
        ("a", "scheduled", now - 7200),  # waiting for its window: not late
        ("a", "completed", now - 9000),
        ("b", "failed", now - 100),
    ]
    with env.engine.begin() as conn:
        for dest, state, created in rows:
            conn.execute(
                jobs.insert().values(
                    destination=dest,
                    level="study",
                    resource_uid="1.2",
                    state=state,
                    next_attempt_at=created,
                    created_at=created,
                    updated_at=created,
                )
            )
        conn.execute(
            destination_state.insert().values(
                name="a", state="paused", paused_since=now - 300, updated_at=now
            )
        )
    s = parse(env.viewer.get("/metrics").text)
    assert value(s, "dicomrouter_queue_jobs", destination="a", state="pending") == 2
    assert value(s, "dicomrouter_queue_jobs", destination="a", state="in_progress") == 1
    assert value(s, "dicomrouter_queue_jobs", destination="a", state="scheduled") == 1
    age = value(s, "dicomrouter_queue_oldest_pending_age_seconds", destination="a")
    assert age is not None and 600 <= age < 700
    assert value(s, "dicomrouter_queue_jobs", destination="b", state="pending") == 0
    assert value(s, "dicomrouter_destination_state", destination="a", state="probing") == 1
    assert value(s, "dicomrouter_destination_state", destination="a", state="ok") == 0
    assert value(s, "dicomrouter_destination_state", destination="b", state="disabled") == 1


@pytest.mark.sqlite_only  # no index: the process's own counters
def test_recording_functions_in_process() -> None:
    """Outcomes map to disjoint counters; only deliveries feed the latency histogram."""
    import time

    dest = "unit-test-dest"
    metrics.delivery_result(dest, "success", time.time() - 2)
    metrics.delivery_result(dest, "warning", time.time() - 4)
    metrics.delivery_result(dest, "permanent", time.time())
    metrics.delivery_result(dest, "transient", time.time())
    s = parse(metrics.exposition().decode())
    assert value(s, "dicomrouter_delivered_instances_total", destination=dest) == 1
    assert value(s, "dicomrouter_warning_instances_total", destination=dest) == 1
    assert value(s, "dicomrouter_failed_instances_total", destination=dest) == 1
    assert value(s, "dicomrouter_retried_instances_total", destination=dest) == 1
    assert value(s, "dicomrouter_delivery_latency_seconds_count", destination=dest) == 2
    total = value(s, "dicomrouter_delivery_latency_seconds_sum", destination=dest)
    assert total is not None and 5.9 < total < 7
    assert value(s, "dicomrouter_delivery_latency_seconds_bucket", destination=dest, le="2.5") == 1


@pytest.mark.sqlite_only  # no index: the process's own counters
def test_calling_ae_labels_are_bounded(monkeypatch: Any) -> None:
    """Without an allow-list anyone may call with any title: past MAX_AE_LABELS titles,
    new ones are counted under one label instead of a new series each."""
    monkeypatch.setattr(metrics, "MAX_AE_LABELS", 2)
    monkeypatch.setattr(metrics, "_ae_labels", set())
    for title in ("BOUND_A", "BOUND_B", "BOUND_C", "BOUND_D", "BOUND_A"):
        metrics.instance_received(title, 10)
    s = parse(metrics.exposition().decode())
    assert value(s, "dicomrouter_received_instances_total", calling_ae="BOUND_A") == 2
    assert value(s, "dicomrouter_received_instances_total", calling_ae="BOUND_B") == 1
    assert value(s, "dicomrouter_received_instances_total", calling_ae="BOUND_C") is None
    assert value(s, "dicomrouter_received_instances_total", calling_ae=metrics.OTHER_AE) >= 2
