"""
The master's job runner in process: a real store, time from a fake clock.

A follower (``mrsync push``, ``status --follow``) asks `JobStatus` with
``wait``, which the runner holds until the job ends (`JobRunner.ended`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from mrsyncd.config import MasterConfig
from mrsyncd.master import MasterService
from mrsyncd.store import DONE


@pytest.fixture
def master(tmp_path: Path):
    service = MasterService(MemoryReactorClock(), MasterConfig(state_dir=str(tmp_path)), lambda: None)
    yield service
    service.jobs.close()


def fired(d) -> list[object]:
    got: list[object] = []
    d.addBoth(got.append)
    return got


def test_a_held_status_is_answered_as_the_job_ends_not_at_its_timeout(master) -> None:
    job = master.jobs.add({"sources": ["/a"]}, "op")
    got = fired(master.runner.ended(job, 5.0))
    master.reactor.advance(1.0)
    assert got == []
    master.runner._finish(job, DONE)
    assert got == [None]
    assert master.runner.status(job, False)["state"] == DONE
    # Its timer went with it: nothing fires again, nothing is left waiting.
    master.reactor.advance(10.0)
    assert got == [None] and master.runner._enders == {}


def test_a_held_status_of_a_job_still_running_is_answered_after_its_timeout(master) -> None:
    job = master.jobs.add({"sources": ["/a"]}, "op")
    first, second = fired(master.runner.ended(job, 0.5)), fired(master.runner.ended(job, 2.0))
    master.reactor.advance(0.6)
    assert (first, second) == ([None], [])
    master.reactor.advance(1.5)
    assert second == [None]
    assert master.runner._enders.get(job, []) == []


@pytest.mark.parametrize("finished", [True, False])
def test_a_finished_or_unknown_job_is_answered_at_once(master, finished: bool) -> None:
    job = master.jobs.add({"sources": ["/a"]}, "op")
    if finished:
        master.runner._finish(job, DONE)
    got = fired(master.runner.ended(job if finished else job + 1, 5.0))
    assert got == [None]
    assert not master.reactor.getDelayedCalls()
