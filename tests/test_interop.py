"""Transfer-syntax interoperability: dcmtk storescu -> dicomrouter -> dcmtk storescp and Orthanc.

The inputs are pydicom's bundled test files, one representative per transfer syntax
with distinct SOP Instance UIDs. Two syntaxes need a copy: the bundled RLE files share
their UIDs with the JPEG lossless / JPEG-LS samples (copy with a fresh SOP UID), and the
JPEG-LS near-lossless files have no Study/Series Instance UID, which the router rightly
refuses (copy with those UIDs added). Pixel data is never touched.
What "arrives identical" means: dcmtk's storescu re-encodes a dataset when it sends it
(group lengths, padding, ...), so the original file is not the oracle. The oracle is
what storescu really put on the wire, captured by a bit-preserving storescp that
storescu talks to *directly* (no router). The router must then be transparent: what
storescp receives through the router has the same dataset bytes, and what Orthanc
stores through the router has the same elements (group 0002 aside), pixel data included.

A second test checks the router's fallback for a destination that accepts only
uncompressed syntaxes: compressed inputs arrive decoded as Explicit VR Little Endian
with pixels equal to pydicom's decoding of the original.
"""

from __future__ import annotations

import functools
import struct
import subprocess
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from pydicom import dcmread
from pydicom import uid as U
from pydicom.data import data_manager, download, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support import require_peers
from tests.support.dcmtk import HOST, StoreSCP, dcmtk_env, dcmtk_tool, free_port
from tests.support.orthanc import Orthanc
from tests.support.router import RouterProcess, all_settled, wait_until

pytestmark = pytest.mark.interop


#: storescu proposes only uncompressed syntaxes by default and cannot send a compressed
#: file without a matching context, so each syntax gets the option that proposes it.
#: ``-xi``/``-xe``/``-xb`` keep implicit, explicit LE and explicit BE files as they are
#: (by default storescu would convert implicit VR files to explicit VR).
STORESCU_OPTION: dict[str, str] = {
    U.ImplicitVRLittleEndian: "-xi",
    U.ExplicitVRLittleEndian: "-xe",
    U.ExplicitVRBigEndian: "-xb",
    U.DeflatedExplicitVRLittleEndian: "-xd",
    U.JPEGBaseline8Bit: "-xy",
    U.JPEGExtended12Bit: "-xx",
    U.JPEGLosslessSV1: "-xs",
    U.JPEGLSLossless: "-xt",
    U.JPEGLSNearLossless: "-xu",
    U.JPEG2000Lossless: "-xv",
    U.JPEG2000: "-xw",
    U.RLELossless: "-xr",
}
#: The transfer syntaxes covered: each one storescu can propose, and JPEG Lossless
#: process 14 (1.2.840.10008.1.2.4.57). Process 14 has no bundled file and storescu
#: cannot propose it, so that one is a relabelled copy of the SV1 sample (an SV1
#: codestream is a valid process 14 codestream) sent with pynetdicom
#: (see :func:`_send_process14`).
WANTED_SYNTAXES: list[str] = [
    *STORESCU_OPTION,
    U.JPEGLossless,
]
MIN_SYNTAXES = 10

#: Compressed syntaxes a destination that only accepts uncompressed data gets decoded.
LOSSLESS_COMPRESSED: list[str] = [
    U.JPEGLosslessSV1,
    U.JPEG2000Lossless,
    U.RLELossless,
    U.JPEGLSLossless,
]


# -- the bundled test files ---------------------------------------------------------------


