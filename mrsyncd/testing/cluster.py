"""
A cluster of real mrsyncd daemons, for the daemon tests and the demo: a CA,
configuration files, and ``twistd mrsyncd`` processes started, watched and
killed like an operator would.

Everything runs on this host's loopback: the master listens on 127.0.0.1 on
a free port and sends on a multicast group and port pool of its own (random,
checked free), so parallel runs do not hear each other.

Several nodes on one host would all write the same destination path, since
a job has one destination for every target.  As root, each node therefore
runs in a mount namespace of its own (``unshare --mount``) in which its own
directory ``base/nodes/NAME`` is bind-mounted over the shared path
``base/shared``: a job to ``base/shared/x`` lands in ``base/nodes/NAME/x``
of every node, and `Cluster.node_dir` says where to look.  The network is
not namespaced: every daemon talks over the host's ``lo``.  Without root,
nodes share ``base/shared`` itself and only one node may receive a given
destination (`Cluster.mount_ns` says which mode is on).

The same `Cluster` runs across a LAN of network namespaces
when given the master's address, the LAN interface and the namespaces
(`lan`).

Every daemon is started with PR_SET_PDEATHSIG, so that none outlives a test
run that was killed; a test's teardown stops them all in any case.

A daemon's stdout and stderr (twistd logs to stdout with ``-n``) go to
``base/NAME.log``, appended across restarts; readiness is read from there:
"master listening" in the master's log, "node NAME registered" in the
master's log for a node.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mrsyncd.control import boxes
from mrsyncd.security import certs
from mrsyncd.testing import REPO, environment, trees

#: twistd on the running interpreter (``python -m twisted`` is ``twist``, not ``twistd``).
TWISTD = "from twisted.scripts.twistd import run; run()"
#: The mount-namespace wrapper: bind the node's directory over the shared path, then exec.
_BIND_AND_EXEC = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'

_unset: Any = object()
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies, so no daemon outlives a run."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def can_unshare() -> bool:
    """Can this process give a child a mount namespace of its own (root and unshare)?"""
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("unshare") is not None


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_multicast_pool(size: int) -> tuple[str, int]:
    """A group (base of ``size`` consecutive ones) and ``size`` consecutive free UDP ports."""
    rng = random.SystemRandom()
    while True:
        group = f"239.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}.{rng.randrange(1, 200)}"
        port = rng.randrange(20000, 32000 - size)
        try:
            for p in range(port, port + size):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("0.0.0.0", p))
        except OSError:
            continue
        return group, port


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_toml(path: str | Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write ``{section: {key: value}}`` as a TOML file (values written raw if they are `Raw`)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {value.text if isinstance(value, Raw) else _toml_value(value)}")
        lines.append("")
    Path(path).write_text("\n".join(lines))
    return Path(path)


class Raw:
    """A value written into TOML verbatim, for deliberately bad configurations."""

    def __init__(self, text: str) -> None:
        self.text = text


class CA:
    """A cluster CA in ``directory`` and the certificates it issues into ``out``."""

    def __init__(self, directory: str | Path, out: str | Path, name: str = "mrsyncd test CA") -> None:
        self.directory = str(directory)
        self.out = str(out)
        certs.create_ca(self.directory, name, 30)
        self.cert = os.path.join(self.directory, certs.CA_CERT)

    def issue(
        self,
        role: str,
        name: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        out: str | Path | None = None,
        expired: bool = False,
        tags: Sequence[str] = (),
    ) -> tuple[str, str]:
        """Issue a certificate; ``expired`` makes one that ended yesterday. Returns (cert, key)."""
        out = str(out or self.out)
        not_before = not_after = None
        if expired:
            now = certs.utcnow()
            not_before, not_after = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
        certs.issue(
            self.directory,
            role,
            name,
            out,
            30,
            dns,
            ips,
            tags=tags,
            not_before=not_before,
            not_after=not_after,
        )
        return os.path.join(out, name + ".crt"), os.path.join(out, name + ".key")

    def revoke(self, *cert_paths: str) -> str:
        """Add these certificates to the CA's revocation list (made if missing): its path."""
        certs.revoke(self.directory, [certs.load_certificate(p).serial_number for p in cert_paths])
        return os.path.join(self.directory, certs.CRL)


