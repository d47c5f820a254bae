"""What reaches the journal: each line of an entry with its priority (sd-daemon(3) prefixes)."""

from __future__ import annotations

from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from mrsyncd import logs


def test_each_level_has_its_priority_and_no_time_stamp():
    for level, priority in [(LogLevel.debug, 7), (LogLevel.info, 6), (LogLevel.warn, 4), (LogLevel.error, 3)]:
        event = {"log_level": level, "log_format": "job {job}: done", "job": 12}
        event.update(log_time=0.0, log_system="mrsyncd.master")
        assert logs.journal_lines(event) == f"<{priority}>[mrsyncd.master] job 12: done\n"


def test_every_line_of_a_traceback_carries_the_priority():
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    event = {"log_level": LogLevel.critical, "log_format": "it broke", "log_failure": failure}
    event["log_time"] = 0.0
    lines = logs.journal_lines(event).splitlines()
    assert len(lines) > 3 and all(line.startswith("<2>") for line in lines), lines
    assert "ZeroDivisionError" in lines[-1]


def test_the_observer_twistd_is_given_writes_to_standard_output(capsys):
    observer = logs.journal_observer()
    globalLogPublisher.addObserver(observer)
    try:
        Logger(namespace="mrsyncd.test").warn("receive buffer is {n} bytes", n=212992)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert capsys.readouterr().out == "<4>[mrsyncd.test#warn] receive buffer is 212992 bytes\n"
