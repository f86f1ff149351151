"""One delivery worker with a scripted sender: what the dispatcher does with each
way a sender can end a batch, whatever the destination's kind.

The queue, the index and the files are real (``tests.test_queue.Pipeline``); only
the sender is replaced, so the contract of ``destinations.sender.Sender`` is checked
where the dispatcher reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from dicomrouter.destinations import (
    DestinationUnavailable,
    InstanceResult,
    Outcome,
    OutgoingInstance,
)
from dicomrouter.destinations.sender import OnResult, ShouldStop
from dicomrouter.dispatch.health import PAUSED, DestinationHealth
from dicomrouter.dispatch.transforming import Transforms
from dicomrouter.dispatch.worker import DestinationWorker
from dicomrouter.queue import states as S
from dicomrouter.queue.views import job_detail
from tests.support.synth import make_study
from tests.test_queue import Pipeline, route


class RefusingAfter:
    """Takes ``accepted`` instances, then raises the given DestinationUnavailable
    (as an HTTP destination answering 401 part way through a batch does)."""

    def __init__(self, accepted: int, error: DestinationUnavailable) -> None:
        self.accepted = accepted
        self.error = error
        self.seen: list[str] = []

    def send(
        self,
        batch: Sequence[OutgoingInstance],
        on_result: OnResult | None = None,
        should_stop: ShouldStop | None = None,
    ) -> list[InstanceResult]:
        results = []
        for inst in batch:
            if len(self.seen) >= self.accepted:
                raise self.error
            self.seen.append(inst.sop_instance_uid)
            result = InstanceResult(inst.key, Outcome.SUCCESS, 0, "stored")
            if on_result is not None:
                on_result(result)
            results.append(result)
        return results

    def probe(self) -> None:
        raise self.error

    def close(self) -> None:
        pass

    def close_if_idle(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _worker(p: Pipeline, sender: RefusingAfter) -> tuple[DestinationWorker, DestinationHealth]:
    health = DestinationHealth("pacs", p.config.destinations["pacs"], p.engine)
    worker = DestinationWorker(
        "pacs",
        0,
        p.config,
        p.jobs,
        p.store,
        health,
        threading.Event(),
        Transforms(p.config, p.engine, p.store.root / "outgoing"),
    )
    worker.sender = sender
    return worker, health


def _pipeline(tmp_path: Path, pause_after: int = 3) -> Pipeline:
    dest = {"type": "folder", "path": str(tmp_path / "out"), "pause_after_failures": pause_after}
    return Pipeline(tmp_path, {"destinations": {"pacs": dest}, "routes": [route(forward="study")]})


def test_a_refusal_part_way_pauses_at_once_and_keeps_what_was_delivered(
    tmp_path: Path,
) -> None:
    p = _pipeline(tmp_path, pause_after=5)
    p.receive(make_study(tmp_path / "in", 5))
    p.plan()
    refusal = DestinationUnavailable("HTTP 401 Unauthorized: credentials refused", pause=True)
    worker, health = _worker(p, RefusingAfter(2, refusal))
    assert worker._tick()
    (job,) = p.job_list()
    detail = job_detail(p.engine, job["id"])
    assert detail is not None
    states = sorted(i["state"] for i in detail["instances"])
    assert states == [S.ITEM_COMPLETED] * 2 + [S.ITEM_PENDING] * 3
    # No delivery attempt used: a connection failure, with the reason.
    assert (job["state"], job["attempts"], job["connection_failures"]) == (S.PENDING, 0, 1)
    assert health.state == PAUSED and health.last_error == str(refusal)
    assert detail["attempts"][-1]["sent"] == 2  # type: ignore[index]
    assert not worker._tick()  # paused: nothing is claimed


def test_an_unreachable_destination_still_waits_for_pause_after_failures(
    tmp_path: Path,
) -> None:
    p = _pipeline(tmp_path, pause_after=3)
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    down = DestinationUnavailable("connection refused")
    worker, health = _worker(p, RefusingAfter(0, down))
    assert worker._tick()
    assert health.state != PAUSED and health.failures == 1


class StallingAfter(RefusingAfter):
    """Takes ``accepted`` instances, reports them, then stalls until ``go`` is set
    (a peer that stops answering part way through a batch), then refuses the rest."""

    def __init__(self, accepted: int) -> None:
        super().__init__(accepted, DestinationUnavailable("stalled, then refused"))
        self.stalled = threading.Event()
        self.go = threading.Event()

    def send(
        self,
        batch: Sequence[OutgoingInstance],
        on_result: OnResult | None = None,
        should_stop: ShouldStop | None = None,
    ) -> list[InstanceResult]:
        def stall_then(result: InstanceResult) -> None:
            if on_result is not None:
                on_result(result)
            if len(self.seen) == self.accepted:
                self.stalled.set()
                self.go.wait(30)

        return super().send(batch, on_result=stall_then, should_stop=should_stop)


def test_results_answered_before_a_stall_are_written_while_it_lasts(tmp_path: Path) -> None:
    """A peer answers three instances at once, then stalls: the three are written to
    the index during the stall (by the lease renewer), not only at the next answer.
    A node killed during the stall would otherwise leave them to be sent again by
    the node that takes over its jobs."""
    p = Pipeline(
        tmp_path,
        {
            "destinations": {"pacs": {"type": "folder", "path": str(tmp_path / "out")}},
            "routes": [route(forward="study")],
            "dispatch": {"lease": "3s"},
        },
    )
    p.receive(make_study(tmp_path / "in", 5))
    p.plan()
    sender = StallingAfter(3)
    worker, _health = _worker(p, sender)  # type: ignore[arg-type]
    ticking = threading.Thread(target=worker._tick)
    ticking.start()
    try:
        assert sender.stalled.wait(30)

        def completed() -> int:
            (job,) = p.job_list()
            detail = job_detail(p.engine, job["id"])
            assert detail is not None
            return sum(i["state"] == S.ITEM_COMPLETED for i in detail["instances"])

        from tests.support.router import wait_until

        wait_until(lambda: completed() == 3, 10, message="the 3 answered before the stall")
    finally:
        sender.go.set()
        ticking.join(30)
