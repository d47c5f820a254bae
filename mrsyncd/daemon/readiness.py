"""
Telling systemd (``Type=notify``) when a daemon is ready: a master once it
listens, a node once its master has registered it, so that ``systemctl
start mrsyncd-master && mrsync push`` cannot race the listener.  Through
python3-systemd's ``sd_notify``; outside systemd (no ``NOTIFY_SOCKET``)
nothing is sent.  ``STATUS=`` lines say what the daemon waits for, in
``systemctl status``.
"""

from __future__ import annotations

import os

from mrsyncd import logs

try:
    from systemd import daemon as systemd_daemon
except ImportError:  # not under the packaged units
    systemd_daemon = None

log = logs.logger(__name__)
_warned = False


def notify(*, ready: bool = False, stopping: bool = False, status: str | None = None) -> bool:
    """Send what is given to systemd; True if it was sent."""
    global _warned
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    if systemd_daemon is None:
        if not _warned:
            _warned = True
            log.error(
                "NOTIFY_SOCKET is set but python3-systemd is missing:"
                " systemd cannot be told this daemon is ready"
            )
        return False
    lines = (["READY=1"] if ready else []) + (["STOPPING=1"] if stopping else [])
    if status is not None:
        lines.append("STATUS=" + status.replace("\n", " "))
    return bool(systemd_daemon.notify("\n".join(lines)))
