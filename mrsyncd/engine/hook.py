"""
A node's post-receive hook: its own command, run once a job changed
something there.

The changed paths go to the hook in a file, NUL-separated (a name may hold a
newline); the hook gets at most ``timeout`` seconds (then SIGTERM, and
SIGKILL `KILL_AFTER` seconds later; processes it started itself are its to
stop); of what it prints only the last `HOOK_OUTPUT` bytes are kept, in
memory as in the journal, however much it prints.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.python.failure import Failure

from mrsyncd import logs

log = logs.logger(__name__)

#: Bytes of a hook's output (stdout and stderr together) kept: its end.
HOOK_OUTPUT = 4096
#: Seconds a hook may run, by default (`[node] hook_timeout`).
HOOK_TIMEOUT = 300.0
#: Seconds between the SIGTERM of a hook past its time and its SIGKILL.
KILL_AFTER = 5.0


class _Hook(protocol.ProcessProtocol):
    """Keeps the end of the output; fires ``ended`` with (exit status, output, timed out)."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.tail = bytearray()
        self.ended: defer.Deferred = defer.Deferred()
        self.timed_out = False
        self._timers: list[Any] = []

    def connectionMade(self) -> None:
        """The hook runs: its time starts (one that never started has no timer to cancel)."""
        self._timers.append(self.reactor.callLater(self.timeout, self._stop, "TERM"))

    def _keep(self, data: bytes) -> None:
        self.tail += data
        del self.tail[:-HOOK_OUTPUT]

    outReceived = errReceived = _keep

    def _stop(self, sig: str) -> None:
        assert self.transport is not None
        try:
            self.transport.signalProcess(sig)
        except error.ProcessExitedAlready:
            return
        self.timed_out = True
        if sig == "TERM":
            # Processes the hook started may hold its output open after it
            # is gone: what they print is no longer read.
            self.transport.loseConnection()
            self._timers.append(self.reactor.callLater(KILL_AFTER, self._stop, "KILL"))

    def processEnded(self, reason: Failure) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        value: Any = reason.value  # ProcessDone or ProcessTerminated
        status = value.exitCode if value.exitCode is not None else -(value.signal or signal.SIGKILL)
        self.ended.callback((status, bytes(self.tail), self.timed_out))


def run_hook(
    reactor: Any,
    argv: Sequence[str],
    changed: Sequence[str],
    environment: dict[str, str],
    timeout: float,
) -> defer.Deferred:
    """
    Run the hook with ``MRSYNC_CHANGED``, a file of the ``changed`` paths
    each followed by a NUL, and ``environment``; fires with
    ``{"argv", "status", "output"}``: status -1 if it did not start, minus
    the signal's number if a signal ended it.
    """
    listing = tempfile.NamedTemporaryFile("wb", prefix="mrsync-changed-", delete=False)
    with listing:
        for path in changed:
            listing.write(os.fsencode(path) + b"\0")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **environment, "MRSYNC_CHANGED": listing.name}
    hook = _Hook(reactor, timeout)
    try:
        reactor.spawnProcess(hook, argv[0], list(argv), env=env)
    except OSError as e:
        os.unlink(listing.name)
        log.error("post-receive hook {argv} did not run: {why}", argv=argv, why=e)
        return defer.succeed({"argv": list(argv), "status": -1, "output": str(e)})

    def ended(result: tuple[int, bytes, bool]) -> dict[str, Any]:
        os.unlink(listing.name)
        status, tail, timed_out = result
        output = tail.decode("utf-8", "replace")
        if timed_out:
            output += f"\n(stopped: still running after {timeout:g} s)"
        if status:
            log.error(
                "post-receive hook {argv} exited {code}: {output}", argv=argv, code=status, output=output
            )
        return {"argv": list(argv), "status": status, "output": output}

    return hook.ended.addCallback(ended)
