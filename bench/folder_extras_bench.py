"""What the extras of a folder destination cost: instances written per second by a
FolderSender without extras, with PNG or JPEG previews, and as a file-set with a
DICOMDIR; and the time to rebuild one study's DICOMDIR, cold (every file read) and
warm (the sender's records kept from the batch before).

Legs, each on the same synthetic study (64x64 16-bit CT, 4 series) written into a
fresh folder in one batch, median over the rounds (the legs alternate):

    PYTHONPATH=src:. python3 bench/folder_extras_bench.py --instances 1000 --rounds 3

Every write is synced (fsync of the file and its folder), as the router does: on a
shared or slow disk that dominates the plain leg.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from dicomrouter.config import FolderDestinationConfig
from dicomrouter.destinations.dicomdir import write_dicomdir
from dicomrouter.destinations.folder import FolderSender
from tests.support.outgoing import outgoing
from tests.support.synth import make_study

LEGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "render png": {"render": "png"},
    "render jpeg": {"render": "jpeg"},
    "dicomdir": {"dicomdir": True},
    "all extras": {"render": "png", "extract_documents": True, "dicomdir": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="folder-extras-bench-"))
    files = make_study(work / "in", args.instances, series_count=4, patient_id="BENCH")
    batch = outgoing(files)
    rates: dict[str, list[float]] = {name: [] for name in LEGS}
    cold: list[float] = []
    warm: list[float] = []
    for round_ in range(args.rounds):
        names = list(LEGS)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            out = work / "out" / f"{round_}-{name.replace(' ', '-')}"
            out.mkdir(parents=True)
            sender = FolderSender(FolderDestinationConfig(type="folder", path=out, **LEGS[name]))
            start = time.perf_counter()
            results = sender.send(batch)
            elapsed = time.perf_counter() - start
            assert len(results) == len(batch) and all(r.outcome.delivered for r in results)
            rates[name].append(len(batch) / elapsed)
            if name == "dicomdir":
                (dicomdir,) = out.rglob("DICOMDIR")
                known: dict[Path, Any] = {}
                start = time.perf_counter()
                write_dicomdir(dicomdir.parent, _write, known)
                cold.append(time.perf_counter() - start)
                start = time.perf_counter()
                write_dicomdir(dicomdir.parent, _write, known)
                warm.append(time.perf_counter() - start)
            shutil.rmtree(out)
    print(f"{args.instances} instances, median of {args.rounds} rounds")
    print("| leg | instances/s |\n| --- | --- |")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.0f} |")
    print(f"DICOMDIR rebuild, cold: {statistics.median(cold):.2f} s")
    print(f"DICOMDIR rebuild, warm: {statistics.median(warm):.2f} s")
    if args.workdir is None:
        shutil.rmtree(work)


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


if __name__ == "__main__":
    main()