class Daemon:
    """One ``twistd mrsyncd --config FILE`` process, restartable, logging to ``log_path``."""

    def __init__(
        self,
        name: str,
        config: str | Path,
        log_path: str | Path,
        *,
        python: str = sys.executable,
        wrapper: Sequence[str] = (),
        cwd: str | Path | None = None,
        code: str | Path = REPO,
    ) -> None:
        """``code``: where the daemon imports mrsyncd from (a benchmark may measure another tree)."""
        self.name = name
        self.code = str(code)
        self.config = str(config)
        self.log_path = Path(log_path)
        self.python = python
        self.wrapper = list(wrapper)
        self.cwd = str(cwd or self.log_path.parent)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<Daemon {self.name} pid {pid} {'alive' if self.alive else 'down'}>"

    @property
    def argv(self) -> list[str]:
        return [
            *self.wrapper,
            self.python,
            "-c",
            TWISTD,
            "-n",
            "--pidfile=",
            "mrsyncd",
            "--config",
            self.config,
        ]

    def start(self) -> int:
        """Start the process; returns the log offset from which its new lines start."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        offset = self.mark()
        env = environment(self.code)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(f"==== test: starting {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        self.starts += 1
        return offset

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def mark(self) -> int:
        """The log's length now: pass it as ``since`` to wait only for newer lines."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float = 15.0, since: int = 0) -> re.Match[str]:
        """Wait for ``pattern`` (a regex) in the log after offset ``since``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log(since))
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no {pattern!r} in its log within {timeout} s; "
                    f"process {'alive' if self.alive else f'exited {self.returncode}'}; "
                    f"log tail:\n{self.tail()}"
                )
            if not self.alive:
                # One more look: the line may have been written just before it died.
                found = regex.search(self.log(since))
                if found:
                    return found
                raise AssertionError(
                    f"{self.name} exited with {self.returncode} before {pattern!r}; log tail:\n{self.tail()}"
                )
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to this daemon's own process (it was started by us) and, for SIGKILL, reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)

    def stop(self, timeout: float = 8.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
        return self.proc.wait()


class Cluster:
    """
    A CA, a master and nodes under ``base``, and the operator's `cli`.

    By default everything is on this host's loopback.  On a LAN of network
    namespaces (mrsyncd/testing/lan.py), ``host`` is the master's address,
    ``interface`` the multicast interface of every daemon, ``loopback``
    false, and ``master_netns`` (and each node's ``netns``) the namespace
    its daemon runs in; `cli` then runs in ``master_netns`` too.

    The master's certificate names ``host`` and localhost; the operator's
    certificate is ``operator``.  Options for ``[master]`` may be overridden
    with ``master_options``.
    """

    def __init__(
        self,
        base: str | Path,
        *,
        python: str = sys.executable,
        mount_ns: bool | None = None,
        max_jobs: int = 4,
        host: str = "127.0.0.1",
        interface: str = "lo",
        loopback: bool = True,
        master_netns: str | None = None,
        crl: bool = False,
        code: str | Path = REPO,
        log_level: str = "info",
        **master_options: Any,
    ) -> None:
        self.base = Path(base)
        #: Where the daemons and `cli` import mrsyncd from, and how much they log.
        self.code = str(code)
        self.log = {"level": log_level}
        self.host = host
        self.interface = interface
        self.loopback = loopback
        self.master_netns = master_netns
        self.python = python
        self.mount_ns = can_unshare() if mount_ns is None else mount_ns
        self.ca = CA(self.base / "ca", self.base / "certs")
        #: ``crl``: every daemon reads the CA's revocation list (empty at first; `CA.revoke`).
        self.tls_extra = {"crl": self.ca.revoke()} if crl else {}
        self.port = free_tcp_port()
        self.address = f"{host}:{self.port}"
        self.max_jobs = max_jobs
        self.group, self.port_base = free_multicast_pool(max_jobs)
        self.master_cert = self.ca.issue("master", "master", dns=["localhost"], ips=[host])
        self.operator = self.ca.issue("operator", "operator")
        self.state_dir = self.base / "state"
        self.shared = self.base / "shared"
        self.shared.mkdir(parents=True, exist_ok=True)
        self.master_options = master_options
        self.master: Daemon | None = None
        self.nodes: dict[str, Daemon] = {}
        self.others: list[Daemon] = []

    # Configuration.

    def tls(self, cert: str, key: str) -> dict[str, str]:
        return {"ca": self.ca.cert, "certificate": cert, "key": key, **self.tls_extra}

    def master_config(self, path: str | Path | None = None, **overrides: Any) -> Path:
        cert, key = self.master_cert
        master = {
            "address": self.host,
            "port": self.port,
            "state_dir": str(self.state_dir),
            # Anything but the master's key and state directory, unless a test narrows it.
            "sources": ["/"],
            "interface": self.interface,
            "group": self.group,
            "port_base": self.port_base,
            "max_jobs": self.max_jobs,
            "loopback": self.loopback,
            "rate": "400M",
            "grace": 20,
            **self.master_options,
            **overrides,
        }
        return write_toml(
            path or self.base / "master.toml",
            {"log": self.log, "tls": self.tls(cert, key), "master": master},
        )

    def node_config(
        self,
        name: str,
        *,
        roots: Iterable[str | Path] | None = None,
        tags: Sequence[str] = (),
        identity: tuple[str, str] | None = None,
        **overrides: Any,
    ) -> Path:
        # The certificate grants the tags the configuration names.
        cert, key = identity or self.ca.issue("node", name, tags=tags)
        node = {
            "master": self.address,
            "interface": self.interface,
            "roots": [str(r) for r in (roots if roots is not None else [self.shared])],
            "tags": list(tags),
            **overrides,
        }
        return write_toml(
            self.base / f"{name}.toml",
            {"log": self.log, "tls": self.tls(cert, key), "node": node},
        )

    def node_dir(self, name: str) -> Path:
        """Where ``shared`` of node ``name`` is, seen from here."""
        return self.base / "nodes" / name if self.mount_ns else self.shared

    # Daemons.

    def start_master(self, timeout: float = 20.0) -> Daemon:
        if self.master is None:
            self.master = Daemon(
                "master",
                self.master_config(),
                self.base / "master.log",
                python=self.python,
                wrapper=_in_netns(self.master_netns),
                code=self.code,
            )
        since = self.master.start()
        self.master.wait_log(r"master listening on", timeout, since)
        return self.master

    def add_node(
        self,
        name: str,
        *,
        start: bool = True,
        wait: bool = True,
        mount_ns: bool | None = None,
        netns: str | None = None,
        **config: Any,
    ) -> Daemon:
        """
        Configure node ``name`` (see `node_config`) and start it (in network
        namespace ``netns``, if given); wait until the master has it.
        """
        path = self.node_config(name, **config)
        wrapper = _in_netns(netns)
        if self.mount_ns if mount_ns is None else mount_ns:
            mine = self.node_dir(name)
            mine.mkdir(parents=True, exist_ok=True)
            wrapper += [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                _BIND_AND_EXEC,
                "sh",
                str(mine),
                str(self.shared),
            ]
        daemon = Daemon(
            name, path, self.base / f"{name}.log", python=self.python, wrapper=wrapper, code=self.code
        )
        self.nodes[name] = daemon
        if start:
            self.start_node(name, wait=wait)
        return daemon

    def start_node(self, name: str, wait: bool = True, timeout: float = 20.0) -> None:
        assert self.master is not None
        since = self.master.mark()
        self.nodes[name].start()
        if wait:
            self.wait_registered(name, since, timeout)

    def wait_registered(self, name: str, since: int, timeout: float = 20.0) -> None:
        """Wait for the master to log that ``name`` registered (after log offset ``since``)."""
        assert self.master is not None
        deadline = time.monotonic() + timeout
        while True:
            if re.search(rf"node {re.escape(name)} registered from", self.master.log(since)):
                return
            node = self.nodes.get(name)
            if node is not None and not node.alive:
                raise AssertionError(f"node {name} exited with {node.returncode}:\n{node.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"node {name} did not register within {timeout} s\n{self.diagnostics([name])}"
                )
            time.sleep(0.05)

    def restart_master(self, sig: int = signal.SIGTERM) -> None:
        assert self.master is not None
        if sig == signal.SIGKILL:
            self.master.kill(signal.SIGKILL)
        else:
            self.master.stop()
        self.start_master()

    def close(self) -> None:
        """Stop every daemon this cluster started: nodes first, then the master."""
        for daemon in [*self.others, *self.nodes.values()]:
            daemon.stop(5)
        if self.master is not None:
            self.master.stop(5)

    def diagnostics(self, names: Iterable[str] | None = None, lines: int = 25) -> str:
        """The tails of the master's and the nodes' logs, for assertion messages."""
        daemons = [self.master] if self.master else []
        daemons += [d for n, d in self.nodes.items() if names is None or n in names]
        return "\n".join(f"--- {d.name} ({d!r}):\n{d.tail(lines)}" for d in daemons)

    # The operator's command line.

    def cli(
        self,
        *args: str,
        identity: tuple[str, str] | None = _unset,
        ca: str | None = None,
        master: str | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """
        Run ``mrsync ARGS`` on this interpreter as the operator (or as
        ``identity``: (cert, key), or None for no certificate at all).
        """
        if identity is _unset:
            identity = self.operator
        argv = [
            *_in_netns(self.master_netns),
            self.python,
            "-m",
            "mrsyncd.scripts.mrsync",
            "--master",
            master or self.address,
        ]
        argv += ["--ca", ca or self.ca.cert]
        if identity is not None:
            argv += ["--cert", identity[0], "--key", identity[1]]
        return subprocess.run(
            [*argv, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=cli_env(self.code),
            cwd=str(self.base),
        )

    def cli_popen(self, *args: str) -> subprocess.Popen[str]:
        cert, key = self.operator
        argv = [
            *_in_netns(self.master_netns),
            self.python,
            "-m",
            "mrsyncd.scripts.mrsync",
            "--master",
            self.address,
            "--ca",
            self.ca.cert,
        ]
        argv += ["--cert", cert, "--key", key, *args]
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(self.code),
            cwd=str(self.base),
        )

    def cli_ok(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        result = self.cli(*args, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(
                f"mrsync {' '.join(args)} exited {result.returncode}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}\n{self.diagnostics()}"
            )
        return result

    def cli_json(self, *args: str, timeout: float = 120.0) -> Any:
        return json.loads(self.cli_ok(*args, "--json", timeout=timeout).stdout)

    def status(self, job: int, files: bool = False) -> dict[str, Any]:
        args = ["status", str(job), *(["--files"] if files else [])]
        result: dict[str, Any] = self.cli_json(*args)
        return result

    def node_states(self) -> dict[str, str]:
        return {n["name"]: n["state"] for n in self.cli_json("nodes")}

    def wait_node_states(self, want: dict[str, str], timeout: float = 20.0) -> dict[str, str]:
        """Poll ``mrsync nodes`` until each named node is in the wanted state."""
        return wait_for(
            self.node_states,
            lambda states: all(states.get(name) == state for name, state in want.items()),
            timeout,
            f"nodes in states {want}",
            self.diagnostics,
        )

    def detach(self, *args: str) -> int:
        """``mrsync push --detach --json ARGS``: the job id."""
        return int(self.cli_json("push", "--detach", *args)["job"])


def _in_netns(netns: str | None) -> list[str]:
    """The prefix that runs a command in network namespace ``netns`` (it execs: same pid)."""
    return ["ip", "netns", "exec", netns] if netns else []


def cli_env(code: str = REPO) -> dict[str, str]:
    """The environment for the CLI: mrsyncd from ``code`` first, no stray MRSYNC_* settings."""
    env = environment(code, {k: v for k, v in os.environ.items() if not k.startswith("MRSYNC_")})
    # No client.toml from the real home directory.
    env["HOME"] = "/nonexistent"
    return env


def wait_for(
    probe: Callable[[], Any],
    done: Callable[[Any], bool],
    timeout: float,
    what: str,
    diagnostics: Callable[[], str] | None = None,
    interval: float = 0.1,
) -> Any:
    """Call ``probe`` until ``done(value)``; the last value, or AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            extra = f"\n{diagnostics()}" if diagnostics else ""
            raise AssertionError(f"no {what} within {timeout} s; last: {value!r}{extra}")
        time.sleep(interval)


class FinalPaths:
    """
    Watches final paths while a job runs, from a thread: whenever one of
    them exists it must hold one of its accepted contents whole (the old
    file or the new one), never a partial or corrupt file.  A file is read
    and digested once per identity (inode, size, mtime, ctime), so a file
    written in place would be read again and caught.
    ``accepted`` maps a path to the (size, BLAKE2b hex digest) pairs it may
    hold (see `content`).
    """

    def __init__(self, accepted: dict[Path, set[tuple[int, str]]], interval: float = 0.02) -> None:
        self.accepted = {Path(p): set(v) for p, v in accepted.items()}
        self.interval = interval
        self.polls = 0
        #: Path -> how many times it was seen absent, and whole.
        self.absent: dict[Path, int] = dict.fromkeys(self.accepted, 0)
        self.whole: dict[Path, int] = dict.fromkeys(self.accepted, 0)
        self.violations: list[str] = []
        self._known: dict[tuple[Path, int, int, int, int], bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="final-paths", daemon=True)

    def __enter__(self) -> FinalPaths:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _look(self, path: Path) -> None:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            self.absent[path] += 1
            return
        except OSError as e:
            self.violations.append(f"{path}: cannot open: {e}")
            return
        with f:
            st = os.fstat(f.fileno())
            identity = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if identity not in self._known:
                self._known[identity] = content_of(f) in self.accepted[path]
            if self._known[identity]:
                self.whole[path] += 1
            else:
                self.violations.append(f"{path}: {st.st_size} bytes, neither the old nor the new file")

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self.accepted:
                self._look(path)
            self.polls += 1
            self._stop.wait(self.interval)

    def check(self) -> str:
        """Stop; fail if any path was ever seen partial or corrupt.  Returns a summary."""
        self.stop()
        assert not self.violations, f"partial or corrupt files at final paths: {self.violations[:5]}"
        assert self.polls > 1, "the final paths were not polled during the job"
        return f"{self.polls} polls: " + ", ".join(
            f"{'/'.join(p.parts[-4:])} absent {self.absent[p]} whole {self.whole[p]}" for p in self.accepted
        )


def content_of(f: Any) -> tuple[int, str]:
    h = hashlib.blake2b()
    size = 0
    while piece := f.read(1 << 20):
        h.update(piece)
        size += len(piece)
    return size, h.hexdigest()


def content(path: str | Path) -> tuple[int, str]:
    """(size, digest) of a file, as `FinalPaths` compares them."""
    with open(path, "rb") as f:
        return content_of(f)


class AmpClient(boxes.BoxStream):
    """
    A blocking AMP peer over TLS made with Python's own ssl module: it
    sends whatever boxes it is given, well-formed or not, and makes none of
    mrsync's own checks, so only the far end decides.  ``server_side``
    wraps an accepted socket instead (a stand-in master).
    """

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        ca: str,
        identity: tuple[str, str] | None,
        timeout: float = 30.0,
    ) -> AmpClient:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(ca)
        if identity is not None:
            context.load_cert_chain(*identity)
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            return cls(context.wrap_socket(raw, server_hostname=host))
        except BaseException:
            raw.close()
            raise

    def closed(self, timeout: float = 10.0) -> bool:
        """Wait until the peer closes the connection (True), or ``timeout`` passes (False)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
            return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def call(self, command: str, args: Iterable[tuple[bytes, bytes]] = ()) -> dict[bytes, bytes]:
        """Ask, and return the answer box; an error answer raises `boxes.AmpError`."""
        return self.ask(command, args)

    # The operator's commands, as the master's control contract has them.

    def submit(self, spec: Any) -> int:
        return int(self.call("Submit", boxes.pieces(b"spec", json.dumps(spec).encode()))[b"job"])

    def status(self, job: int, files: bool = False) -> Any:
        answer = self.call("JobStatus", [(b"job", b"%d" % job), (b"files", b"True" if files else b"False")])
        return json.loads(boxes.joined(answer, b"status"))

    def nodes(self) -> Any:
        return json.loads(boxes.joined(self.call("ListNodes"), b"nodes"))

    def wait_job(self, job: int, timeout: float, interval: float = 0.1) -> Any:
        """Poll until the job ends; its final status with files."""
        deadline = time.monotonic() + timeout
        while self.status(job)["state"] not in ("done", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} did not end within {timeout} s: {self.status(job)}")
            time.sleep(interval)
        return self.status(job, files=True)


def operator_client(c: Cluster, timeout: float = 30.0) -> AmpClient:
    """An `AmpClient` to the cluster's master with the operator's certificate."""
    return AmpClient.connect(c.host, c.port, c.ca.cert, c.operator, timeout)


# Helpers the daemon, fault, hostile-input and load tests share.


class _Check:
    def assertEqual(self, first: Any, second: Any, msg: Any = None) -> None:  # noqa: N802
        assert first == second, f"{msg}: {first!r} != {second!r}" if msg else f"{first!r} != {second!r}"


def same_tree(src: Path, dst: Path) -> None:
    """``dst`` holds what ``src`` does: contents, kinds, modes, mtimes, links."""
    assert dst.is_dir(), f"{dst} was not made"
    trees.assert_same_tree(_Check(), str(src), str(dst))


def random_file(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))


def part_files(top: Path) -> list[str]:
    return sorted(str(p) for p in top.rglob(".mrsync-*")) if top.exists() else []


@contextlib.contextmanager
def time_limit(seconds: int, what: str = "the test") -> Iterator[None]:
    """A hard bound: SIGALRM raises in the test once ``seconds`` have passed."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"{what} ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def operator_fleet(c: Cluster) -> Iterator[AmpClient]:
    """
    Every daemon of ``c`` up (restarting any a test killed) and connected,
    and an operator's AMP connection to the master; afterwards, none may
    have died.
    """
    assert c.master is not None
    if not c.master.alive:
        c.start_master()
    for name, daemon in c.nodes.items():
        if not daemon.alive:
            c.start_node(name)
    client = operator_client(c)
    try:
        wait_for(
            lambda: {n["name"]: n["state"] for n in client.nodes()},
            lambda states: all(states.get(n) == "connected" for n in c.nodes),
            20,
            "every node connected",
            c.diagnostics,
        )
        yield client
    finally:
        client.close()
        assert c.master.alive, f"the master died:\n{c.master.tail()}"
        dead = [n for n, d in c.nodes.items() if not d.alive]
        assert not dead, f"nodes died: {dead}\n{c.diagnostics(dead)}"
