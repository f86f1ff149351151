"""``bench/purge_bench.py`` runs end to end on a tiny store, so neither the purge nor
the script can rot between two measurements. Speed is not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_purge_benchmark_runs_both_parts(tmp_path: Path, dcmtk: None) -> None:
    report = tmp_path / "purge.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "purge_bench.py"), "--objects", "300"]
        + ["--group", "200", "--repeats", "1", "--instances", "3"]
        + ["--workdir", str(tmp_path), "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    payload = json.loads(report.read_text())
    cost = payload["cost"]
    assert cost["objects"] == 300 and cost["purge_s"] > 0 and cost["history_rows"] > 0
    latency = payload["latency"]
    assert len(latency["baseline_ms_per_instance"]) == 1
    assert len(latency["during_purge_ms_per_instance"]) == 1
    assert latency["purges"][0]["purged"] == 200
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("dicomrouter-purge-")]
    assert leftovers == []  # the scratch folder is removed
