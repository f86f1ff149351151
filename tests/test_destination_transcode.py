"""DicomSender with a destination ``transfer_syntax``: real dcmtk storescp and Orthanc
peers receive what we transcode, in the syntax asked for, with the same pixels.

The fallback chain is checked against peers that refuse the chosen syntax (storescp
without ``+xa`` accepts uncompressed syntaxes only).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from dicomrouter.config.transforms import LOSSLESS_SYNTAXES
from dicomrouter.destinations import DicomSender, Outcome, OutgoingInstance
from dicomrouter.destinations.dicom import plan_associations, proposed_syntaxes
from tests.support.dcmtk import StoreSCP, dcmtk_env, dcmtk_tool, free_port
from tests.support.orthanc import Orthanc
from tests.test_destination_dicom import bundled_file, dest, received_by_uid, store_like_router

pytestmark = [pytest.mark.timeout(180), pytest.mark.interop]

IMAGES = [
    "CT_small.dcm",  # 16-bit signed, Explicit VR LE
    "SC_rgb_rle_2frame.dcm",  # RGB multi-frame, RLE
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline YBR: decoded to RGB, then encoded
]
LOSSLESS_TARGETS = [name for name in LOSSLESS_SYNTAXES if name != "as-received"]
SUPPORTED_TARGETS = ["rle", "jpeg-ls-lossless", "jpeg2000-lossless", "jpeg-lossless-sv1",
                     "deflated", "implicit-little", "explicit-little"]  # fmt: skip


@pytest.fixture
def storescp(tmp_path: Path, dcmtk: None) -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def start(accept: str = "all") -> StoreSCP:
        scp = StoreSCP(free_port(), "PACS", tmp_path / f"received-{len(started)}", accept=accept)  # type: ignore[arg-type]
        started.append(scp)
        return scp.start()

    yield start
    for scp in started:
        scp.stop()


def batch_of(names: list[str], folder: Path) -> list[OutgoingInstance]:
    folder.mkdir(parents=True, exist_ok=True)
    return [store_like_router(bundled_file(n), folder, k) for k, n in enumerate(names, start=1)]


def pixels(path: Path) -> np.ndarray:
    return dcmread(path).pixel_array


def test_chain_is_chosen_then_as_received_then_explicit() -> None:
    jls = str(JPEGLSLossless)
    assert [str(u) for u in proposed_syntaxes(jls, LOSSLESS_SYNTAXES["rle"])] == [
        LOSSLESS_SYNTAXES["rle"],
        jls,
        str(ExplicitVRLittleEndian),
        "1.2.840.10008.1.2",
    ]
    ele = str(ExplicitVRLittleEndian)
    assert [str(u) for u in proposed_syntaxes(ele, jls)] == [jls, ele, "1.2.840.10008.1.2"]
    assert [str(u) for u in proposed_syntaxes(jls, jls)] == [
        jls,
        ele,
        "1.2.840.10008.1.2",
    ]
    # As received: unchanged.
    assert proposed_syntaxes(jls, "") == proposed_syntaxes(jls)
    # Big endian can go nowhere else.
    assert [str(u) for u in proposed_syntaxes("1.2.840.10008.1.2.2", jls)] == [
        "1.2.840.10008.1.2.2"
    ]


def test_plan_proposes_one_syntax_per_context(tmp_path: Path) -> None:
    batch = batch_of(["CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm"], tmp_path)
    (chunk,) = plan_associations(batch, 100, LOSSLESS_SYNTAXES["jpeg2000-lossless"])
    assert len(chunk.contexts) == len(set(chunk.contexts))
    ct = [ts for sop, ts in chunk.contexts if sop == batch[0].sop_class_uid]
    assert ct[0] == LOSSLESS_SYNTAXES["jpeg2000-lossless"]


@pytest.mark.parametrize("target_name", SUPPORTED_TARGETS)
def test_storescp_gets_the_syntax_asked_for(
    target_name: str, storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    scp = storescp("all")
    target = LOSSLESS_SYNTAXES[target_name]
    batch = batch_of(IMAGES, tmp_path / "store")
    sender = DicomSender(dest(scp.port, transfer_syntax=target_name), "ROUTER")
    results = sender.send(batch)

    assert [r.outcome for r in results] == [Outcome.SUCCESS] * len(batch), results
    received = received_by_uid(scp)
    for inst, result in zip(batch, results, strict=True):
        assert result.sent_uid is None  # lossless: the same UID
        assert result.sent_transfer_syntax_uid == target
        got = received[inst.sop_instance_uid]
        ds = dcmread(got)
        assert ds.file_meta.TransferSyntaxUID == target, inst.path.name
        assert np.array_equal(ds.pixel_array, pixels(inst.path)), inst.path.name


def test_storescp_sv1_decodes_with_dcmdjpeg(
    storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    """JPEG Lossless SV1 (imagecodecs' libjpeg-turbo) as dcmtk received it: dcmtk's
    own decoder (dcmdjpeg, IJG-based) gives back the pixels we had."""
    scp = storescp("all")
    batch = batch_of([*IMAGES, "examples_overlay.dcm"], tmp_path / "store")
    results = DicomSender(dest(scp.port, transfer_syntax="jpeg-lossless-sv1"), "ROUTER").send(batch)
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * len(batch), results
    received = received_by_uid(scp)
    for inst in batch:
        got = received[inst.sop_instance_uid]
        assert dcmread(got).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
        plain = tmp_path / f"{inst.sop_instance_uid}.dcm"
        out = subprocess.run(
            [dcmtk_tool("dcmdjpeg"), str(got), str(plain)],
            capture_output=True,
            text=True,
            env=dcmtk_env(),
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        ds = dcmread(plain)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, pixels(inst.path)), inst.path.name


def test_htj2k_unknown_to_storescp_falls_back(
    storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    """dcmtk 3.6.7 does not know the HTJ2K UIDs, so even storescp +xa refuses the
    context: a CT goes as received, a JPEG-LS file too (its syntax was accepted)."""
    scp = storescp("all")
    batch = batch_of(["CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm"], tmp_path / "store")
    results = DicomSender(dest(scp.port, transfer_syntax="htj2k-lossless"), "ROUTER").send(batch)
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 2, results
    received = received_by_uid(scp)
    for inst, result in zip(batch, results, strict=True):
        assert "destination refused High-Throughput JPEG 2000" in result.message, result
        assert result.sent_transfer_syntax_uid == inst.transfer_syntax_uid
        ds = dcmread(received[inst.sop_instance_uid])
        assert ds.file_meta.TransferSyntaxUID == inst.transfer_syntax_uid
        assert np.array_equal(ds.pixel_array, pixels(inst.path))


def test_no_pixel_data_goes_as_received(storescp: Callable[..., StoreSCP], tmp_path: Path) -> None:
    scp = storescp("all")
    (inst,) = batch_of(["reportsi.dcm"], tmp_path / "store")
    sender = DicomSender(dest(scp.port, transfer_syntax="jpeg-ls-lossless"), "ROUTER")
    (result,) = sender.send([inst])
    assert result.outcome == Outcome.SUCCESS, result
    assert result.sent_transfer_syntax_uid == inst.transfer_syntax_uid
    assert "no Pixel Data" in result.message
    got = received_by_uid(scp)[inst.sop_instance_uid]
    assert dcmread(got).file_meta.TransferSyntaxUID == inst.transfer_syntax_uid


def test_refused_syntax_falls_back_to_as_received(
    storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    """storescp without +xa takes uncompressed syntaxes only: a CT stored in Explicit
    VR LE goes as received; a JPEG-LS file goes in Explicit VR LE (decoded)."""
    scp = storescp("uncompressed")
    batch = batch_of(["CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm"], tmp_path / "store")
    sender = DicomSender(dest(scp.port, transfer_syntax="jpeg2000-lossless"), "ROUTER")
    results = sender.send(batch)
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 2, results
    received = received_by_uid(scp)
    for inst, result in zip(batch, results, strict=True):
        assert "destination refused JPEG 2000" in result.message
        ds = dcmread(received[inst.sop_instance_uid])
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, pixels(inst.path))
    assert results[0].sent_transfer_syntax_uid == batch[0].transfer_syntax_uid
    assert results[1].sent_transfer_syntax_uid == ExplicitVRLittleEndian


def test_untranscodable_image_falls_back_with_the_reason(
    storescp: Callable[..., StoreSCP], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """rtdose: 32-bit pixels, no JPEG-LS encode: sent as received, reason logged."""
    scp = storescp("all")
    (inst,) = batch_of(["rtdose.dcm"], tmp_path / "store")
    sender = DicomSender(dest(scp.port, transfer_syntax="jpeg-ls-lossless"), "ROUTER")
    with caplog.at_level(logging.INFO, logger="dicomrouter.destinations.dicom"):
        (result,) = sender.send([inst])
    assert result.outcome == Outcome.SUCCESS, result
    assert "BitsAllocated 32" in result.message
    assert any("BitsAllocated 32" in r.getMessage() for r in caplog.records)
    ds = dcmread(received_by_uid(scp)[inst.sop_instance_uid])
    assert ds.file_meta.TransferSyntaxUID == inst.transfer_syntax_uid


def test_lossy_sends_and_reports_a_new_uid(
    storescp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    scp = storescp("all")
    (inst,) = batch_of(["CT_small.dcm"], tmp_path / "store")
    cfg = dest(scp.port, transfer_syntax="jpeg2000", allow_lossy=True)
    (result,) = DicomSender(cfg, "ROUTER").send([inst])
    assert result.outcome == Outcome.SUCCESS, result
    new_uid = result.sent_uid
    assert new_uid and new_uid != inst.sop_instance_uid
    received = received_by_uid(scp)
    assert set(received) == {new_uid}
    ds = dcmread(received[new_uid])
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"
    assert ds.LossyImageCompression == "01"
    assert ds.SourceImageSequence[-1].ReferencedSOPInstanceUID == inst.sop_instance_uid


# HTJ2K is not here: this Orthanc, like dcmtk 3.6.7, refuses its UID.
@pytest.mark.parametrize(
    "target_name", ["jpeg-ls-lossless", "jpeg2000-lossless", "jpeg-lossless-sv1"]
)
def test_orthanc_stores_the_syntax_asked_for(
    target_name: str, orthanc_bin: str, tmp_path: Path
) -> None:
    batch = batch_of(["CT_small.dcm", "SC_rgb_rle_2frame.dcm"], tmp_path / "store")
    target = LOSSLESS_SYNTAXES[target_name]
    with Orthanc(tmp_path / "orthanc", aet="ORTHANC", executable=orthanc_bin) as peer:
        sender = DicomSender(dest(peer.dicom_port, "ORTHANC", transfer_syntax=target_name), "R")
        results = sender.send(batch)
        assert [r.outcome for r in results] == [Outcome.SUCCESS] * 2, results
        for inst in batch:
            instance_id = peer.find_sop(inst.sop_instance_uid)
            assert instance_id, inst.sop_instance_uid
            stored = peer.get_json(f"/instances/{instance_id}/metadata?expand")
            assert stored["TransferSyntax"] == target
            copy = tmp_path / f"{instance_id}.dcm"
            copy.write_bytes(peer.get_instance_file(instance_id))
            ds = dcmread(copy)
            assert ds.file_meta.TransferSyntaxUID == target
            assert np.array_equal(ds.pixel_array, pixels(inst.path))


def test_sender_imports_where_numpy_is_excluded() -> None:
    """The node and HTTP processes make `import numpy` fail and still import the
    sender for a C-ECHO: the transcoding code must load numpy only when used."""
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import dicomrouter.destinations.dicom as d\n"
        "assert d.proposed_syntaxes('1.2.840.10008.1.2.1', '') \n"
        "print('ok')\n"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(src)},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