@functools.cache
def _bundled_files() -> tuple[str, ...]:
    """``get_testdata_files("*.dcm")`` without network access.

    pydicom also lists the files of the pydicom-data repository and downloads each
    missing one; offline every download times out (15 s in total here). Files already
    in pydicom's download cache are kept; nothing is fetched.
    """
    cache = download.get_data_dir()

    def cached_only(name: str, *args: Any, **kwargs: Any) -> Path:
        path = cache / name
        if path.exists():
            return path.resolve()
        raise FileNotFoundError(name)

    with (
        mock.patch.object(data_manager, "data_path_with_download", cached_only),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        return tuple(sorted(get_testdata_files("*.dcm")))


@functools.cache
def _candidates() -> dict[str, list[tuple[Path, str, bool]]]:
    """Readable Part-10 files by transfer syntax: ``{ts: [(path, sop_uid, complete)]}``,
    images (with Pixel Data) first, then smallest first.

    Files pydicom reads only with a warning (wrong VR guess, ...) are left out.
    ``complete`` is False for files without Study/Series Instance UID (all the bundled
    JPEG-LS near-lossless ones): the router rightly refuses those (0xC000), so they are
    sent as copies with the missing UIDs added.
    """
    by_ts: dict[str, list[tuple[Path, str, bool]]] = defaultdict(list)
    images: set[Path] = set()
    for name in _bundled_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ds = dcmread(name)
            ts = str(ds.file_meta.TransferSyntaxUID)
            sop = str(ds.SOPInstanceUID)
            str(ds.SOPClassUID)
        except Exception:
            continue
        if "PixelData" in ds:
            images.add(Path(name))
        complete = bool(ds.get("StudyInstanceUID")) and bool(ds.get("SeriesInstanceUID"))
        if ts in STORESCU_OPTION:
            by_ts[ts].append((Path(name), sop, complete))
    for files in by_ts.values():
        files.sort(key=lambda item: (item[0] not in images, item[0].stat().st_size, item[0].name))
    return dict(by_ts)


def _repaired_copy(src: Path, dst: Path, *, new_sop_uid: bool) -> Path:
    """``src`` with missing Study/Series UIDs added and optionally a new SOP Instance UID;
    everything else (pixel data too) unchanged."""
    ds = dcmread(src)
    if new_sop_uid:
        ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = generate_uid()
    if not ds.get("SeriesInstanceUID"):
        ds.SeriesInstanceUID = generate_uid()
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _pick(
    syntaxes: list[str], excluded: set[Path], workdir: Path
) -> dict[str, tuple[Path, str, Path]]:
    """One file per syntax with distinct SOP UIDs: ``{ts: (file_to_send, sop, bundled_file)}``.

    Scarce syntaxes choose first, preferring unmodified bundled files. A syntax whose
    every file shares its UID with an earlier pick (RLE: the bundled RLE files re-encode
    the JPEG lossless and JPEG-LS samples) or lacks Study/Series UIDs is sent as a
    repaired copy (see :func:`_repaired_copy`).
    """
    cands = _candidates()
    order = sorted(
        (ts for ts in syntaxes if ts in cands),
        key=lambda ts: len([c for c in cands[ts] if c[0] not in excluded]),
    )
    used: set[str] = set()
    picks: dict[str, tuple[Path, str, Path]] = {}
    for ts in order:
        usable = [c for c in cands[ts] if c[0] not in excluded]
        if not usable:
            continue
        path, sop, complete = min(usable, key=lambda c: (c[1] in used, not c[2]))
        if sop in used or not complete:
            copy = _repaired_copy(path, workdir / f"copy-{path.name}", new_sop_uid=sop in used)
            sop = str(dcmread(copy, stop_before_pixels=True).SOPInstanceUID)
            picks[ts] = (copy, sop, path)
        else:
            picks[ts] = (path, sop, path)
        used.add(sop)
    return picks


def send_by_syntax(
    files: dict[str, Path], port: int, aet: str, *, no_halt: bool = False
) -> list[subprocess.CompletedProcess[str]]:
    """One storescu association per syntax, proposing exactly that syntax (``{ts: file}``)."""
    results = []
    for ts, path in files.items():
        command = [dcmtk_tool("storescu"), STORESCU_OPTION[ts], "-aet", "STORESCU", "-aec", aet]
        if no_halt:
            command.append("-nh")
        command += [HOST, str(port), str(path)]
        results.append(
            subprocess.run(command, capture_output=True, text=True, env=dcmtk_env(), timeout=120)
        )
    return results


def capture_sendable(
    syntaxes: list[str], work: Path
) -> tuple[dict[str, tuple[Path, str, Path]], dict[str, Path], dict[str, str]]:
    """Pick one file per syntax that dcmtk storescu can send, and capture what it sends.

    storescu talks directly to a bit-preserving storescp ("wire"); files it cannot send
    (e.g. ``rtdose_rle*.dcm``: "Inappropriate data for message") are replaced by the
    next candidate. Returns the picks, the captured files by SOP UID, and the skipped.
    """
    wire_dir = work / "wire"
    excluded: set[Path] = set()
    skipped: dict[str, str] = {}
    with StoreSCP(free_port(), "WIRE", wire_dir, accept="all") as wire:
        for _ in range(6):
            for stale in wire_dir.iterdir():
                stale.unlink()
            picks = _pick(syntaxes, excluded, work / f"copies{len(excluded)}")
            send_by_syntax({ts: p[0] for ts, p in picks.items()}, wire.port, "WIRE", no_halt=True)
            wire_by_sop = files_by_sop(wire.received_files())
            failed = {ts: p for ts, p in picks.items() if p[1] not in wire_by_sop}
            if not failed:
                return picks, wire_by_sop, skipped
            for ts, (path, _sop, origin) in failed.items():
                skipped[path.name] = f"storescu cannot send it ({U.UID(ts).name})"
                excluded.add(origin)
    pytest.fail(f"storescu keeps failing to send: {skipped}")


# -- comparing what arrived -----------------------------------------------------------------

_LONG_VRS = {
    vr.encode()
    for vr in ["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"]
}


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta information (group 0002) of a Part-10 file."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part-10 file"
    pos = 132
    while True:
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            return data[pos:]
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]


