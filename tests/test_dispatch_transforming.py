"""dispatch/transforming.py: which pipelines a delivery goes through, and what the
worker does when one cannot run."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import insert

from dicomrouter.config import parse_config
from dicomrouter.dispatch.transforming import Chain, Transforms, preparer
from dicomrouter.queue import QueuedInstance
from dicomrouter.store import create_index_engine
from dicomrouter.store.schema import config_versions
from tests.support.synth import make_study

TRANSFORMS = {
    "route-side": [{"set": {"StationName": "R"}}],
    "dest-side": [{"set": {"InstitutionName": "D"}}],
    "needs-secret": [{"shift_dates": {"secret_env": "SHIFT"}}],
}


def setup(tmp_path: Path, transforms: dict | None = None) -> Transforms:
    config = parse_config(
        {"storage": {"path": str(tmp_path)}, "transforms": transforms or TRANSFORMS}, environ={}
    )
    engine = create_index_engine(config.database_url)
    return Transforms(config, engine, tmp_path / "outgoing", environ={})


def test_no_pipeline_means_the_stored_file_goes_out_as_it_is(tmp_path: Path) -> None:
    transforms = setup(tmp_path)
    chain = transforms.chain("", None)
    assert chain == Chain((), "")
    item = QueuedInstance(1, 1, "x.dcm", "1.2", "1.3", "1.2.840.10008.1.2.1")
    assert preparer(chain, item, tmp_path / "x.dcm", tmp_path) is None


def test_the_route_pipeline_comes_first_and_the_label_names_the_config_version(
    tmp_path: Path,
) -> None:
    transforms = setup(tmp_path)
    with transforms.engine.begin() as conn:
        conn.execute(
            insert(config_versions).values(
                applied_at=0, author="a", source="startup", sha256="0", yaml="", comment=""
            )
        )
    chain = transforms.chain("route-side", "dest-side")
    assert isinstance(chain, Chain)
    assert [p.name for p in chain.pipelines] == ["route-side", "dest-side"]
    assert chain.label.startswith("route-side @ ") and " + dest-side @ " in chain.label
    assert chain.label.endswith("(config v1)")


def test_a_pipeline_the_configuration_no_longer_has_holds_its_deliveries(tmp_path: Path) -> None:
    transforms = setup(tmp_path)
    reason = transforms.chain("removed-since", None)
    assert isinstance(reason, str)
    assert "'removed-since' is no longer configured" in reason and "wait" in reason


def test_a_transformed_copy_is_made_in_the_outgoing_folder_and_named_randomly(
    tmp_path: Path,
) -> None:
    transforms = setup(tmp_path)
    transforms.prepare_workdir()
    (source,) = make_study(tmp_path / "in", 1)
    chain = transforms.chain("route-side", None)
    assert isinstance(chain, Chain)
    item = QueuedInstance(1, 1, "x.dcm", "1.2", "1.3", "1.2.840.10008.1.2.1", calling_ae="CT1")
    prepare = preparer(chain, item, source, transforms.workdir)
    assert prepare is not None
    ready = prepare()
    assert ready.path.parent == transforms.workdir and ready.temporary
    assert ready.description == chain.label
    # A leftover from a crash is removed when the dispatch process starts.
    transforms.prepare_workdir()
    assert list(transforms.workdir.iterdir()) == []


def test_a_reload_swaps_the_pipelines_and_a_broken_one_holds_only_its_own(
    tmp_path: Path,
) -> None:
    transforms = setup(tmp_path)
    config = parse_config(
        {
            "storage": {"path": str(tmp_path)},
            "transforms": {
                "route-side": [{"set": {"StationName": "R2"}}],
                "broken": [{"set": {"StationName": "X" * 40}}],  # SH holds 16
            },
        },
        environ={},
    )
    transforms.apply(config)
    assert isinstance(transforms.chain("route-side", None), Chain)
    assert isinstance(transforms.chain("dest-side", None), str)
    reason = transforms.chain("broken", None)
    assert isinstance(reason, str)
    assert reason.startswith("transform 'broken' cannot run: transforms.broken[0].set")


def test_a_reload_that_changes_what_deliveries_go_through_stops_sends_in_flight(
    tmp_path: Path,
) -> None:
    """Workers stop a send between instances when ``generation`` moves: only a
    reload that changes a pipeline or a destination's pipeline moves it."""
    transforms = setup(tmp_path)
    base = {"storage": {"path": str(tmp_path)}, "transforms": TRANSFORMS}
    dest = {"ae_title": "PACS", "host": "192.0.2.1", "port": 104}
    start = transforms.generation
    transforms.apply(parse_config(base, environ={}))
    assert transforms.generation == start  # the same pipelines
    changed = {**TRANSFORMS, "route-side": [{"set": {"StationName": "R2"}}]}
    transforms.apply(parse_config({**base, "transforms": changed}, environ={}))
    assert transforms.generation == start + 1
    with_dest = {**base, "transforms": changed, "destinations": {"pacs": dest}}
    transforms.apply(parse_config(with_dest, environ={}))
    assert transforms.generation == start + 2  # a destination appears (no pipeline)
    with_dest["destinations"] = {"pacs": {**dest, "transform": "dest-side"}}
    transforms.apply(parse_config(with_dest, environ={}))
    assert transforms.generation == start + 3
    with_dest["destinations"] = {"pacs": {**dest, "port": 105, "transform": "dest-side"}}
    transforms.apply(parse_config(with_dest, environ={}))
    assert transforms.generation == start + 3  # another port: not a transform change
