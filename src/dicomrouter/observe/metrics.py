"""Counters recorded where things happen, across the router's three processes.

The receiver (node process), the dispatch process and the HTTP process each count
what they do. prometheus-client's *multiprocess mode* keeps each process's values
in small memory-mapped files under ``<storage>/.metrics``; the HTTP process merges
them at scrape time (:func:`exposition`). The node process calls
:func:`enable_multiprocess` before it starts the children, which inherit the
environment variable that switches the mode on.

The recording functions are on hot paths (one call per C-STORE), so they do no I/O
and take no lock of ours: a dictionary lookup of the cached labelled child and
prometheus-client's own short lock around an mmap write. Metric objects are built
on first use, never at import, because prometheus-client picks its storage (memory
or mmap) when the first metric is built.

Series (all prefixed ``dicomrouter_``):

- ``received_instances_total{calling_ae}``, ``received_bytes_total{calling_ae}``,
  ``refused_instances_total{calling_ae}``: C-STOREs stored, their size, and refused
  (an instance received twice counts twice; the dashboard's throughput chart counts
  distinct instances, at their latest reception);
- ``delivered_instances_total{destination}`` (success status),
  ``warning_instances_total{destination}`` (delivered with a 0xB... warning),
  ``failed_instances_total{destination}`` (refused for good),
  ``retried_instances_total{destination}`` (transient, sent again later): disjoint;
- ``delivery_latency_seconds{destination}``: histogram, reception to delivery
  (warnings included), for instances delivered by this router;
- ``open_associations{direction="inbound"|"outbound"}``: gauge, summed over live
  processes;
- ``purged_instances_total{kind}``, ``purged_bytes_total``: what retention deleted
  (kind: delivered, unrouted, undelivered).

Queue depth, oldest pending age, destination state and free disk are computed from
the index at scrape time: see :mod:`dicomrouter.observe.collector`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dicomrouter.store.heartbeat import pid_exists

ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Reception-to-delivery latencies: sub-second instance routing up to a day of outage.
LATENCY_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    86400.0,
)


def enable_multiprocess(directory: Path) -> None:
    """Node process, before the children start: empty ``directory`` (values of a
    previous run would be added to this run's) and switch prometheus-client to
    multiprocess mode here and, through the environment, in every child."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(directory)
    from prometheus_client import values

    if _metrics is None:
        # The storage class is chosen when prometheus_client is imported; this process
        # may have imported it before the directory was known. No metric exists yet.
        values.ValueClass = values.get_value_class()


@dataclass
class _Metrics:
    received: Any
    received_bytes: Any
    refused: Any
    delivered: Any
    warning: Any
    failed: Any
    retried: Any
    latency: Any
    associations: Any
    purged: Any
    purged_bytes: Any


_metrics: _Metrics | None = None
_build_lock = threading.Lock()
# Labelled children, cached: ``labels()`` costs more than the increment itself.
_children: dict[tuple[str, str], Any] = {}


_local_registry: Any = None  # this process's metrics, for single-process exposition


def _build() -> _Metrics:
    global _metrics, _local_registry
    with _build_lock:
        if _metrics is not None:
            return _metrics
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # *_created series: noise for this use, and per process

        reg = _local_registry = CollectorRegistry(auto_describe=True)
        ae, dest = ["calling_ae"], ["destination"]
        _metrics = _Metrics(
            received=Counter(
                "dicomrouter_received_instances",
                "C-STOREs received and stored (a copy received again counts again), "
                "by calling AE title.",
                ae,
                registry=reg,
            ),
            received_bytes=Counter(
                "dicomrouter_received_bytes",
                "Bytes of instances received and stored, by calling AE title.",
                ae,
                registry=reg,
            ),
            refused=Counter(
                "dicomrouter_refused_instances",
                "C-STOREs answered with a failure status, by calling AE title.",
                ae,
                registry=reg,
            ),
            delivered=Counter(
                "dicomrouter_delivered_instances",
                "Instances a destination accepted with a success status.",
                dest,
                registry=reg,
            ),
            warning=Counter(
                "dicomrouter_warning_instances",
                "Instances a destination accepted with a warning status (0xB...).",
                dest,
                registry=reg,
            ),
            failed=Counter(
                "dicomrouter_failed_instances",
                "Instances a destination refused for good (not retried).",
                dest,
                registry=reg,
            ),
            retried=Counter(
                "dicomrouter_retried_instances",
                "Instance sends that failed transiently and will be retried.",
                dest,
                registry=reg,
            ),
            latency=Histogram(
                "dicomrouter_delivery_latency_seconds",
                "Time from reception to delivery, per destination.",
                dest,
                buckets=LATENCY_BUCKETS,
                registry=reg,
            ),
            associations=Gauge(
                "dicomrouter_open_associations",
                "DICOM associations open now, inbound (from modalities) and outbound.",
                ["direction"],
                multiprocess_mode="livesum",
                registry=reg,
            ),
            purged=Counter(
                "dicomrouter_purged_instances",
                "Stored instances deleted by retention, by kind (delivered, unrouted, "
                "undelivered), evictions for free space included.",
                ["kind"],
                registry=reg,
            ),
            purged_bytes=Counter(
                "dicomrouter_purged_bytes",
                "Bytes of stored instances deleted by retention.",
                registry=reg,
            ),
        )
        return _metrics


def _child(kind: str, label: str) -> Any:
    key = (kind, label)
    child = _children.get(key)
    if child is None:
        metric = getattr(_metrics or _build(), kind)
        child = _children[key] = metric.labels(label)
    return child


# -- recording (hot paths) ---------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., None])
_failed_once = False


def _never_raise(function: _F) -> _F:
    """A metric must never fail what it measures (a C-STORE already committed, a
    delivery in flight): log the first failure, drop the sample."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> None:
        global _failed_once
        try:
            function(*args, **kwargs)
        except Exception:
            if not _failed_once:
                _failed_once = True
                logging.getLogger("dicomrouter.metrics").exception("cannot record a metric")

    return guarded  # type: ignore[return-value]


#: Distinct calling AE titles given their own label; later ones are counted as
#: ``OTHER_AE``. Without ``dicom.allowed_callers`` anyone may call with any title,
#: and every new label is a new series (and file) forever.
MAX_AE_LABELS = 200
OTHER_AE = "_other"
_ae_labels: set[str] = set()


def _ae_label(calling_ae: str) -> str:
    if calling_ae in _ae_labels:
        return calling_ae
    if len(_ae_labels) >= MAX_AE_LABELS:
        return OTHER_AE
    _ae_labels.add(calling_ae)
    return calling_ae


@_never_raise
def instance_received(calling_ae: str, size: int) -> None:
    """An instance was stored and indexed (called before the C-STORE-RSP)."""
    label = _ae_label(calling_ae)
    _child("received", label).inc()
    _child("received_bytes", label).inc(size)


@_never_raise
def instance_refused(calling_ae: str) -> None:
    """A C-STORE was answered with a failure status."""
    _child("refused", _ae_label(calling_ae)).inc()


# Keyed by ``destinations.Outcome`` values (a StrEnum): importing it here would make
# the receiver depend on the delivery package.
_BY_OUTCOME = {
    "success": "delivered",
    "warning": "warning",
    "permanent": "failed",
    "transient": "retried",
}


@_never_raise
def delivery_result(destination: str, outcome: str, received_at: float | None) -> None:
    """One instance's ``destinations.Outcome`` at a destination; ``received_at``
    (POSIX seconds) feeds the latency histogram when it arrived."""
    kind = _BY_OUTCOME[outcome]
    _child(kind, destination).inc()
    if received_at and kind in ("delivered", "warning"):
        _child("latency", destination).observe(max(time.time() - received_at, 0.0))


@_never_raise
def association_opened(direction: str) -> None:
    """An association was established (by our acceptor or our requestor)."""
    _child("associations", direction).inc()


@_never_raise
def association_closed(direction: str) -> None:
    """An association counted by :func:`association_opened` ended."""
    _child("associations", direction).dec()


@_never_raise
def purge_recorded(by_kind: dict[str, int], size: int) -> None:
    """A retention run deleted ``by_kind`` instances (``size`` bytes in all)."""
    if not by_kind:
        return
    for kind, count in by_kind.items():
        _child("purged", kind).inc(count)
    (_metrics or _build()).purged_bytes.inc(size)


# -- exposition (HTTP process) -----------------------------------------------------

_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


class _MergedFiles:
    """MultiProcessCollector over the files of this run, minus the ``live*`` gauge
    files of processes that died (a restarted dispatch process must not count the
    associations of its predecessor forever)."""

    def __init__(self, path: str):
        self.path = path

    def collect(self) -> Any:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = []
        for entry in sorted(os.listdir(self.path)):
            if not entry.endswith(".db"):
                continue
            live = _LIVE_FILE.match(entry)
            if live and not pid_exists(int(live.group(1))):
                continue
            files.append(os.path.join(self.path, entry))
        return MultiProcessCollector.merge(files, accumulate=True)


def exposition(*extra_collectors: Any) -> bytes:
    """The Prometheus text of every process's metrics plus ``extra_collectors``
    (computed now, e.g. from the index)."""
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    directory = os.environ.get(ENV)
    if directory and os.path.isdir(directory):
        reg.register(_MergedFiles(directory))
    else:
        _build()
        reg.register(_LocalMetrics())
    for collector in extra_collectors:
        reg.register(collector)
    return generate_latest(reg)  # type: ignore[no-any-return]


class _LocalMetrics:
    """This process's own metrics (single-process runs and in-process tests)."""

    def collect(self) -> Any:
        return _local_registry.collect() if _local_registry is not None else iter(())
