"""
mrsyncd's loggers, filtered by the configured level, and the journal's
observer.

twistd chooses and starts its own log observers after the service is made,
so the level cannot be set on them.  Instead every mrsyncd logger sends its
events through one filter in front of the global publisher; ``[log] level``
sets that filter, and Twisted's own messages are left as they are.

The packaged units start twistd with ``--logger=mrsyncd.logs.journal_observer``,
so that each entry reaches the journal with its event's priority.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    globalLogPublisher,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def logger(module: str) -> Logger:
    """
    A module's logger, named ``mrsyncd.<module>`` without its subpackage:
    the journal names the part (``[mrsyncd.master]``), not the source tree.
    """
    return Logger(namespace=f"mrsyncd.{module.rpartition('.')[2]}", observer=_observer)


def set_level(level: str) -> None:
    """``"info"`` or ``"debug"``."""
    _predicate.setLogLevelForNamespace(None, LogLevel.levelWithName(level))  # type: ignore[arg-type]


#: sd-daemon(3) priorities by log level: journald takes one from the start
#: of each line a service writes (``SyslogLevelPrefix=``, on by default).
_PRIORITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


def journal_observer() -> ILogObserver:
    """
    twistd's ``--logger`` under systemd: every line on standard output with
    its event's priority, so that ``journalctl -p warning`` shows warnings
    and errors, and without a time stamp, which the journal keeps itself.
    """
    return FileLogObserver(sys.stdout, journal_lines)


def journal_lines(event: dict[str, Any]) -> str:
    """An event as the journal reads it: each line of it (a traceback too) with the priority prefix."""
    prefix = f"<{_PRIORITIES.get(event.get('log_level', LogLevel.info), 6)}>"
    text = eventAsText(event, includeTimestamp=False)
    return "".join(f"{prefix}{line}\n" for line in text.splitlines())
