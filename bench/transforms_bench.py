#!/usr/bin/env python
"""Transform throughput: dicomrouter's tag coercion and de-identification against
dcmtk's ``dcmodify`` and dicognito, on the same files.

Legs, each on the same input files, into (or, for dcmodify, on) a fresh copy each
round:

- **dicomrouter coercion**: in one Python process, per file
  ``transformed_copy(source, [pipeline], context, outdir)`` (what the dispatch worker
  runs before each send) with a tag-only pipeline: ``set`` InstitutionName,
  ``replace`` AccessionNumber ``^0+`` → ``""``, ``remove`` OperatorsName. Only the
  header is parsed; the pixel data is copied raw (``os.sendfile``), never decoded.
- **dcmodify**: ``/usr/bin/dcmodify -nb -ma "(0008,0080)=General Hospital" -ma
  "(0008,0050)=123" -ea "(0008,1070)" FILE...``: the same three changes (dcmodify has
  no regex, so the accession gets the value the regex gives), *one* process for all
  the files of a dataset (its start, ~10 ms, is in its time). dcmodify edits in place:
  each round it works on a fresh copy of the inputs, made before the clock starts
  (``shutil.copyfile``, timed apart and shown as its own row: creating a new file
  costs ~0.7 ms on our disk, and dcmodify rewrites existing files in place, while
  every other leg creates one new file per output).
- **dicomrouter deidentify**: ``transformed_copy`` with ``[{deidentify: {secret_env:
  S}}]`` (PS3.15 Annex E basic profile, HMAC pseudonyms), header only as above.
- **dicognito**: ``python3 -m dicognito --quiet --seed S -o OUTDIR INDIR`` (one
  process per dataset; its Python start and imports, ~0.3 s, are in its time).
  dicognito reads and writes every file whole (pixels as bytes, not decoded). It is
  a bench-only reference tool, not a dependency: ``pip install --target
  /tmp/dicognito-lib dicognito`` (``--dicognito-lib`` points elsewhere). If it is
  not importable the leg is skipped with a note; ``--no-dicognito`` skips it on
  purpose.

Our legs run in-process with the pipeline compiled once (as the router compiles it
once per configuration); they pay no interpreter start. Neither side fsyncs.

Datasets (``--files`` each): synthetic CT 512×512×16 (~525 KB), synthetic MR
256×256×16 (~132 KB), synthetic CT 64×64×16 (~9.4 KB: header-dominated), and a mix of
pydicom's test files (Explicit and Implicit VR, JPEG 2000 and RLE encapsulated,
multi-frame RT dose, an MR with overlays), cycled to ``--files``. Every input first
gets InstitutionName, AccessionNumber ``000123`` and OperatorsName, so every leg has
the same work to do.

Rounds alternate the order of the legs; the table gives the median over the rounds,
instances/s and MB/s (10^6 bytes of input files). The outputs of the first round
are checked: the changed tags, and Pixel Data byte-equal to the input's.

    PYTHONPATH=src python3 bench/transforms_bench.py --files 100 --rounds 5
    PYTHONPATH=src python3 bench/transforms_bench.py --files 3 --rounds 1 --no-dicognito
    PYTHONPATH=src python3 bench/transforms_bench.py --profile "dicomrouter deidentify"
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.support when run as a script

from dicomrouter.config import RouterConfig  # noqa: E402
from dicomrouter.transforms import (  # noqa: E402
    CompiledPipeline,
    ObjectContext,
    compile_pipeline,
    transformed_copy,
)
from tests.support.synth import make_study  # noqa: E402

DCMODIFY = "/usr/bin/dcmodify"
DEFAULT_DICOGNITO_LIB = "/tmp/dicognito-lib"
SECRET_ENV = "BENCH_DEID_SECRET"
SECRET = "transforms-bench-secret-not-for-production"
MB = 1_000_000

COERCION = [
    {"set": {"InstitutionName": "General Hospital"}},
    {"replace": {"AccessionNumber": {"pattern": "^0+", "with": ""}}},
    {"remove": ["OperatorsName"]},
]
DCMODIFY_ARGS = ["-nb", "-ma", "(0008,0080)=General Hospital", "-ma", "(0008,0050)=123"]
DCMODIFY_ARGS += ["-ea", "(0008,1070)"]
DEIDENTIFY = [{"deidentify": {"secret_env": SECRET_ENV}}]

#: pydicom's bundled files of the "pydicom mix" dataset (no ultrasound or secondary
#: capture: de-identification refuses those, their pixels may show identity).
PYDICOM_FILES = [
    "CT_small.dcm",  # Explicit VR LE, 128x128
    "MR_small_implicit.dcm",  # Implicit VR LE
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless, encapsulated
    "MR_small_RLE.dcm",  # RLE, encapsulated
    "rtdose.dcm",  # Implicit VR LE, 15 frames
    "examples_overlay.dcm",  # MR with an overlay plane (group 6000)
]


@dataclass
class Dataset_:
    label: str
    files: list[Path]
    size: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs


def _tag_inputs(paths: list[Path], new_uids: bool = False) -> None:
    """Give every input the elements the legs change, rewriting it in place; with
    ``new_uids``, a SOP Instance UID of its own too (dicognito names its outputs by
    the new SOP Instance UID: copies of one file would overwrite each other)."""
    for path in paths:
        ds = dcmread(path)
        if new_uids:
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstitutionName = "Old Hospital"
        ds.AccessionNumber = "000123"
        ds.OperatorsName = "Tech^One"
        ds.save_as(path, enforce_file_format=True)


def prepare(scratch: Path, files: int, quick: bool) -> list[Dataset_]:
    sets: list[Dataset_] = []
    synth = [
        ("synthetic CT 512x512x16 (~525 KB)", {"rows": 512, "cols": 512, "modality": "CT"}),
        ("synthetic MR 256x256x16 (~132 KB)", {"rows": 256, "cols": 256, "modality": "MR"}),
        ("synthetic CT 64x64x16 (~9.4 KB)", {"rows": 64, "cols": 64, "modality": "CT"}),
    ]
    if quick:
        synth = synth[:1]
    for n, (label, options) in enumerate(synth):
        folder = scratch / "in" / f"synth{n}"
        paths = make_study(folder, files, **options, patient_name="DOE^JANE")
        _tag_inputs(paths)
        sets.append(Dataset_(label, paths))
    folder = scratch / "in" / "pydicom"
    folder.mkdir(parents=True)
    paths = []
    for n in range(files):
        name = PYDICOM_FILES[n % len(PYDICOM_FILES)]
        source = get_testdata_file(name, download=False)
        if not isinstance(source, str):
            raise SystemExit(f"pydicom test file {name} not found")
        paths.append(folder / f"{n:05d}-{name}")
        shutil.copyfile(source, paths[-1])
    _tag_inputs(paths, new_uids=True)
    sets.append(Dataset_(f"pydicom test files ({len(PYDICOM_FILES)} kinds, cycled)", paths))
    for ds in sets:
        ds.size = sum(p.stat().st_size for p in ds.files)
    return sets


# --------------------------------------------------------------------------- legs


def compile_steps(steps: list[dict[str, object]], name: str) -> CompiledPipeline:
    config = RouterConfig.model_validate({"transforms": {name: steps}})
    return compile_pipeline(name, config.transforms[name], {SECRET_ENV: SECRET})


def ours(pipeline: CompiledPipeline) -> Callable[[list[Path], Path], None]:
    context = ObjectContext(calling_ae="MODALITY", called_ae="DICOMROUTER")

    def run(files: list[Path], outdir: Path) -> None:
        for path in files:
            transformed_copy(path, [pipeline], context, outdir)

    return run


def dcmodify(files: list[Path], outdir: Path) -> None:
    """In place, on the copies in ``outdir`` (made before the clock started)."""
    targets = [str(outdir / p.name) for p in files]
    env = {**os.environ, "TCP_NODELAY": "1"}
    result = subprocess.run([DCMODIFY, *DCMODIFY_ARGS, *targets], env=env, capture_output=True)
    if result.returncode != 0:
        raise SystemExit(f"dcmodify failed ({result.returncode}): {result.stderr[-500:]!r}")


def dicognito_env(lib: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (lib, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def dicognito_missing(lib: str) -> str | None:
    """Why dicognito cannot run, or None."""
    result = subprocess.run(
        [sys.executable, "-c", "import dicognito, sys; print(dicognito.__version__)"],
        env=dicognito_env(lib),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return "not importable"
    return None


def dicognito_version(lib: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", "import dicognito; print(dicognito.__version__)"],
        env=dicognito_env(lib),
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def dicognito(lib: str) -> Callable[[list[Path], Path], None]:
    def run(files: list[Path], outdir: Path) -> None:
        indir = files[0].parent
        command = [sys.executable, "-m", "dicognito", "--quiet", "--seed", SECRET]
        command += ["-o", str(outdir), str(indir)]
        result = subprocess.run(command, env=dicognito_env(lib), capture_output=True)
        if result.returncode != 0:
            raise SystemExit(f"dicognito failed ({result.returncode}): {result.stderr[-800:]!r}")

    return run


IN_PLACE = {"dcmodify"}


def startup_seconds(command: list[str], env: dict[str, str] | None = None) -> float:
    """Median wall time of ``command`` (a ``--version``): what a reference tool's
    process start and imports cost once per invocation."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(command, env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- checks


