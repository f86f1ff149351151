"""A folder destination with every extra on, end to end: dcmtk's storescu sends a
study of images and an encapsulated PDF to a real router process, which writes a
file-set with previews and the PDF beside the files."""

from __future__ import annotations

import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import EncapsulatedPDFStorage

from dicomrouter.destinations.dicomdir import FILESET_DIR, file_id
from tests.support.router import RouterProcess, all_settled
from tests.support.synth import make_study
from tests.test_folder_extras import PDF_ODD, check_dicomdir, document, uids

pytestmark = pytest.mark.interop


def test_a_study_arrives_as_a_file_set_with_previews_and_its_pdf(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    images = make_study(tmp_path / "in", 4, series_count=2, patient_id="E2E")
    first = dcmread(images[0], stop_before_pixels=True)
    pdf = document(
        tmp_path / "in" / "report.dcm",
        PDF_ODD,
        EncapsulatedPDFStorage,
        PatientID="E2E",
        StudyInstanceUID=first.StudyInstanceUID,
        StudyDate=first.StudyDate,
        InstanceNumber=9,
    )
    files = [*images, pdf]
    config = {
        "destinations": {
            "share": {
                "type": "folder",
                "path": str(out),
                "render": "png",
                "extract_documents": True,
                "dicomdir": True,
                "dicomdir_folder": "{PatientID}/{AccessionNumber}_{StudyDate}",
            }
        },
        "routes": [{"name": "all", "to": ["share"]}],
    }
    with RouterProcess(tmp_path / "router", config) as router:
        router.send(files)
        jobs = router.wait_jobs(
            lambda js: all_settled(js) and sum(j["delivered"] for j in js) == 5, 60
        )
        assert {j["state"] for j in jobs} == {"completed"}
        shown = [
            json.loads(
                router.cli(
                    "queue",
                    "show",
                    str(j["id"]),
                    "--config",
                    str(router.config_path),
                    "--json",
                    check=True,
                ).stdout
            )
            for j in jobs
        ]
        items = [i for s in shown for i in s["instances"]]
        assert {i["state"] for i in items} == {"completed"}, items
        assert all(f"/{FILESET_DIR}/" in i["message"] for i in items), items
    (dicomdir,) = out.rglob("DICOMDIR")
    study = dicomdir.parent
    assert study.parent == out / "E2E"
    check_dicomdir(study, uids(files))
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        placed = study / FILESET_DIR / file_id(ds.SeriesInstanceUID) / file_id(ds.SOPInstanceUID)
        assert dcmread(placed).SOPInstanceUID == ds.SOPInstanceUID
        assert dcmread(placed) == dcmread(path)  # the data set as sent
        preview = placed.with_name(placed.name + ".png")
        if path == pdf:
            assert not preview.exists()
            assert placed.with_name(placed.name + ".pdf").read_bytes() == PDF_ODD
        else:
            got = np.asarray(imagecodecs.png_decode(preview.read_bytes()))
            assert got.shape == (ds.Rows, ds.Columns) and got.min() == 0 and got.max() == 255
