"""
The master's job runner in process: a real store, time from a fake clock.

A follower (``mrsync push``, ``status --follow``) asks `JobStatus` with
``wait``, which the runner holds until the job ends (`JobRunner.ended`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from mrsyncd.commands import BadRequest
from mrsyncd.config import MasterConfig
from mrsyncd.master import MasterService, source_refusal
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


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for d in ("srv/pub", "srv/state", "etc", "elsewhere"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "etc" / "master.key").write_text("secret")
    (tmp_path / "srv" / "pub" / "to-etc").symlink_to(tmp_path / "etc")
    return tmp_path


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("srv/pub", None),
        ("srv/pub/", None),
        ("srv/pub/missing", None),  # the scan says it is missing, with its own message
        ("elsewhere", "is outside [master] sources"),
        ("srv/pub/../../elsewhere", "is outside [master] sources"),
        ("srv/pub/to-etc", "is outside [master] sources"),  # a symlink out of the roots
        ("srv", "holds the master's state directory"),
        ("srv/state", "holds the master's state directory"),
    ],
)
def test_a_source_must_lie_beneath_the_roots_and_hold_no_secret(tree: Path, source: str, why: str) -> None:
    config = MasterConfig(state_dir=str(tree / "srv" / "state"), sources=(str(tree / "srv"),))
    got = source_refusal(str(tree / source), config, key=str(tree / "etc" / "master.key"))
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got and str(tree / source) in got


def test_the_key_is_never_a_source_even_beneath_the_roots(tree: Path) -> None:
    config = MasterConfig(state_dir=str(tree / "srv" / "state"), sources=("/",))
    key = str(tree / "etc" / "master.key")
    for source in (tree / "etc", tree / "etc" / "master.key", tree / "srv" / "pub" / "to-etc", tree):
        got = source_refusal(str(source), config, key)
        assert got is not None and "holds the master's" in got, source
    assert source_refusal(str(tree / "elsewhere"), config, key) is None


def test_a_refused_source_refuses_the_job_before_it_exists(tmp_path: Path) -> None:
    (tmp_path / "pub").mkdir()
    config = MasterConfig(state_dir=str(tmp_path / "state"), sources=(str(tmp_path / "pub"),))
    service = MasterService(MemoryReactorClock(), config, lambda: None)
    try:
        spec = {"sources": ["/etc/"], "destination": "/srv/x", "targets": "all"}
        with pytest.raises(BadRequest, match=r"/etc/ is outside \[master\] sources"):
            service.runner.submit(spec, "op")
        assert service.jobs.jobs() == []
    finally:
        service.jobs.close()