def _pixels(path: Path) -> bytes | None:
    ds = dcmread(path)
    return bytes(ds.PixelData) if "PixelData" in ds else None


def check(dataset: Dataset_, leg: str, outdir: Path) -> None:
    outputs = sorted(p for p in outdir.rglob("*") if p.is_file())
    if len(outputs) != len(dataset.files):
        raise SystemExit(
            f"{leg}: {dataset.label}: {len(outputs)} outputs for {len(dataset.files)} inputs"
        )
    source_pixels = {_pixels(p) for p in dataset.files}
    for out in outputs:
        ds = dcmread(out)
        where = f"{leg}: {dataset.label}: {out.name}"
        if "coercion" in leg or leg == "dcmodify":
            if (ds.InstitutionName, ds.AccessionNumber) != ("General Hospital", "123"):
                raise SystemExit(f"{where}: {ds.InstitutionName!r} {ds.AccessionNumber!r}")
            if "OperatorsName" in ds:
                raise SystemExit(f"{where}: OperatorsName kept")
        else:
            if str(ds.get("PatientName", "")) in ("DOE^JANE", "Tech^One") or ds.get(
                "InstitutionName"
            ) in ("Old Hospital",):
                raise SystemExit(f"{where}: identity kept")
        if "PixelData" in ds and bytes(ds.PixelData) not in source_pixels:
            raise SystemExit(f"{where}: Pixel Data differs from every input's")


