"""
Processes started in LAN hosts, with what they cost.

CPU seconds come from the kernel: ``wait4``'s resource usage when the
process ends (threads included), or ``/proc/PID/stat`` for a daemon that is
still running when it is read.  Peak RSS is ``VmHWM`` from
``/proc/PID/status``, sampled while the process runs (every `SAMPLE`
seconds and once more when its work is done): ``ru_maxrss`` cannot be used,
since Linux carries it across exec and a child of the benchmark would report
at least the benchmark's own peak.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mrsyncd.testing.lan import Host

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE = 0.25


class Proc:
    def __init__(
        self,
        host: Host,
        role: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        started: subprocess.Popen | None = None,
    ) -> None:
        """
        Start ``argv`` on ``host``, its output to ``log``; or, with
        ``started``, measure a process already started there (a lab daemon,
        which writes ``log`` itself) the same way.
        """
        self.host = host
        self.role = role
        self.argv = list(argv)
        self.log = log
        self._logfile = None if started else open(log, "wb")  # noqa: SIM115 (closed in poll)
        self.started = time.monotonic()
        self.popen = started or subprocess.Popen(
            host.argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
        self.pid = self.popen.pid
        self.ended: float | None = None
        self.rc: int | None = None
        self.cpu_user = 0.0
        self.cpu_system = 0.0
        self.hwm_bytes = 0
        self._last_sample = 0.0
        #: User and system CPU seconds before the work measured (a daemon's start): see `baseline`.
        self.before = (0.0, 0.0)

    @property
    def running(self) -> bool:
        return self.rc is None

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_system

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    def sample(self, force: bool = False) -> None:
        """Read VmHWM and CPU time from /proc while the process runs."""
        now = time.monotonic()
        if self.rc is not None or (not force and now - self._last_sample < SAMPLE):
            return
        self._last_sample = now
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.hwm_bytes = max(self.hwm_bytes, int(line.split()[1]) * 1024)
                        break
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # Fields 14 and 15 (utime, stime) are 12 and 13 after the name.
            self.cpu_user = int(fields[11]) / CLK_TCK
            self.cpu_system = int(fields[12]) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass

    def poll(self) -> bool:
        """Reap the process if it ended (keeping its rusage); True while it runs."""
        if self.rc is not None:
            return False
        self.sample()
        try:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status, usage = self.pid, 0, None
        if pid == 0:
            return True
        self.ended = time.monotonic()
        self.rc = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.rc
        if usage is not None:
            self.cpu_user, self.cpu_system = usage.ru_utime, usage.ru_stime
        if self._logfile is not None:
            self._logfile.close()
        return False

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, sig: int = signal.SIGTERM, grace: float = 3.0) -> None:
        """Signal its process group; SIGKILL after ``grace``; reap it."""
        if not self.poll():
            return
        self.sample(force=True)
        for s in (sig, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, s)
            if self.wait(grace):
                return

    def baseline(self) -> None:
        """Count CPU from now on: a daemon's start and its wait are not the job's."""
        self.sample(force=True)
        self.before = (self.cpu_user, self.cpu_system)

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def usage(self) -> dict[str, Any]:
        return {
            "host": self.host.name,
            "role": self.role,
            "rc": self.rc,
            "seconds": self.seconds,
            "cpu_user": round(self.cpu_user - self.before[0], 3),
            "cpu_system": round(self.cpu_system - self.before[1], 3),
            "cpu": round(self.cpu - sum(self.before), 3),
            "cpu_before": round(sum(self.before), 3),
            "hwm_bytes": self.hwm_bytes,
        }
