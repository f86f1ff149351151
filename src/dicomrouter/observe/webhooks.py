"""The JSON POST that alerts (observe/alerts.py) and event notifications
(observe/notify.py) share: stdlib only, a timeout per attempt, ``retries`` retries with
doubling delays."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dicomrouter import __version__
from dicomrouter.config.models import WebhookConfig

log = logging.getLogger("dicomrouter.alerts")


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Delivery:
    """What became of one POST: sent, or the last error after every retry."""

    ok: bool
    attempts: int
    error: str | None = None
    status: int | None = None


def post_json(
    webhook: WebhookConfig, payload: dict[str, Any], stop: threading.Event | None = None
) -> Delivery:
    """POST ``payload``; retry on a connection error, a timeout or a non-2xx answer,
    after ``retry_delay``, doubled each time. ``stop`` cuts the waits short."""
    body = json.dumps(payload, default=str).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"dicomrouter/{__version__}",
        **webhook.headers,
    }
    delay = webhook.retry_delay
    error: str | None = None
    status: int | None = None
    for attempt in range(1, webhook.retries + 2):
        request = urllib.request.Request(webhook.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=webhook.timeout) as response:
                status = int(response.status)
            return Delivery(True, attempt, None, status)
        except urllib.error.HTTPError as exc:  # non-2xx (urllib follows redirects)
            status, error = exc.code, f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            status, error = None, str(getattr(exc, "reason", exc))
        if attempt <= webhook.retries:
            log.info("alert webhook %s: %s; retrying in %gs", webhook.url, error, delay)
            if stop is not None and stop.wait(delay):
                return Delivery(False, attempt, f"{error} (stopped)", status)
            if stop is None:
                time.sleep(delay)
            delay *= 2
    return Delivery(False, webhook.retries + 1, error, status)
