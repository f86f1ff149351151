"""The benchmark script runs end to end on a tiny dataset, so a change to the router,
to the test peers or to the script itself cannot leave ``bench/run_bench.py``
broken until the next time someone measures. Speed is not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import run_bench  # noqa: E402


def test_split_gives_each_sender_consecutive_files_and_loses_none(tmp_path: Path) -> None:
    for k in range(10):
        (tmp_path / f"IMG{k:02d}.dcm").write_bytes(b"x")
    parts = run_bench.split(tmp_path, 3)
    names = [sorted(p.name for p in part.iterdir()) for part in parts]
    assert [len(n) for n in names] == [3, 3, 4]
    assert sum(names, []) == [f"IMG{k:02d}.dcm" for k in range(10)]
    assert run_bench.split(tmp_path, 1) == [tmp_path]


def test_every_leg_runs_with_two_senders(tmp_path: Path, dcmtk: None, orthanc_bin: str) -> None:
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_bench.py"), "--small", "12", "--large", "0"]
        + ["--repeats", "1", "--senders", "2", "--workdir", str(tmp_path)]
        + ["--json", str(report), "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    payload = json.loads(report.read_text())
    assert payload["senders"] == 2
    (dataset,) = payload["datasets"]
    assert dataset["instances"] == 12
    # by default every leg runs, the TLS ones included (storescu +tls to the router's
    # dicom.tls listener, and storescu +tls to storescp +tls)
    assert list(dataset["legs"]) == ["direct", "orthanc", "router", "router_tls", "direct_tls"]
    for leg, outcome in dataset["legs"].items():
        assert outcome["status"] == "ok", (leg, outcome)
        assert len(outcome["seconds"]) == 1 and outcome["seconds"][0] > 0
    ratios = payload["ratios"][dataset["name"]]
    median = {leg: outcome["median_s"] for leg, outcome in dataset["legs"].items()}
    assert ratios["router/direct"] == pytest.approx(median["direct"] / median["router"])
    assert ratios["router_tls/router"] == pytest.approx(median["router"] / median["router_tls"])
    assert ratios["direct_tls/direct"] == pytest.approx(median["direct"] / median["direct_tls"])
    assert payload["machine"]["dicomrouter"].startswith(str(ROOT / "src"))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("dicomrouter-bench-")]
    assert leftovers == []  # the scratch folder is removed


def _bench(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_transforms_bench_runs_every_leg_on_a_few_files(dcmtk: None) -> None:
    """bench/transforms_bench.py on 3 files, 1 round. dicognito is a bench-only tool:
    where it is not installed, the leg is skipped on purpose, and the script says so."""
    import transforms_bench

    args = ["--files", "3", "--rounds", "1", "--quick"]
    absent = transforms_bench.dicognito_missing(transforms_bench.DEFAULT_DICOGNITO_LIB)
    if absent:
        args.append("--no-dicognito")
    out = _bench("transforms_bench.py", *args).stdout
    assert "| dataset | leg | instances/s | MB/s | median s | runs (s) |" in out
    legs = ["dicomrouter coercion", "dcmodify", "dicomrouter deidentify"]
    for dataset in ("synthetic CT 512x512x16", "pydicom test files"):
        for leg in legs:
            assert any(
                line.startswith(f"| {dataset}") and f"| {leg} |" in line
                for line in out.splitlines()
            ), (dataset, leg, out)
    if absent:
        assert "dicognito leg skipped: --no-dicognito given" in out
        assert "| dicognito |" not in out
    else:
        assert "| dicognito |" in out


def test_transform_memory_bench_routes_a_small_study_both_ways(dcmtk: None) -> None:
    """bench/transform_memory_bench.py on a 10 MB study: both legs run, every
    instance arrives (with the new tags through the pipeline), RSS is reported."""
    out = _bench("transform_memory_bench.py", "--size-gb", "0.01", "--rounds", "1").stdout
    assert "| 1 | byte-for-byte |" in out and "| 1 | tag-only pipeline |" in out
    assert "throughput pipeline / byte-for-byte" in out
    assert "- tag-only pipeline: 20/20 arrived, new tags in all, pixels equal in 20" in out
    assert "- byte-for-byte: 20/20 arrived, original tags in all" in out


def test_s3_bench_runs_every_leg_on_a_few_files(tmp_path: Path) -> None:
    """bench/s3_bench.py on 3 small and one multipart file, 1 round: every leg
    uploads everything (the script checks the bucket after each leg)."""
    report = tmp_path / "s3.json"
    _bench(
        "s3_bench.py",
        *("--files", "3", "--huge", "1", "--huge-mb", "6", "--rounds", "1"),
        *("--json", str(report)),
    )
    payload = json.loads(report.read_text())
    assert set(payload["datasets"]) == {"large", "huge"}
    for dataset in payload["datasets"].values():
        assert set(dataset["median_mb_s"]) == {
            "dicomrouter",
            "dicomrouter x4",
            "upload_file",
            "upload_file x4",
        }
        assert all(rate > 0 for rate in dataset["median_mb_s"].values())