# --------------------------------------------------------------------------- run


def profile(leg: str, legs: dict[str, Callable[[list[Path], Path], None]], ds: Dataset_) -> None:
    outdir = Path(tempfile.mkdtemp(prefix="transforms-profile-"))
    try:
        profiler = cProfile.Profile()
        profiler.enable()
        legs[leg](ds.files, outdir)
        profiler.disable()
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(f"\n## cProfile of {leg!r} on {ds.label}, by own time\n")
    print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100, help="files per dataset")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one synthetic dataset only")
    parser.add_argument("--no-dicognito", action="store_true", help="skip the dicognito leg")
    parser.add_argument("--dicognito-lib", default=DEFAULT_DICOGNITO_LIB)
    parser.add_argument("--profile", metavar="LEG", help="cProfile one of our legs, then exit")
    args = parser.parse_args(argv)

    legs: dict[str, Callable[[list[Path], Path], None]] = {
        "dicomrouter coercion": ours(compile_steps(COERCION, "coercion")),
        "dcmodify": dcmodify,
        "dicomrouter deidentify": ours(compile_steps(DEIDENTIFY, "deid")),
    }
    notes = []
    if not Path(DCMODIFY).exists():
        del legs["dcmodify"]
        notes.append(f"dcmodify leg skipped: {DCMODIFY} not found (apt-get install dcmtk)")
    missing = "--no-dicognito given" if args.no_dicognito else dicognito_missing(args.dicognito_lib)
    if missing is None:
        legs["dicognito"] = dicognito(args.dicognito_lib)
        notes.append(f"dicognito {dicognito_version(args.dicognito_lib)} from {args.dicognito_lib}")
    else:
        notes.append(
            f"dicognito leg skipped: {missing} (install it for the bench only: "
            f"pip install --target {DEFAULT_DICOGNITO_LIB} dicognito)"
        )
    if "dcmodify" in legs:
        start = startup_seconds([DCMODIFY, "--version"])
        notes.append(f"process start: `dcmodify --version` takes {start * 1000:.0f} ms")
    if "dicognito" in legs:
        command = [sys.executable, "-m", "dicognito", "--version"]
        start = startup_seconds(command, dicognito_env(args.dicognito_lib))
        notes.append(f"process start: `python3 -m dicognito --version` takes {start * 1000:.0f} ms")
    for note in notes:
        print(note, file=sys.stderr)

    scratch = Path(tempfile.mkdtemp(prefix="transforms-bench-"))
    try:
        datasets = prepare(scratch, args.files, args.quick)
        if args.profile:
            for ds in datasets:
                profile(args.profile, legs, ds)
            return 0
        for r in range(args.rounds):
            order = list(legs) if r % 2 == 0 else list(reversed(legs))
            for ds in datasets:
                for leg in order:
                    outdir = scratch / "out" / f"r{r}-{leg.replace(' ', '-')}"
                    outdir.mkdir(parents=True)
                    if leg in IN_PLACE:
                        os.sync()
                        start = time.perf_counter()
                        for path in ds.files:
                            shutil.copyfile(path, outdir / path.name)
                        copying = time.perf_counter() - start
                        ds.times.setdefault(f"(copying the files for {leg})", []).append(copying)
                    os.sync()  # no leg pays for the previous leg's writeback
                    start = time.perf_counter()
                    legs[leg](ds.files, outdir)
                    ds.times.setdefault(leg, []).append(time.perf_counter() - start)
                    if r == 0:
                        check(ds, leg, outdir)
                    shutil.rmtree(outdir)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{args.files} files per dataset, median of {args.rounds} interleaved rounds\n")
    for note in notes:
        print(f"- {note}")
    print()
    print("| dataset | leg | instances/s | MB/s | median s | runs (s) |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for ds in datasets:
        for leg, times in ds.times.items():
            med = statistics.median(times)
            runs = " ".join(f"{t:.3f}" for t in times)
            print(
                f"| {ds.label} | {leg} | {len(ds.files) / med:.1f} | {ds.size / med / MB:.1f} "
                f"| {med:.3f} | {runs} |"
            )
    pairs = [("dicomrouter coercion", "dcmodify"), ("dicomrouter deidentify", "dicognito")]
    print("\n| dataset | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |")
    print("| --- | " + " | ".join("---:" for _ in pairs) + " |")
    for ds in datasets:
        cells = []
        for ours_leg, theirs in pairs:
            if ours_leg not in ds.times or theirs not in ds.times:
                cells.append("—")
                continue
            mine, other = ds.times[ours_leg], ds.times[theirs]
            pooled = statistics.median(other) / statistics.median(mine)
            paired = statistics.median(b / a for a, b in zip(mine, other, strict=True))
            cells.append(f"{pooled:.2f} (paired {paired:.2f})")
        print(f"| {ds.label} | " + " | ".join(cells) + " |")
    print(
        "\n(throughput ratios: above 1 = dicomrouter faster; pooled = ratio of the medians, "
        "paired = median of the per-round ratios, each round's legs run back to back)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
