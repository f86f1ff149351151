"""S3 upload throughput: dicomrouter's S3 sender against boto3's ``upload_file`` (what
``aws s3 cp`` does) on the same files, to a local S3 server.

The server is moto's server mode (``python -m moto.server``, from the ``[test]``
extras) in a process of its own, so it does not share this process's interpreter
lock. It keeps objects in memory and checks nothing, so the numbers say what the
client side costs, not what a real store does.

Legs, each into a fresh bucket, on the same files:

- **dicomrouter**: one :class:`~dicomrouter.destinations.s3.S3Sender` (one worker,
  ``max_workers: 1``) sends the whole batch: per instance a header read for the
  layout, Content-MD5 and SHA-256 of each body, the answer checked; parts of 5 MB
  and up in order on one connection.
- **dicomrouter x4**: four senders in four threads, a quarter of the files each (the
  dispatcher's ``max_workers: 4``).
- **upload_file**: ``client.upload_file`` per file, one after the other, boto3's
  defaults (multipart from 8 MB, 8 MB parts, up to 10 parts in parallel, CRC32
  checksums); the keys are the same as ours.
- **upload_file x4**: the same in four threads.

Datasets: **large**, N CT instances of 512×512×16 bit (525 KB, one PUT each), and
**huge**, a few 40 MB instances (multipart: 8 parts of 5 MB for us, 5 of 8 MB for
boto3's defaults). The legs alternate within each round (the first changes every
round); the table gives the median over the rounds in MB/s (10^6 bytes of files).

    PYTHONPATH=src python3 bench/s3_bench.py --files 200 --huge 3 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.support when run as a script

from pydicom import dcmread  # noqa: E402

from dicomrouter.config import S3DestinationConfig  # noqa: E402
from dicomrouter.destinations.s3 import S3Sender  # noqa: E402
from tests.support.outgoing import outgoing  # noqa: E402
from tests.support.s3 import KEY_ID, REGION, SECRET, MotoS3Process, client  # noqa: E402
from tests.support.synth import make_study  # noqa: E402

LAYOUT = "{StudyInstanceUID}/{SOPInstanceUID}.dcm"
LEGS = ("dicomrouter", "dicomrouter x4", "upload_file", "upload_file x4")


def huge_files(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` instances of about ``size`` bytes (random pixel data)."""
    files = make_study(folder, count, rows=512, cols=512, prefix="HUGE")
    for path in files:
        ds = dcmread(path)
        extra = size - path.stat().st_size
        ds.PixelData = ds.PixelData + os.urandom(extra - extra % 2)
        ds.save_as(path, enforce_file_format=True)
    return files


def keys_of(files: list[Path]) -> list[str]:
    """The same keys as LAYOUT renders, for the reference legs."""
    keys = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        keys.append(f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm")
    return keys


def in_threads(parts: list[Any], work: Callable[[Any], None]) -> None:
    errors: list[BaseException] = []

    def run(part: Any) -> None:
        try:
            work(part)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(part,)) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def leg(
    name: str, url: str, bucket: str, files: list[Path], keys: list[str], batch: list[Any]
) -> None:
    """Upload ``files``; ``batch`` is them as the dispatcher hands them (UIDs known)."""
    threads = 4 if name.endswith("x4") else 1
    parts = [list(range(k, len(files), threads)) for k in range(threads)]
    if name.startswith("dicomrouter"):
        config = S3DestinationConfig(
            type="s3",
            bucket=bucket,
            endpoint_url=url,
            region=REGION,
            layout=LAYOUT,
            addressing_style="path",
            multipart_threshold="16MB",
            multipart_chunk_size="5MB",
        )

        def ours(indexes: list[int]) -> None:
            sender = S3Sender(config)
            results = sender.send([batch[i] for i in indexes])
            bad = [r for r in results if not r.outcome.delivered]
            if bad or len(results) != len(indexes):
                raise RuntimeError(f"not uploaded: {bad[:3]}")
            sender.close()

        in_threads(parts, ours)
    else:

        def reference(indexes: list[int]) -> None:
            s3 = client(url)
            for i in indexes:
                s3.upload_file(str(files[i]), bucket, keys[i])

        in_threads(parts, reference)


def check(url: str, bucket: str, files: list[Path], keys: list[str]) -> None:
    """Every object is there with its size (and the first one byte for byte)."""
    s3 = client(url)
    sizes: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        sizes.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    expected = {key: path.stat().st_size for key, path in zip(keys, files, strict=True)}
    if sizes != expected:
        raise RuntimeError(f"bucket {bucket}: {len(sizes)} objects, {len(expected)} expected")
    first = s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read()
    if first != files[0].read_bytes():
        raise RuntimeError(f"{keys[0]} differs from {files[0]}")


def measure(url: str, files: list[Path], rounds: int) -> dict[str, list[float]]:
    keys, batch = keys_of(files), outgoing(files)
    seconds: dict[str, list[float]] = {name: [] for name in LEGS}
    s3 = client(url)
    for n in range(rounds):
        order = LEGS[n % len(LEGS) :] + LEGS[: n % len(LEGS)]
        for name in order:
            bucket = f"bench-{uuid.uuid4().hex[:16]}"
            s3.create_bucket(Bucket=bucket)
            os.sync()
            start = time.perf_counter()
            leg(name, url, bucket, files, keys, batch)
            seconds[name].append(time.perf_counter() - start)
            check(url, bucket, files, keys)
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for item in page.get("Contents", []):
                    s3.delete_object(Bucket=bucket, Key=item["Key"])
            s3.delete_bucket(Bucket=bucket)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200, help="525 KB instances")
    parser.add_argument("--huge", type=int, default=3, help="40 MB instances")
    parser.add_argument("--huge-mb", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
    report: dict[str, Any] = {"rounds": args.rounds, "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="s3-bench-") as tmp, MotoS3Process({}) as server:
        datasets = {}
        if args.files:
            datasets["large"] = make_study(Path(tmp) / "large", args.files, rows=512, cols=512)
        if args.huge:
            datasets["huge"] = huge_files(Path(tmp) / "huge", args.huge, args.huge_mb << 20)
        print(f"{'dataset':<8} {'files':>5} {'MB':>7}  " + "  ".join(f"{n:>15}" for n in LEGS))
        for name, files in datasets.items():
            seconds = measure(server.url, files, args.rounds)
            megabytes = sum(p.stat().st_size for p in files) / 1e6
            rates = {leg: megabytes / statistics.median(s) for leg, s in seconds.items()}
            cells = "  ".join(f"{rates[n]:>10.1f} MB/s" for n in LEGS)
            print(f"{name:<8} {len(files):>5} {megabytes:>7.1f}  {cells}")
            report["datasets"][name] = {
                "files": len(files),
                "megabytes": megabytes,
                "seconds": seconds,
                "median_mb_s": rates,
            }
    print(f"(medians of {args.rounds} rounds; load average {os.getloadavg()[0]:.2f})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
