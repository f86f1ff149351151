"""DicomSender against real peers: dcmtk storescp and small pynetdicom SCPs.

No mocks: every test opens real associations on 127.0.0.1. The instances are
pydicom's bundled test files, rewritten exactly the way the router stores what it
receives (pynetdicom's chunked receive: 128-byte preamble, ``DICM``, file meta built
from the C-STORE command, then the dataset bytes as received).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    HEVCMP51,
    JPEG2000,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta, split_dataset

from dicomrouter.config.models import DicomDestinationConfig
from dicomrouter.destinations import (
    DestinationUnavailable,
    DicomSender,
    InstanceResult,
    Outcome,
    OutgoingInstance,
    classify_status,
    describe_status,
)
from dicomrouter.destinations.dicom import MAX_CONTEXTS, plan_associations
from tests.support.dcmtk import HOST, StoreSCP, free_port
from tests.support.nodelay import install_tcp_nodelay

pytestmark = pytest.mark.timeout(120)

# One file per interesting transfer syntax (all bundled with pydicom, no download).
ALL_FILES = [
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "SC_rgb_rle.dcm",  # RLE
    "rtdose_rle.dcm",  # RLE, multi-frame RT Dose
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline (lossy, YBR_FULL)
    "JPEG-lossy.dcm",  # JPEG extended (lossy, 12 bit)
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEGLSNearLossless_08.dcm",  # JPEG-LS near-lossless
]
COMPRESSED_FILES = [
    "JPEG2000.dcm",
    "MR_small_jp2klossless.dcm",
    "SC_rgb_rle.dcm",
    "rtdose_rle.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "image_dfl.dcm",  # not compressed pixel data, but needs inflating
]


# -- helpers ---------------------------------------------------------------------


def store_like_router(source: Path | Dataset, folder: Path, key: int) -> OutgoingInstance:
    """Write ``source`` as the router stores it, with a fresh SOP Instance UID.

    pydicom's test files share UIDs (MR_small in many syntaxes), and storescp names
    files by UID, so each copy gets its own. The dataset is re-encoded by pydicom in
    its own transfer syntax (encapsulated pixel data is kept byte for byte), then the
    file meta is replaced by the one pynetdicom's chunked receive writes.
    """
    ds = source if isinstance(source, Dataset) else dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ts = UID(ds.file_meta.TransferSyntaxUID)
    tmp = folder / f"{key}.tmp"
    dcmwrite(tmp, ds, enforce_file_format=True)
    _, offset = split_dataset(tmp)
    body = tmp.read_bytes()[offset:]
    tmp.unlink()
    path = folder / f"{key}.dcm"
    meta = create_file_meta(
        sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=ts
    )
    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body)
    return OutgoingInstance(key, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ts))


def bundled_file(name: str) -> Path:
    """A file bundled with pydicom (never downloaded: tests stay on 127.0.0.1)."""
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), name
    return Path(path)


def affected_uid(event: evt.Event) -> str:
    return str(cast(C_STORE, event.request).AffectedSOPInstanceUID)


def make_batch(names: list[str], folder: Path) -> list[OutgoingInstance]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        store_like_router(bundled_file(name), folder, key)
        for key, name in enumerate(names, start=1)
    ]


def dest(port: int, ae_title: str = "PACS", **kwargs: object) -> DicomDestinationConfig:
    return DicomDestinationConfig(ae_title=ae_title, host=HOST, port=port, **kwargs)  # type: ignore[arg-type]


def received_by_uid(scp: StoreSCP) -> dict[str, Path]:
    return {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.received_files()
    }


def without_meta(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def wait_for_threads(baseline: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return threading.active_count()


@pytest.fixture
def storescp(tmp_path: Path, dcmtk: None) -> Iterator[Callable[..., StoreSCP]]:
    """Start bit-preserving storescp instances (``dcmtk`` from conftest: skip/fail)."""
    started: list[StoreSCP] = []

    def start(accept: str = "all", aet: str = "PACS") -> StoreSCP:
        outdir = tmp_path / f"received-{len(started)}"
        scp = StoreSCP(free_port(), aet, outdir, accept=accept, bit_preserving=True)  # type: ignore[arg-type]
        started.append(scp)
        return scp.start()

    yield start
    for scp in started:
        scp.stop()


StoreHandler = Callable[[evt.Event], int]


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., int]]:
    """Start a pynetdicom C-STORE SCP with a custom handler; returns its port."""
    install_tcp_nodelay()
    servers = []

    def start(
        handler: StoreHandler,
        sop_classes: list[str] | None = None,
        require_called_aet: bool = False,
    ) -> int:
        ae = AE(ae_title="FAKE")
        ae.require_called_aet = require_called_aet
        for sop in sop_classes or [CTImageStorage, MRImageStorage]:
            ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        port = free_port()
        servers.append(
            ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)])
        )
        return port

    yield start
    for server in servers:
        if server is not None:
            server.shutdown()


def ct_batch(folder: Path, count: int) -> list[OutgoingInstance]:
    folder.mkdir(parents=True, exist_ok=True)
    source = bundled_file("CT_small.dcm")
    return [store_like_router(source, folder, key) for key in range(1, count + 1)]


# -- status classification ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, Outcome.SUCCESS),
        (0xB000, Outcome.WARNING),
        (0xB006, Outcome.WARNING),
        (0xB007, Outcome.WARNING),
        (0xA700, Outcome.TRANSIENT),
        (0xA7FF, Outcome.TRANSIENT),
        (0x0213, Outcome.TRANSIENT),
        (0xA900, Outcome.PERMANENT),
        (0xA9AB, Outcome.PERMANENT),
        (0xC000, Outcome.PERMANENT),
        (0xC123, Outcome.PERMANENT),
        (0x0122, Outcome.PERMANENT),
        (0x0124, Outcome.PERMANENT),
        (0x0211, Outcome.PERMANENT),
        (0x0212, Outcome.PERMANENT),
        (0x0117, Outcome.PERMANENT),
        (0x1234, Outcome.PERMANENT),
    ],
)
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_describe_status() -> None:
    assert describe_status(0xA700) == "0xA700 Out of resources"
    assert describe_status(0xA7FE) == "0xA7FE Out of resources"
    assert describe_status(0xB007) == "0xB007 Data set does not match SOP Class"
    assert describe_status(0xC210) == "0xC210 Cannot understand"
    assert describe_status(0x0122) == "0x0122 Refused: SOP Class not supported"
    assert describe_status(0x0124) == "0x0124 Refused: not authorized"
    assert describe_status(0x4321).startswith("0x4321 ")
    assert Outcome.WARNING.delivered and not Outcome.TRANSIENT.delivered
    assert Outcome.SUCCESS == "success"


def test_plan_splits_on_batch_size_and_context_limit(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    same = [OutgoingInstance(i, path, CTImageStorage, f"1.2.{i}", JPEG2000) for i in range(5)]
    chunks = plan_associations(same, batch_size=2)
    assert [len(c.instances) for c in chunks] == [2, 2, 1]
    # one context per (SOP class, syntax): JPEG 2000 plus ELE and ILE fallbacks
    assert chunks[0].contexts == [
        (CTImageStorage, JPEG2000),
        (CTImageStorage, ExplicitVRLittleEndian),
        (CTImageStorage, ImplicitVRLittleEndian),
    ]
    # 100 distinct SOP classes in JPEG 2000 need 300 contexts: split at <= 128
    many = [OutgoingInstance(i, path, f"1.2.3.{i}", f"1.2.{i}", JPEG2000) for i in range(100)]
    chunks = plan_associations(many, batch_size=1000)
    assert all(len(c.contexts) <= MAX_CONTEXTS for c in chunks)
    assert [len(c.instances) for c in chunks] == [42, 42, 16]
    assert [i.key for c in chunks for i in c.instances] == list(range(100))


# -- dcmtk storescp ----------------------------------------------------------------


def test_send_everything_as_is_over_one_association(tmp_path: Path, storescp) -> None:
    batch = make_batch(ALL_FILES, tmp_path / "store")
    scp = storescp("all")
    before = scp.association_count()
    seen: list[InstanceResult] = []

    results = DicomSender(dest(scp.port), "ROUTER").send(batch, on_result=seen.append)

    assert [r.outcome for r in results] == [Outcome.SUCCESS] * len(batch), results
    assert seen == results
    assert all(r.status == 0 and r.message == "0x0000 Success" for r in results)
    assert scp.association_count() - before == 1
    received = received_by_uid(scp)
    assert len(received) == len(batch)
    for inst in batch:
        got = received[inst.sop_instance_uid]
        meta = dcmread(got, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == inst.transfer_syntax_uid, inst.path
        if inst.transfer_syntax_uid == "1.2.840.10008.1.2.1.99":
            # dcmtk re-deflates; compare the inflated datasets instead
            assert dcmread(got) == dcmread(inst.path)
        else:
            # storescp +B writes the dataset bytes exactly as they arrived
            assert without_meta(got) == without_meta(inst.path), inst.path


def test_compressed_decoded_for_uncompressed_only_destination(tmp_path: Path, storescp) -> None:
    batch = make_batch(
        ["CT_small.dcm", "MR_small_bigendian.dcm", *COMPRESSED_FILES], tmp_path / "s"
    )
    scp = storescp("uncompressed")
    before = scp.association_count()

    results = DicomSender(dest(scp.port), "ROUTER").send(batch)

    assert [r.outcome for r in results] == [Outcome.SUCCESS] * len(batch), results
    assert scp.association_count() - before == 1
    received = received_by_uid(scp)
    for inst in batch:
        original = dcmread(inst.path)
        got = dcmread(received[inst.sop_instance_uid])
        ts = UID(inst.transfer_syntax_uid)
        if ts.is_encapsulated or ts.is_deflated:
            # storescp's default really refuses compression: it got the ELE fallback
            assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, inst.path
        else:
            assert got.file_meta.TransferSyntaxUID == ts
        assert got.SOPInstanceUID == inst.sop_instance_uid  # decompress kept the UID
        # lossy ones compare against pydicom's decoding of the original
        assert np.array_equal(got.pixel_array, original.pixel_array), inst.path
        assert got.get("StudyInstanceUID") == original.get("StudyInstanceUID")
        assert got.get("PatientName") == original.get("PatientName")


def test_undecodable_syntaxes_are_permanent_and_the_rest_is_sent(tmp_path: Path, storescp) -> None:
    folder = tmp_path / "s"
    batch = make_batch(["JPEG-lossy.dcm", "CT_small.dcm"], folder)
    # a syntax pydicom has no decoder for at all
    hevc = dcmread(bundled_file("CT_small.dcm"))
    hevc.PixelData = encapsulate([b"\x00\x01" * 64])
    hevc["PixelData"].VR = "OB"
    hevc.file_meta.TransferSyntaxUID = HEVCMP51
    batch.append(store_like_router(hevc, folder, 3))
    scp = storescp("uncompressed")

    results = DicomSender(dest(scp.port), "ROUTER").send(batch)

    assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.SUCCESS, Outcome.PERMANENT]
    assert "JPEG Extended" in results[0].message and "decoding failed" in results[0].message
    assert "HEVC/H.265" in results[2].message and "no decoder" in results[2].message
    assert results[0].status is None
    assert list(received_by_uid(scp)) == [batch[1].sop_instance_uid]


def test_batch_size_renews_association(tmp_path: Path, storescp) -> None:
    batch = ct_batch(tmp_path / "s", 5)
    scp = storescp("all")
    before = scp.association_count()
    results = DicomSender(dest(scp.port, batch_size=2), "ROUTER").send(batch)
    assert all(r.outcome is Outcome.SUCCESS for r in results)
    assert scp.association_count() - before == 3
    assert len(scp.received_files()) == 5


def test_should_stop_between_instances(tmp_path: Path, storescp) -> None:
    batch = ct_batch(tmp_path / "s", 5)
    scp = storescp("all")
    seen: list[InstanceResult] = []
    results = DicomSender(dest(scp.port), "ROUTER").send(
        batch, on_result=seen.append, should_stop=lambda: len(seen) >= 2
    )
    assert [r.key for r in results] == [1, 2]
    assert len(scp.received_files()) == 2
    time.sleep(0.2)
    assert "Association Release" in scp.log()


def test_unsupported_sop_class_is_permanent(tmp_path: Path, storescp) -> None:
    batch = ct_batch(tmp_path / "s", 1)
    bogus = dcmread(batch[0].path)
    bogus.SOPClassUID = "1.2.3.4.5.6.7.8.9"  # storescp knows no such storage class
    batch.append(store_like_router(bogus, tmp_path / "s", 2))
    scp = storescp("all")
    results = DicomSender(dest(scp.port), "ROUTER").send(batch)
    assert [r.outcome for r in results] == [Outcome.SUCCESS, Outcome.PERMANENT]
    assert results[1].message == "destination does not support SOP class 1.2.3.4.5.6.7.8.9"
    # nothing acceptable at all: still per-instance results, not an exception
    results = DicomSender(dest(scp.port), "ROUTER").send(batch[1:])
    assert [r.outcome for r in results] == [Outcome.PERMANENT]


def test_echo(storescp) -> None:
    scp = storescp("all")
    DicomSender(dest(scp.port), "ROUTER").echo()
    with pytest.raises(DestinationUnavailable) as info:
        DicomSender(dest(free_port()), "ROUTER").echo()
    assert info.value.transient


def test_association_rejected_called_ae(tmp_path: Path, pynetdicom_scp) -> None:
    port = pynetdicom_scp(lambda event: 0x0000, require_called_aet=True)
    sender = DicomSender(dest(port, ae_title="WRONG"), "ROUTER")
    with pytest.raises(DestinationUnavailable) as info:
        sender.send(ct_batch(tmp_path / "s", 1))
    assert "rejected-permanent" in str(info.value)
    assert "Called AE title not recognised" in str(info.value)
    assert not info.value.transient


def test_connection_refused(tmp_path: Path) -> None:
    baseline = threading.active_count()
    sender = DicomSender(dest(free_port(), connect_timeout=3), "ROUTER")
    started = time.monotonic()
    with pytest.raises(DestinationUnavailable) as info:
        sender.send(ct_batch(tmp_path / "s", 2))
    assert info.value.transient
    assert "cannot connect" in str(info.value)
    assert time.monotonic() - started < 3
    assert wait_for_threads(baseline) <= baseline


# -- pynetdicom fake peers -------------------------------------------------------


def test_real_statuses_are_classified(tmp_path: Path, pynetdicom_scp) -> None:
    batch = ct_batch(tmp_path / "s", 4)
    answers = {
        batch[0].sop_instance_uid: 0xA700,
        batch[1].sop_instance_uid: 0xB007,
        batch[2].sop_instance_uid: 0xC000,
        batch[3].sop_instance_uid: 0x0000,
    }

    def handler(event: evt.Event) -> int:
        return answers[affected_uid(event)]

    port = pynetdicom_scp(handler)
    results = DicomSender(dest(port, ae_title="FAKE"), "ROUTER").send(batch)
    assert [r.outcome for r in results] == [
        Outcome.TRANSIENT,
        Outcome.WARNING,
        Outcome.PERMANENT,
        Outcome.SUCCESS,
    ]
    assert [r.status for r in results] == [0xA700, 0xB007, 0xC000, 0x0000]
    assert results[0].message == "0xA700 Out of resources"


def test_dimse_timeout_is_transient_and_does_not_hang(tmp_path: Path, pynetdicom_scp) -> None:
    def handler(event: evt.Event) -> int:
        time.sleep(2.5)
        return 0x0000

    port = pynetdicom_scp(handler)
    baseline = threading.active_count()
    batch = ct_batch(tmp_path / "s", 3)
    sender = DicomSender(dest(port, ae_title="FAKE", dimse_timeout=1), "ROUTER")
    started = time.monotonic()
    results = sender.send(batch)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed
    assert [r.outcome for r in results] == [Outcome.TRANSIENT] * 3
    assert results[0].message == "no response within 1s; association aborted"
    assert all(r.status is None for r in results)
    assert wait_for_threads(baseline) <= baseline


def test_peer_abort_mid_batch(tmp_path: Path, pynetdicom_scp) -> None:
    batch = ct_batch(tmp_path / "s", 4)

    def handler(event: evt.Event) -> int:
        if affected_uid(event) == batch[1].sop_instance_uid:
            event.assoc.abort()
        return 0x0000

    port = pynetdicom_scp(handler)
    seen: list[InstanceResult] = []
    results = DicomSender(dest(port, ae_title="FAKE"), "ROUTER").send(batch, seen.append)
    assert seen == results
    assert [r.outcome for r in results] == [Outcome.SUCCESS] + [Outcome.TRANSIENT] * 3
    assert "abort" in results[1].message
    assert results[2].message == results[1].message


def test_sop_class_not_supported_by_peer(tmp_path: Path, pynetdicom_scp) -> None:
    folder = tmp_path / "s"
    batch = make_batch(["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"], folder)
    port = pynetdicom_scp(lambda event: 0x0000, sop_classes=[CTImageStorage])
    results = DicomSender(dest(port, ae_title="FAKE"), "ROUTER").send(batch)
    assert [r.outcome for r in results] == [Outcome.SUCCESS, Outcome.PERMANENT, Outcome.PERMANENT]
    assert "MR Image Storage" in results[1].message
    assert "Secondary Capture Image Storage" in results[2].message


def test_forwards_files_written_by_pynetdicom_chunked_receive(
    tmp_path: Path, pynetdicom_scp, storescp
) -> None:
    """The real router path: pynetdicom writes the file, we stream it onwards as is."""
    from pynetdicom import _config

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    stored: list[OutgoingInstance] = []

    def handler(event: evt.Event) -> int:
        path = inbox / f"{len(stored) + 1}.dcm"
        Path(event.dataset_path).replace(path)
        rq = cast(C_STORE, event.request)
        stored.append(
            OutgoingInstance(
                len(stored) + 1,
                path,
                str(rq.AffectedSOPClassUID),
                str(rq.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax),
            )
        )
        return 0x0000

    batch = make_batch(["CT_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"], tmp_path / "s")
    previous = _config.STORE_RECV_CHUNKED_DATASET
    _config.STORE_RECV_CHUNKED_DATASET = True
    try:
        port = pynetdicom_scp(handler, sop_classes=[CTImageStorage, SecondaryCaptureImageStorage])
        results = DicomSender(dest(port, ae_title="FAKE"), "ROUTER").send(batch)
    finally:
        _config.STORE_RECV_CHUNKED_DATASET = previous
    assert all(r.outcome is Outcome.SUCCESS for r in results)
    assert [i.transfer_syntax_uid for i in stored] == [i.transfer_syntax_uid for i in batch]

    scp = storescp("all")
    results = DicomSender(dest(scp.port), "ROUTER").send(stored)
    assert all(r.outcome is Outcome.SUCCESS for r in results), results
    received = received_by_uid(scp)
    for original in batch:
        assert without_meta(received[original.sop_instance_uid]) == without_meta(original.path)


# -- throughput --------------------------------------------------------------------


@pytest.mark.slow
def test_many_small_files_over_one_association(tmp_path: Path, storescp) -> None:
    """500 instances in one batch: one association (batch_size allows it), every
    message ID answered in order, every file stored. (Speed is the benchmark's
    business: bench/run_bench.py.)"""
    batch = ct_batch(tmp_path / "s", 500)
    scp = storescp("all")
    before = scp.association_count()  # the readiness C-ECHO
    results = DicomSender(dest(scp.port, batch_size=500), "ROUTER").send(batch)
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 500
    assert len(received_by_uid(scp)) == 500
    assert scp.store_requests() == 500
    assert scp.association_count() == before + 1


def test_echo_tells_a_peer_without_verification_from_a_dead_one() -> None:
    """A peer that accepts associations but not C-ECHO is up: the dispatcher's probe
    must be able to tell it from an unreachable one, or it would never resume it."""
    from dicomrouter.destinations import VerificationNotSupported

    install_tcp_nodelay()
    ae = AE(ae_title="NOECHO")
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server((HOST, port), block=False)
    try:
        with pytest.raises(VerificationNotSupported):
            DicomSender(dest(port, "NOECHO"), "ROUTER").echo()
    finally:
        server.shutdown()
    with pytest.raises(DestinationUnavailable) as dead:
        DicomSender(dest(port, "NOECHO", connect_timeout=2), "ROUTER").echo()
    assert not isinstance(dead.value, VerificationNotSupported)