def files_by_sop(paths: list[Path]) -> dict[str, Path]:
    found = {}
    for path in paths:
        found[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return found


def element_differences(expected: Dataset, actual: Dataset, where: str = "") -> list[str]:
    """Element-by-element differences (tag, VR, value; pixel data as bytes)."""
    problems = []
    expected_tags = {e.tag for e in expected if e.tag.group != 0x0002}
    actual_tags = {e.tag for e in actual if e.tag.group != 0x0002}
    for tag in sorted(expected_tags - actual_tags):
        problems.append(f"{where}{tag} {expected[tag].keyword}: missing")
    for tag in sorted(actual_tags - expected_tags):
        problems.append(f"{where}{tag} {actual[tag].keyword}: unexpected")
    for tag in sorted(expected_tags & actual_tags):
        a, b = expected[tag], actual[tag]
        name = f"{where}{tag} {a.keyword or '(private)'}"
        if a.VR == "SQ" and b.VR == "SQ":
            if len(a.value) != len(b.value):
                problems.append(f"{name}: {len(a.value)} items, got {len(b.value)}")
                continue
            for i, (ia, ib) in enumerate(zip(a.value, b.value, strict=True)):
                problems += element_differences(ia, ib, f"{name}[{i}].")
        elif a.VR != b.VR and "UN" not in (a.VR, b.VR):
            problems.append(f"{name}: VR {a.VR}, got {b.VR}")
        elif a.value != b.value:
            shown_a = repr(a.value)[:60]
            shown_b = repr(b.value)[:60]
            problems.append(f"{name}: {shown_a}, got {shown_b}")
    return problems


# -- identical delivery to storescp and Orthanc -------------------------------------------


@pytest.fixture(scope="module")
def interop_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Select the files, capture what storescu sends, route it to storescp and Orthanc."""
    require_peers(orthanc=True)
    work = tmp_path_factory.mktemp("interop")

    # 1. Which bundled files storescu can send, and the exact bytes it sends.
    picks, wire_by_sop, skipped = capture_sendable(list(STORESCU_OPTION), work)

    # 2. The same files through the router, to both destinations.
    orthanc = Orthanc(work / "orthanc", aet="ORTHANC")
    orthanc.start()
    scp = StoreSCP(free_port(), "PACS", work / "pacs", accept="all")
    scp.start()
    config = {
        "destinations": {
            "pacs": {"ae_title": "PACS", "host": HOST, "port": scp.port},
            "orthanc": {"ae_title": "ORTHANC", "host": HOST, "port": orthanc.dicom_port},
        },
        "routes": [{"name": "everything", "trigger": "instance", "to": ["pacs", "orthanc"]}],
    }
    router = RouterProcess(work / "router", config)
    try:
        router.start()
        results = send_by_syntax({ts: p[0] for ts, p in picks.items()}, router.port, "DICOMROUTER")
        for result in results:
            assert result.returncode == 0, f"storescu -> router failed:\n{result.stderr}"
        sv1_origin = picks[U.JPEGLosslessSV1][2]
        p14_file, p14_sop = _process14_copy(sv1_origin, work)
        _send_process14(p14_file, router.port)
        picks[U.JPEGLossless] = (p14_file, p14_sop, sv1_origin)
        wire_by_sop[p14_sop] = p14_file  # pynetdicom streamed the file's dataset bytes
        n = len(picks)
        jobs = router.wait_jobs(
            lambda js: len(js) == 2 * n and all_settled(js), 60, message=f"{2 * n} jobs settled"
        )
        wait_until(lambda: len(scp.received_files()) >= n, 30, message=f"{n} files at storescp")
        yield {
            "picks": picks,
            "skipped": skipped,
            "wire": wire_by_sop,
            "pacs": files_by_sop(scp.received_files()),
            "orthanc": orthanc,
            "jobs": jobs,
            "router": router,
        }
    finally:
        router.stop()
        scp.stop()
        orthanc.stop()


def test_bundled_files_cover_at_least_ten_transfer_syntaxes(interop_run: dict[str, Any]) -> None:
    picks = interop_run["picks"]
    covered = sorted(U.UID(ts).name for ts in picks)
    assert len(picks) >= MIN_SYNTAXES, (
        f"only {len(picks)} transfer syntaxes covered: {covered}; skipped {interop_run['skipped']}"
    )
    assert len({sop for _f, sop, _o in picks.values()}) == len(picks), "SOP UIDs not distinct"


def test_every_job_completed(interop_run: dict[str, Any]) -> None:
    jobs = interop_run["jobs"]
    bad = [(j["destination"], j["resource_uid"], j["state"], j["last_error"]) for j in jobs]
    bad = [b for b in bad if b[2] != "completed"]
    assert not bad, f"jobs not completed: {bad}\n{interop_run['router'].log()[-3000:]}"


def _pick_for(interop_run: dict[str, Any], ts: str) -> tuple[Path, str, Path]:
    picks = interop_run["picks"]
    assert ts in picks, f"no file was sent in {U.UID(ts).name}; skipped {interop_run['skipped']}"
    return picks[ts]  # type: ignore[no-any-return]


def _process14_copy(sv1_file: Path, workdir: Path) -> tuple[Path, str]:
    """The SV1 sample relabelled as JPEG Lossless process 14, with a new SOP UID."""
    ds = dcmread(sv1_file)
    ds.file_meta.TransferSyntaxUID = U.JPEGLossless
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = generate_uid()
    if not ds.get("SeriesInstanceUID"):
        ds.SeriesInstanceUID = generate_uid()
    target = workdir / "process14.dcm"
    ds.save_as(target, enforce_file_format=True)
    return target, str(ds.SOPInstanceUID)


def _send_process14(path: Path, port: int) -> None:
    """Send ``path`` with pynetdicom, streaming the file's own bytes (as storescu would)
    over a context that proposes exactly JPEG Lossless process 14."""
    from pynetdicom import AE, _config

    ds = dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ds.SOPClassUID, [U.JPEGLossless])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate(HOST, port, ae_title="DICOMROUTER")
        assert assoc.is_established, "router refused the process 14 association"
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert status.Status == 0x0000, f"router answered 0x{status.Status:04X} for process 14"


@pytest.mark.parametrize("ts", WANTED_SYNTAXES, ids=lambda ts: U.UID(ts).keyword or ts)
def test_storescp_receives_identical_dataset(interop_run: dict[str, Any], ts: str) -> None:
    path, sop, _origin = _pick_for(interop_run, ts)
    sent = interop_run["wire"][sop]
    received = interop_run["pacs"].get(sop)
    assert received is not None, f"{path.name} ({sop}) never reached storescp"
    if ts == U.JPEGLossless:
        # dcmtk's storescp does not accept process 14 even with +xa: the router must
        # fall back to decoding it, and the pixels must survive unchanged.
        arrived = dcmread(received)
        assert arrived.file_meta.TransferSyntaxUID == U.ExplicitVRLittleEndian
        assert np.array_equal(arrived.pixel_array, dcmread(sent).pixel_array)
        return
    assert dcmread(received, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    assert dataset_bytes(received) == dataset_bytes(sent), (
        f"{path.name}: dataset bytes at storescp differ from what storescu sent"
    )


@pytest.mark.parametrize("ts", WANTED_SYNTAXES, ids=lambda ts: U.UID(ts).keyword or ts)
def test_orthanc_stores_identical_dataset(interop_run: dict[str, Any], ts: str) -> None:
    path, sop, _origin = _pick_for(interop_run, ts)
    orthanc: Orthanc = interop_run["orthanc"]
    instance_id = orthanc.find_sop(sop)
    assert instance_id is not None, f"{path.name} ({sop}) never reached Orthanc"
    stored = orthanc.workdir / f"{instance_id}.dcm"
    stored.write_bytes(orthanc.get_instance_file(instance_id))
    expected = dcmread(interop_run["wire"][sop])
    actual = dcmread(stored)
    assert actual.file_meta.TransferSyntaxUID == ts
    problems = element_differences(expected, actual)
    assert not problems, f"{path.name}: Orthanc's copy differs:\n" + "\n".join(problems[:20])
    if "PixelData" in expected:
        assert actual.PixelData == expected.PixelData


# -- destination that accepts only uncompressed data ---------------------------------------


def test_compressed_inputs_arrive_decoded_for_uncompressed_only_destination(
    tmp_path: Path, dcmtk: None
) -> None:
    picks, _wire, _skipped = capture_sendable(LOSSLESS_COMPRESSED, tmp_path)
    assert set(picks) == set(LOSSLESS_COMPRESSED), f"missing bundled files: {picks.keys()}"
    with (
        StoreSCP(free_port(), "PLAIN", tmp_path / "plain", accept="uncompressed") as scp,
        RouterProcess(
            tmp_path / "router",
            {
                "destinations": {"plain": {"ae_title": "PLAIN", "host": HOST, "port": scp.port}},
                "routes": [{"name": "all", "trigger": "instance", "to": ["plain"]}],
            },
        ) as router,
    ):
        for result in send_by_syntax(
            {ts: p[0] for ts, p in picks.items()}, router.port, router.ae_title
        ):
            assert result.returncode == 0, result.stderr
        n = len(picks)
        jobs = router.wait_jobs(
            lambda js: len(js) == n and all_settled(js), 60, message=f"{n} jobs settled"
        )
        wait_until(lambda: len(scp.received_files()) >= n, 30, message=f"{n} files at storescp")
        received = files_by_sop(scp.received_files())
    assert [j["state"] for j in jobs] == ["completed"] * n, [
        (j["resource_uid"], j["state"], j["last_error"]) for j in jobs
    ]
    for ts, (path, sop, _origin) in picks.items():
        assert sop in received, f"{path.name} never arrived"
        original = dcmread(path)
        arrived = dcmread(received[sop])
        name = f"{path.name} ({U.UID(ts).name})"
        assert arrived.file_meta.TransferSyntaxUID == U.ExplicitVRLittleEndian, name
        assert not arrived["PixelData"].is_undefined_length, name
        assert arrived.SOPClassUID == original.SOPClassUID, name
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored"):
            assert arrived.get(keyword) == original.get(keyword), f"{name}: {keyword}"
        expected_pixels = original.pixel_array
        actual_pixels = arrived.pixel_array
        assert actual_pixels.shape == expected_pixels.shape, name
        assert np.array_equal(actual_pixels, expected_pixels), f"{name}: pixels differ"
