"""Transcoding throughput: dicomrouter's transcode to JPEG-LS lossless against dcmtk's
``dcmcjpls`` on the same uncompressed files.

Legs, on the same input files and into a fresh output folder each time:

- **dicomrouter**: in one Python process, per file ``dcmread`` → ``transcode(ds,
  JPEG-LS lossless)`` (pyjpegls; includes decoding the result again to check that it
  is lossless, as the sender does) → ``dcmwrite``.
- **dcmcjpls**: ``/usr/bin/dcmcjpls`` (CharLS inside dcmtk), one process per file, as
  a script around dcmtk would run it. Its process start is part of its time.

The legs alternate (which goes first changes every round), and the table gives the
median over the rounds, in instances/s and MB/s of uncompressed input. Each output
is checked once: the JPEG-LS syntax, and pixels equal to the input's.

    PYTHONPATH=src python3 bench/transcode_bench.py --copies 20 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGLSLossless, generate_uid

from dicomrouter.transforms.transcode import transcode

DCMCJPLS = "/usr/bin/dcmcjpls"
#: pydicom's bundled images, decoded to Explicit VR Little Endian first.
SOURCES = {
    "CT 128x128x16 signed": "CT_small.dcm",
    "MR 64x64x16 signed": "MR_small.dcm",
    "NM 256x1024x16 signed": "JPEG2000.dcm",
    "US RGB 320x240, 30 frames": "examples_ybr_color.dcm",
}


def prepare(name: str, folder: Path, copies: int) -> list[Path]:
    """``copies`` uncompressed files of one bundled image, each with its own UID."""
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), name
    folder.mkdir(parents=True)
    files = []
    for n in range(copies):
        ds = dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress(generate_instance_uid=False)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = folder / f"{n:04d}.dcm"
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    return files


def ours(files: list[Path], outdir: Path) -> None:
    for path in files:
        ds = dcmread(path)
        transcode(ds, JPEGLSLossless, allow_lossy=False)
        ds.save_as(outdir / path.name, enforce_file_format=True)


def dcmtk(files: list[Path], outdir: Path) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}
    for path in files:
        subprocess.run([DCMCJPLS, str(path), str(outdir / path.name)], check=True, env=env)


def check(files: list[Path], outdir: Path, leg: str) -> None:
    for path in (files[0], files[-1]):
        out = dcmread(outdir / path.name)
        if out.file_meta.TransferSyntaxUID != JPEGLSLossless:
            raise SystemExit(f"{leg}: {path.name} is {out.file_meta.TransferSyntaxUID}")
        if not np.array_equal(out.pixel_array, dcmread(path).pixel_array):
            raise SystemExit(f"{leg}: {path.name} pixels differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=20, help="files per image")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    legs: dict[str, Callable[[list[Path], Path], None]] = {"dicomrouter": ours, "dcmcjpls": dcmtk}
    scratch = Path(tempfile.mkdtemp(prefix="transcode-bench-"))
    rows = []
    try:
        for label, name in SOURCES.items():
            files = prepare(name, scratch / "in" / name, args.copies)
            size = sum(p.stat().st_size for p in files)
            times: dict[str, list[float]] = {leg: [] for leg in legs}
            for r in range(args.rounds):
                order = list(legs) if r % 2 == 0 else list(reversed(legs))
                for leg in order:
                    outdir = scratch / "out" / f"{name}-{leg}-{r}"
                    outdir.mkdir(parents=True)
                    start = time.perf_counter()
                    legs[leg](files, outdir)
                    times[leg].append(time.perf_counter() - start)
                    if r == 0:
                        check(files, outdir, leg)
                    shutil.rmtree(outdir)
            for leg in legs:
                med = statistics.median(times[leg])
                rows.append((label, leg, len(files) / med, size / med / 1e6, med))
            print(f"done: {label}", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{args.copies} files per image, median of {args.rounds} interleaved rounds\n")
    print("| image | leg | instances/s | MB/s (uncompressed in) | median s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label, leg, ips, mbs, med in rows:
        print(f"| {label} | {leg} | {ips:.1f} | {mbs:.1f} | {med:.3f} |")


if __name__ == "__main__":
    main()
