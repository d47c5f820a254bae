"""
mrsyncd's loggers, filtered by the configured level.

twistd chooses and starts its own log observers after the service is made,
so the level cannot be set on them.  Instead every mrsyncd logger sends its
events through one filter in front of the global publisher; ``[log] level``
sets that filter, and Twisted's own messages are left as they are.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def logger(namespace: str) -> Logger:
    return Logger(namespace=namespace, observer=_observer)


def set_level(level: str) -> None:
    """``"info"`` or ``"debug"``."""
    _predicate.setLogLevelForNamespace(None, LogLevel.levelWithName(level))  # type: ignore[arg-type]
