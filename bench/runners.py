"""
The tools the benchmark runs, one `Runner` each, and the driver that times them.

A runner starts the receivers (as a cluster would have them waiting), then
*submits* the transfer (starts the sender: the clock starts here), and says
where each node's copy lands.  `measure` does the rest for every tool alike:
counters, per-node completion times (the copy at its final path with its
full size), CPU and memory of every process, and the sha256 of every copy.
A tree case (`Case.files`) is complete at every node when its sender exits
successfully, and each copy is walked and compared with the source's
`tree_digest` afterwards.

To add a tool, subclass `Runner` and register it in `RUNNERS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import Proc
from bench.scenarios import Case
from mrsyncd.testing.cluster import Cluster
from mrsyncd.testing.lan import IPERF_PORT, Host, Lan

REPO = Path(__file__).resolve().parent.parent
GROUP_BASE = "239.255.88."
#: The rate controller's debug line, every 0.1 s (mrsyncd/engine/transfer.py).
RATE_LINE = re.compile(r"rate ([0-9.]+) Mbit/s, monitor ([^,\s]+)")
#: The master's line at a job's end: where its time went (scan, offer, send, results).
PHASES_LINE = re.compile(r"job \d+ \w+ in [0-9.]+ s \(((?:\w+ [0-9.]+ s(?:, )?)+)\)")
#: Bytes an Ethernet frame adds to a UDP payload (14 Ethernet + 20 IPv4 + 8 UDP):
#: tbf counts the frame without its FCS.
FRAME_OVERHEAD = 42


@dataclass
class Context:
    lan: Lan
    case: Case
    source: Path
    sha256: str
    workdir: Path
    logdir: Path
    #: The share of the master's link each tool is told to use.
    rate_factor: float
    timeout: float
    profile: Path | None = None
    #: Where the snapshot of mrsyncd/ taken when the run started lives (PYTHONPATH for its processes).
    code: Path = REPO

    @property
    def wire_bps(self) -> float:
        """The rate on the wire (Ethernet frames) each tool is asked to keep."""
        return self.case.link_bps * self.rate_factor


@dataclass
class ToolResult:
    tool: str
    ok: bool = False
    error: str = ""
    #: Submission to the last node's copy complete at its final path.
    wall: float | None = None
    #: Submission to the sender's exit.
    sender_exit: float | None = None
    node_seconds: dict[str, float | None] = field(default_factory=dict)
    verified: dict[str, bool] = field(default_factory=dict)
    sender: dict[str, Any] = field(default_factory=dict)
    receivers: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    qdisc: dict[str, Any] = field(default_factory=dict)
    snmp: dict[str, int] = field(default_factory=dict)
    dropped_udp: int = 0
    tcp: dict[str, Any] = field(default_factory=dict)
    rate_arg: str = ""
    #: Whole-machine CPU over the transfer, from /proc/stat (seconds by kind, and busy share of all cores).
    machine_cpu: dict[str, float] = field(default_factory=dict)
    #: The master's eth0 transmit counter: [seconds since submission, bytes], every ~0.1 s.
    timeline: list[tuple[float, int]] = field(default_factory=list)
    #: From the timeline: first data out, steady rate (10%..90% of bytes), tail after 99%.
    phases: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def wait_quiet(limit: float = 0.15, window: float = 1.0, timeout: float = 180.0) -> float:
    """
    Wait until the machine's CPU is mostly idle (other work on a shared
    machine skews every figure); returns the busy share last seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        a = machine_cpu()
        time.sleep(window)
        b = machine_cpu()
        busy = cpu_delta(a, b, window)["busy_share"]
        if busy <= limit or time.monotonic() > deadline:
            return busy


def process_cpu(our_netns: set[int]) -> dict[int, tuple[str, float]]:
    """
    CPU seconds of every process on the machine that is neither ours (the
    benchmark, or anything in the LAN's namespaces) nor short-lived:
    {pid: (kind, seconds)} with kind "kernel" for kernel threads (softirq
    work in ksoftirqd lands there) or "other" for other people's work.
    """
    me = os.getpid()
    out: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
            fields = rest.split()
            ppid, flags = int(fields[1]), int(fields[6])
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            if flags & 0x00200000 or pid == 2 or ppid == 2:  # PF_KTHREAD
                out[pid] = ("kernel", cpu)
                continue
            if ppid == me or os.stat(f"/proc/{pid}/ns/net").st_ino in our_netns:
                continue
            out[pid] = ("other", cpu)
        except (OSError, ValueError, IndexError):
            continue
    return out


def foreign_cpu(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    total = {"kernel": 0.0, "other": 0.0}
    for pid, (kind, cpu) in after.items():
        total[kind] += cpu - before.get(pid, (kind, 0.0))[1]
    return {k: round(v, 2) for k, v in total.items()}


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_cpu() -> list[int]:
    """Jiffies from /proc/stat's first line: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def cpu_delta(a: list[int], b: list[int], wall: float) -> dict[str, float]:
    d = [(y - x) / os.sysconf("SC_CLK_TCK") for x, y in zip(a, b, strict=True)]
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    out = {k: round(v, 2) for k, v in zip(names, d, strict=True)}
    total = sum(d)
    out["busy_share"] = round(1 - (d[3] + d[4]) / total, 3) if total else 0.0
    out["wall"] = round(wall, 2)
    return out


def tx_bytes(pid: int, ifname: str = "eth0") -> int | None:
    """Bytes sent by ``ifname`` of the namespace that ``pid`` runs in."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == ifname:
                    return int(rest.split()[8])
    except (OSError, ValueError, IndexError):
        pass
    return None


def in_frames(timeline: list[tuple[float, int]], frame_bytes: int | None) -> list[tuple[float, int]]:
    """
    The master's bytes sent, scaled to the frames its link's bucket sent.
    /proc/net/dev counts a batch of datagrams sent with UDP segmentation
    offload that the tbf passes whole (8 of 1514 bytes fit its 16 KB
    burst at 100 Mbit/s) as one packet with one set of headers: it showed
    mrsyncd's pass at 97.6% of the frames the tbf sent, and so of the link
    (the tbf charges every frame).  Tools that send a datagram a call are
    counted right, and their scale stays 1.
    """
    if not frame_bytes or len(timeline) < 2 or timeline[-1][1] <= 0:
        return timeline
    scale = frame_bytes / timeline[-1][1]
    return [(t, round(b * scale)) for t, b in timeline]


def phases(timeline: list[tuple[float, int]], wall: float | None) -> dict[str, float | None]:
    if len(timeline) < 3 or timeline[-1][1] - timeline[0][1] <= 0:
        return {}
    base = timeline[0][1]
    total = timeline[-1][1] - base

    def when(share: float) -> float:
        return next(t for t, b in timeline if b - base >= share * total)

    first = next((t for t, b in timeline if b - base > 64 * 1024), None)
    t10, t90, t99 = when(0.10), when(0.90), when(0.99)
    steady = 0.8 * total * 8 / (t90 - t10) if t90 > t10 else None
    return {
        "first_data_s": first,
        "steady_wire_bps": steady,
        "t99_s": t99,
        "tail_s": (wall - t99) if wall else None,
        "wire_bytes": total,
    }


class Runner:
    name = ""
    description = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.lan = ctx.lan
        self.receivers: list[Proc] = []
        self.sender: Proc | None = None
        self.dir = ctx.workdir / self.name
        self.rate_arg = ""

    # What a tool says.

    def node_dir(self, node: Host) -> Path:
        return self.dir / node.name

    def node_path(self, node: Host) -> Path:
        """Where a node's copy of the source ends up, complete."""
        return self.node_dir(node) / self.ctx.source.name

    def start_receivers(self) -> None:
        raise NotImplementedError

    def submit(self) -> Proc:
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        return {}

    def daemons(self) -> list[Proc]:
        """The processes that wait for the job: their CPU counts from its submission."""
        return self.receivers

    def sending(self, submitted: Proc) -> Proc:
        """The process that sends the data (for the profiler)."""
        return submitted

    def sender_usage(self, submitted: Proc) -> dict[str, Any]:
        """What sending cost, as `Proc.usage` says it: the submitted process, for most tools."""
        return submitted.usage()

    def after_first(self, result: ToolResult) -> None:
        """
        More work once the timed transfer is done and verified, before the
        processes stop (figures go to ``result.details``; a failure sets
        ``result.error`` and ``result.ok``): nothing, for most tools.
        """

    # Shared.

    def proc(self, host: Host, role: str, argv: list[str], **kwargs: Any) -> Proc:
        p = Proc(host, role, argv, self.ctx.logdir / f"{self.name}-{host.name}-{role}.log", **kwargs)
        if role == "sender":
            self.sender = p
        else:
            self.receivers.append(p)
        return p

    def prepare_dirs(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for node in self.lan.nodes:
            self.node_dir(node).mkdir(parents=True)

    def stop(self) -> None:
        for p in [*self.receivers, *([self.sender] if self.sender else [])]:
            p.stop()

    def clean(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_idle(procs: list[Proc], timeout: float = 30.0, quiet: float = 0.02) -> None:
    """Wait until started processes have loaded and sit waiting (CPU stops growing)."""
    deadline = time.monotonic() + timeout
    time.sleep(0.3)
    last = None
    while time.monotonic() < deadline:
        for p in procs:
            p.sample(force=True)
            if not p.poll():
                raise RuntimeError(f"{p.role} on {p.host.name} exited early ({p.rc}):\n{p.tail()}")
        cpu = [p.cpu for p in procs]
        if last is not None and all(now - then <= quiet for now, then in zip(cpu, last, strict=True)):
            return
        last = cpu
        time.sleep(0.3)


class MrsyncEngine(Runner):
    """mrsyncd's data plane alone: ``mrsync-engine send`` and ``receive`` (mrsyncd.scripts.mrsync_engine)."""

    name = "mrsyncd-engine"
    description = "mrsync-engine send/receive: the data plane alone, without the daemons"
    DATA_PORT = 7717
    CONTROL_PORT = 7718

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mrsyncd.scripts.mrsync_engine"]

    def env(self) -> dict[str, str]:
        # With the snapshot as the working directory too: ``python3 -m``
        # puts the working directory first on sys.path.
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.ctx.code)
        return env

    def probe_datagram(self) -> None:
        """Check that mrsyncd loads from the snapshot."""
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "from mrsyncd.wire import datagram as d; print(d.__file__)",
            ],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=str(self.ctx.code),
        )
        if probe.returncode != 0 or not probe.stdout.startswith(str(self.ctx.code)):
            raise RuntimeError(f"mrsyncd does not load from {self.ctx.code}: {probe.stdout} {probe.stderr}")

    def start_receivers(self) -> None:
        self.probe_datagram()
        m = self.lan.master
        for node in self.lan.nodes:
            self.proc(
                node,
                "receiver",
                [
                    *self.command(),
                    "receive",
                    "--connect",
                    f"tcp:{m.ip}:{self.CONTROL_PORT}",
                    "--name",
                    node.name,
                    "--root",
                    str(self.node_dir(node)),
                    "--interface",
                    "eth0",
                    "--wait",
                    str(self.ctx.timeout),
                ],
                env=self.env(),
                cwd=str(self.ctx.code),
            )
        wait_idle(self.receivers)

    def submit(self) -> Proc:
        m = self.lan.master
        # mrsyncd is told the link's speed, as an operator would write it in
        # its configuration: its congestion control finds what the path
        # carries (the fixed-rate tools are given a share of the link that
        # their overheads leave room for, ``--rate-factor``).
        rate = self.ctx.case.link_bps
        self.rate_arg = f"--rate {rate:.0f}"
        self.report = self.ctx.logdir / f"{self.name}-report.json"
        return self.proc(
            m,
            "sender",
            [
                *self.command(),
                "--verbose",
                "send",
                "--listen",
                f"tcp:{self.CONTROL_PORT}:interface={m.ip}",
                "--receivers",
                str(len(self.lan.nodes)),
                "--wait",
                "60",
                "--rate",
                f"{rate:.0f}",
                "--destination",
                "/",
                "--interface",
                "eth0",
                "--group",
                GROUP_BASE + "1",
                "--port",
                str(self.DATA_PORT),
                "--no-loopback",
                "--grace",
                "30",
                "--report",
                str(self.report),
                str(self.ctx.source),
            ],
            env=self.env(),
            cwd=str(self.ctx.code),
        )

    def rate_log(self) -> Path:
        """Where the rate controller's debug lines are."""
        assert self.sender is not None
        return self.sender.log

    def rate_details(self) -> dict[str, Any]:
        rates: list[float] = []
        monitors: dict[str, int] = {}
        phases: dict[str, float] = {}
        for line in self.rate_log().read_text(errors="replace").splitlines():
            m = RATE_LINE.search(line)
            if m:
                rates.append(float(m.group(1)))
                monitors[m.group(2)] = monitors.get(m.group(2), 0) + 1
            m = PHASES_LINE.search(line)
            if m:
                phases = {
                    name: float(seconds) for name, seconds in re.findall(r"(\w+) ([0-9.]+) s", m.group(1))
                }
        ordered = sorted(rates)
        return {
            "rate_samples": len(rates),
            "rate_mbit_median": ordered[len(ordered) // 2] if ordered else None,
            "rate_mbit_trace": rates,
            "monitors": monitors,
            "phases": phases,
        }

    def details(self) -> dict[str, Any]:
        try:
            report = json.loads(self.report.read_text())
        except (OSError, ValueError) as e:
            return {"report_error": str(e)}
        peers = report.get("peers", {})
        return {
            **self.rate_details(),
            "seconds": report.get("seconds"),
            "passes": report.get("passes"),
            "sender_stats": report.get("sender_stats"),
            "ok": report.get("ok"),
            "peer_stats": {name: p.get("stats") for name, p in peers.items()},
            "failed": {name: p.get("reason") for name, p in peers.items() if not p.get("ok")},
        }


class MrsyncDaemons(MrsyncEngine):
    """
    mrsyncd as a cluster runs it: ``twistd mrsyncd`` on the master and on
    every node, waiting and registered before the clock starts, and the job
    submitted with ``mrsync push``: the clock runs from that command's start.

    Each node daemon runs in a mount namespace of its own with its directory
    bound over the job's one destination (``ip netns exec`` already gives it
    one), so every node writes its own copy.
    """

    name = "mrsyncd"
    description = "twistd mrsyncd on the master and every node, the job submitted with mrsync push"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.master: Proc | None = None
        self.cluster: Cluster | None = None

    def node_dir(self, node: Host) -> Path:
        """Each node's directory, bound over the cluster's one destination in the node's mount namespace."""
        assert self.cluster is not None
        return self.cluster.node_dir(node.name)

    def prepare_dirs(self) -> None:
        """The lab's cluster (`mrsyncd.testing.cluster`) on the LAN, from the code under test."""
        shutil.rmtree(self.dir, ignore_errors=True)
        m = self.lan.master
        # The master is told the link's speed, as its operator would write
        # it (see MrsyncEngine.submit).
        rate = self.ctx.case.link_bps
        self.rate_arg = f"rate = {rate:.0f}"
        self.cluster = Cluster(
            self.dir / "cluster",
            python=sys.executable,
            code=self.ctx.code,
            mount_ns=True,
            max_jobs=1,
            host=m.ip,
            interface="eth0",
            loopback=False,
            master_netns=m.netns,
            log_level="debug",  # the rate controller's lines (`rate_details`)
            rate=f"{rate:.0f}",
            grace=30,
        )

    def start_receivers(self) -> None:
        """The cluster's daemons, started and registered, measured as `Proc`s."""
        self.probe_datagram()
        m, cluster = self.lan.master, self.cluster
        assert cluster is not None
        daemon = cluster.start_master(timeout=60)
        assert daemon.proc is not None
        # Proc measures it and reaps it (wait4); the Daemon's Popen then finds it ended (ECHILD).
        self.master = Proc(m, "master", daemon.argv, daemon.log_path, started=daemon.proc)
        for node in self.lan.nodes:
            cluster.add_node(node.name, netns=node.netns, wait=False)
        for node in self.lan.nodes:
            cluster.wait_registered(node.name, 0, timeout=60)
            started = cluster.nodes[node.name]
            assert started.proc is not None
            self.receivers.append(Proc(node, "node", started.argv, started.log_path, started=started.proc))
        wait_idle([self.master, *self.receivers])

    def push_argv(self, source: Path) -> list[str]:
        """``mrsync push --json SOURCE all:DEST/``: SOURCE (a file, or a tree without a slash) into DEST."""
        assert self.cluster is not None
        cert, key = self.cluster.operator
        return [
            sys.executable,
            "-m",
            "mrsyncd.scripts.mrsync",
            "--master",
            self.cluster.address,
            "--ca",
            self.cluster.ca.cert,
            "--cert",
            cert,
            "--key",
            key,
            "push",
            "--json",
            str(source),
            f"all:{self.cluster.shared}/",
        ]

    def submit(self) -> Proc:
        m = self.lan.master
        return self.proc(m, "sender", self.push_argv(self.ctx.source), env=self.env(), cwd=str(self.ctx.code))

    def push(self, source: Path, tag: str) -> dict[str, Any]:
        """
        One more ``mrsync push`` of ``source``, timed from the command's start
        to its exit, once the machine is quiet: its seconds, exit status and
        the job's status (`job_status`).
        """
        wait_quiet()
        m = self.lan.master
        log = self.ctx.logdir / f"{self.name}-{m.name}-push-{tag}.log"
        p = Proc(m, f"push-{tag}", self.push_argv(source), log, env=self.env(), cwd=str(self.ctx.code))
        # With --profile, every push is profiled as the first is: the
        # command, the master and the first node (an unchanged tree's costs
        # are all theirs).
        profile = self.ctx.profile
        watched = (("command", p), ("master", self.master), ("receiver", self.receivers[0]))
        profilers = (
            [
                start_profiler(proc, profile.with_name(f"{self.name}-{tag}-{who}.pyspy.txt"), self.ctx)
                for who, proc in watched
                if proc is not None
            ]
            if profile is not None
            else []
        )
        finished = p.wait(self.ctx.timeout)
        for profiler in profilers:
            if profiler is not None:
                stop_profiler(profiler)
        if not finished:
            p.stop()
            return {"seconds": None, "rc": None, "error": f"timed out after {self.ctx.timeout:.0f} s"}
        job = job_status(log)
        out = {
            "seconds": round(p.seconds or 0, 3),
            "rc": p.rc,
            "state": job.get("state"),
            "sent_bytes": job.get("sent_bytes"),
            "payload_bytes": job.get("payload_bytes"),
            "changed_paths": {name: n.get("changed") for name, n in (job.get("nodes") or {}).items()},
        }
        if p.rc != 0:
            out["error"] = f"exited {p.rc}: {job.get('message') or job.get('status_error') or p.tail()}"
        return out

    def after_first(self, result: ToolResult) -> None:
        """
        A tree's next pushes, while the daemons run: the same source again
        (nothing changed: ``again_s``), then a copy of it with 1% of its
        files changed (``changed_1pct``), after which every node must hold
        that copy.  The copy is made beside the nodes' directories, never
        in the cached source (other tools and runs use it), under the same
        name, so that it lands where the source did.
        """
        if not self.ctx.case.files:
            return
        assert self.master is not None
        details = result.details
        again = self.push(self.ctx.source, "again")
        details["again"] = again
        details["again_s"] = again["seconds"]
        copy = self.dir / "changed" / self.ctx.source.name
        shutil.copytree(self.ctx.source, copy)  # copy2: the mtimes stay
        changed = change_files(copy, 0.01)
        pushed = self.push(copy, "changed")
        details["changed_1pct"] = {
            **pushed,
            "files": len(changed),
            "changed_bytes": sum(changed.values()),
        }
        verified, mismatch = verify(self, copy, tree_digest(tree_listing(copy)))
        details["changed_1pct"]["verified"] = verified
        for p in self.daemons():
            p.sample(force=True)
        details["hwm_after_pushes"] = {
            "master": self.master.hwm_bytes,
            "nodes_max": max(p.hwm_bytes for p in self.receivers),
        }
        problems = [
            f"the push again {again['error']}" if again.get("error") else "",
            f"the push of 1% changed {pushed['error']}" if pushed.get("error") else "",
            f"after the push of 1% changed, {mismatch}" if mismatch else "",
        ]
        if any(problems):
            result.error = "; ".join(p for p in problems if p)
            result.ok = False

    def daemons(self) -> list[Proc]:
        return [*([self.master] if self.master else []), *self.receivers]

    def sending(self, submitted: Proc) -> Proc:
        assert self.master is not None
        return self.master

    def sender_usage(self, submitted: Proc) -> dict[str, Any]:
        """The master daemon's work for this job, with the ``mrsync push`` that asked for it."""
        assert self.master is not None
        self.master.sample(force=True)
        usage = self.master.usage()
        cli = submitted.usage()
        for key in ("cpu_user", "cpu_system", "cpu"):
            usage[key] = round(usage[key] + cli[key], 3)
        usage["cli"] = cli
        usage["seconds"] = cli["seconds"]
        return usage

    def rate_log(self) -> Path:
        assert self.master is not None
        return self.master.log

    def details(self) -> dict[str, Any]:
        assert self.sender is not None
        return {**self.rate_details(), "job": job_status(self.sender.log)}

    def stop(self) -> None:
        super().stop()
        if self.master is not None:
            self.master.stop()
        if self.cluster is not None:
            self.cluster.close()
            # The daemons' logs, kept with the run's (the cluster's directory
            # goes): every daemon started, also one that never registered.
            master = self.cluster.master
            for daemon in [*([master] if master else []), *self.cluster.nodes.values()]:
                role = "master" if daemon is master else "node"
                with contextlib.suppress(OSError):
                    kept = self.ctx.logdir / f"{self.name}-{daemon.name}-{role}.log"
                    shutil.copyfile(daemon.log_path, kept)


def job_status(log: Path) -> dict[str, Any]:
    """
    The job's status as ``mrsync push --json`` printed it in ``log``, with
    each node's per-file results counted (a tree's would be every path at
    every node).
    """
    text = log.read_text(errors="replace")
    try:
        status = json.loads(text[text.index("{") :])
    except ValueError as e:
        return {"status_error": f"{e}: {text[-500:]}"}
    files = status.get("files")
    if isinstance(files, dict):
        status["files"] = {
            node: {result: list(results.values()).count(result) for result in set(results.values())}
            for node, results in files.items()
        }
    return status


class Udpcast(Runner):
    """Debian's udpcast: ``udp-sender`` / ``udp-receiver`` at a fixed --max-bitrate."""

    name = "udpcast"
    description = "udp-sender/udp-receiver, --max-bitrate fixed"
    PORTBASE = 9000
    #: udp-sender's --max-bitrate counts its datagrams: 1456 data + its header.
    DATAGRAM = 1456 + 16
    fixed_rate = True

    def start_receivers(self) -> None:
        for node in self.lan.nodes:
            self.proc(
                node,
                "receiver",
                [
                    "udp-receiver",
                    "--file",
                    str(self.node_path(node)),
                    "--interface",
                    "eth0",
                    "--portbase",
                    str(self.PORTBASE),
                    "--nokbd",
                    "--no-progress",
                    "--rcvbuf",
                    str(4 << 20),
                    "--start-timeout",
                    str(int(self.ctx.timeout)),
                ],
            )
        wait_idle(self.receivers)

    def submit(self) -> Proc:
        argv = [
            "udp-sender",
            "--file",
            str(self.ctx.source),
            "--interface",
            "eth0",
            "--portbase",
            str(self.PORTBASE),
            "--nokbd",
            "--no-progress",
            "--min-receivers",
            str(len(self.lan.nodes)),
            "--mcast-data-address",
            GROUP_BASE + "2",
            # The sender says HELLO once; a receiver that lost it (loss at
            # the nodes) would never join: repeat it every second.
            "--rexmit-hello-interval",
            "1000",
        ]
        if self.fixed_rate:
            rate = self.ctx.wire_bps * self.DATAGRAM / (self.DATAGRAM + FRAME_OVERHEAD)
            self.rate_arg = f"--max-bitrate {rate:.0f}"
            argv += ["--max-bitrate", f"{rate:.0f}"]
        else:
            self.rate_arg = "(none: its defaults)"
        return self.proc(self.lan.master, "sender", argv)


class UdpcastDefaults(Udpcast):
    name = "udpcast-default"
    description = "udp-sender/udp-receiver with the sender's defaults (no rate limit)"
    fixed_rate = False


class Uftp(Runner):
    """Debian's UFTP: ``uftp -R`` to a ``uftpd -d`` in every node, each with its own -D and -T."""

    name = "uftp"
    description = "uftp -R rate (fixed), uftpd -d per node"
    PORT = 1044
    BLOCK = 1400
    #: -R counts its datagrams: the block plus UFTP's headers (about 36 bytes).
    DATAGRAM = 1400 + 36
    congestion = "none"

    def node_id(self, node: Host) -> str:
        return f"0x{int.from_bytes(bytes(int(b) for b in node.ip.split('.')), 'big'):08x}"

    def start_receivers(self) -> None:
        for node in self.lan.nodes:
            temp = self.node_dir(node) / ".uftp-tmp"
            temp.mkdir()
            self.proc(
                node,
                "receiver",
                [
                    "uftpd",
                    "-d",
                    "-q",
                    "-I",
                    "eth0",
                    "-M",
                    GROUP_BASE + "3",
                    "-p",
                    str(self.PORT),
                    "-U",
                    self.node_id(node),
                    "-B",
                    str(4 << 20),
                    "-D",
                    str(self.node_dir(node)),
                    "-T",
                    str(temp),
                    "-x",
                    "1",
                ],
            )
        wait_idle(self.receivers)

    def submit(self) -> Proc:
        ids = ",".join(self.node_id(n) for n in self.lan.nodes)
        self.status = self.ctx.logdir / f"{self.name}-status.txt"
        argv = [
            "uftp",
            "-I",
            "eth0",
            "-M",
            GROUP_BASE + "3",
            "-P",
            GROUP_BASE + "4",
            "-p",
            str(self.PORT),
            "-H",
            ids,
            "-B",
            str(4 << 20),
            "-b",
            str(self.BLOCK),
            "-x",
            "1",
            "-S",
            str(self.status),
        ]
        if self.congestion == "none":
            rate = self.ctx.wire_bps * self.DATAGRAM / (self.DATAGRAM + FRAME_OVERHEAD)
            self.rate_arg = f"-R {rate / 1e3:.0f}"
            argv += ["-R", f"{rate / 1e3:.0f}"]
        else:
            top = self.ctx.wire_bps / 1e3
            self.rate_arg = f"-C tfmcc:max={top:.0f}"
            argv += ["-C", f"tfmcc:max={top:.0f}"]
        return self.proc(self.lan.master, "sender", [*argv, str(self.ctx.source)])

    def details(self) -> dict[str, Any]:
        try:
            lines = self.status.read_text().splitlines()
        except OSError:
            return {}
        return {"status": [line for line in lines if line.startswith(("STATS", "RESULT", "CONNECT"))][:64]}


class UftpTfmcc(Uftp):
    name = "uftp-tfmcc"
    description = "uftp -C tfmcc (TCP-friendly congestion control), capped at the link rate"
    congestion = "tfmcc"


RUNNERS: dict[str, type[Runner]] = {
    r.name: r for r in (MrsyncDaemons, MrsyncEngine, Udpcast, UdpcastDefaults, Uftp, UftpTfmcc)
}


def sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def tree_listing(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: its path relative to ``root`` -> (size, sha256 of its contents)."""
    out: dict[str, tuple[int, str]] = {}
    for top, _, names in os.walk(root):
        for name in names:
            path = Path(top, name)
            out[str(path.relative_to(root))] = (path.stat().st_size, sha256(path) or "")
    return out


def tree_digest(listing: dict[str, tuple[int, str]]) -> str:
    """A tree's digest: the sha256 of its sorted (relative path, size, sha256 of contents)."""
    h = hashlib.sha256()
    for rel in sorted(listing):
        size, digest = listing[rel]
        h.update(f"{rel}\0{size}\0{digest}\n".encode())
    return h.hexdigest()


def first_difference(source: dict[str, tuple[int, str]], copy: dict[str, tuple[int, str]]) -> str:
    """The first path (in order) where a copy's listing differs from the source's, and how."""
    for rel in sorted(source.keys() | copy.keys()):
        if rel not in copy:
            return f"{rel} missing ({len(copy)} of {len(source)} files there)"
        if rel not in source:
            return f"{rel} is not in the source"
        if copy[rel] != source[rel]:
            return f"{rel} differs ({copy[rel][0]} bytes, the source's {source[rel][0]})"
    return "no difference"


def verify(runner: Runner, source: Path, digest: str) -> tuple[dict[str, bool], str]:
    """
    Every node's copy against the source (its sha256, or for a tree its
    `tree_digest`): verified by node, and an error naming the nodes that
    differ (for a tree, with the first path that differs at the first of them).
    """
    nodes = runner.lan.nodes
    tree = runner.ctx.case.files > 0

    def check(node: Host) -> tuple[bool, dict[str, tuple[int, str]] | None]:
        if not tree:
            return sha256(runner.node_path(node)) == digest, None
        listing = tree_listing(runner.node_path(node))
        ok = tree_digest(listing) == digest
        return ok, None if ok else listing

    with ThreadPoolExecutor(2) as pool:
        found = dict(zip([n.name for n in nodes], pool.map(check, nodes), strict=True))
    verified = {name: ok for name, (ok, _) in found.items()}
    bad = sorted(n for n, ok in verified.items() if not ok)
    if not bad:
        return verified, ""
    error = f"{len(bad)} copies do not match the source: {', '.join(bad[:5])}"
    if tree:
        first = next(n.name for n in nodes if not verified[n.name])
        error += f"; {first}: {first_difference(tree_listing(source), found[first][1] or {})}"
    return verified, error


def change_files(root: Path, share: float, seed: str = "mrsyncd bench change") -> dict[str, int]:
    """
    Change ``share`` of the non-empty files under ``root`` (a seeded choice):
    new random contents of the same size, and a new mtime.  Returns their
    relative paths and sizes.
    """
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size)
    chosen = random.Random(seed).sample(files, max(1, round(share * len(files))))
    changed = {}
    for path in chosen:
        st = path.stat()
        old = path.read_bytes()
        new = old
        while new == old:
            new = os.urandom(st.st_size)
        path.write_bytes(new)
        # Written now, so its mtime is new; at least a second past the old one, whatever the clock did.
        mtime = max(time.time_ns(), st.st_mtime_ns + 1_000_000_000)
        os.utime(path, ns=(st.st_atime_ns, mtime))
        changed[str(path.relative_to(root))] = st.st_size
    return changed


class Competitor:
    """An iperf3 TCP flow from the master to node1, counted at node1."""

    def __init__(self, lan: Lan, logdir: Path, tag: str, congestion_control: str = "") -> None:
        self.lan = lan
        self.node = lan.nodes[0]
        self.logdir = logdir
        self.tag = tag
        self.node.iptables("-A", "INPUT", "-p", "tcp", "--dport", str(IPERF_PORT))
        # And the push's datagrams beside it (any tool's: all send UDP).
        self.node.iptables("-A", "INPUT", "-p", "udp")
        self.server = Proc(
            self.node,
            "iperf3-server",
            ["iperf3", "-s", "-B", self.node.ip, "-p", str(IPERF_PORT)],
            logdir / f"iperf3-{tag}-server.log",
        )
        self.client: Proc | None = None
        #: The flow's TCP congestion control: the master namespace's default,
        #: which is the host's (Debian's is cubic, some kernels' bbr).  The
        #: share a delay-based sender leaves it depends on which.
        self.congestion_control = (
            congestion_control
            or lan.master.run(["sysctl", "-n", "net.ipv4.tcp_congestion_control"]).stdout.strip()
        )
        self.chosen = bool(congestion_control)
        time.sleep(0.5)

    def bytes(self) -> int:
        """IP bytes of the TCP flow that reached node1."""
        return self.counts()[0]

    def counts(self) -> tuple[int, int]:
        """IP bytes that reached node1: of the TCP flow, and of UDP (the push)."""
        tcp = udp = 0
        for line in self.node.iptables("-L", "INPUT", "-v", "-n", "-x").splitlines():
            fields = line.split()
            if "tcp" in line and f"dpt:{IPERF_PORT}" in line:
                tcp = int(fields[1])
            elif len(fields) == 8 and fields[2] in ("udp", "17"):  # no target, no match: the count
                udp = int(fields[1])
        return tcp, udp

    def start(self, seconds: int = 3600) -> None:
        cc = ["-C", self.congestion_control] if self.chosen else []
        self.client = Proc(
            self.lan.master,
            "iperf3-client",
            ["iperf3", "-c", self.node.ip, "-p", str(IPERF_PORT), "-t", str(seconds), *cc],
            self.logdir / f"iperf3-{self.tag}-client.log",
        )

    def stop_client(self) -> None:
        if self.client is not None:
            self.client.stop()
            self.client = None
        time.sleep(0.5)

    def alone(self, warmup: float = 2.0, window: float = 6.0) -> float:
        """The flow's rate in bit/s with nothing else on the link."""
        self.start()
        time.sleep(warmup)
        b0, t0 = self.bytes(), time.monotonic()
        time.sleep(window)
        rate = (self.bytes() - b0) * 8 / (time.monotonic() - t0)
        self.stop_client()
        return rate

    def close(self) -> None:
        self.stop_client()
        self.server.stop()


def measure(runner: Runner, competitor: Competitor | None = None) -> ToolResult:
    ctx, lan = runner.ctx, runner.lan
    result = ToolResult(runner.name)
    size = ctx.case.size
    #: A tree's thousands of files are not polled: its copies are complete when the sender exits.
    tree = ctx.case.files > 0
    try:
        runner.prepare_dirs()
        runner.start_receivers()
        lan.zero_counters()
        snmp0 = lan.master.snmp()
        qd0 = lan.qdisc_stats()
        busy_before = wait_quiet()
        tcp0 = 0
        # When both the TCP flow and the push run, plus a second for the
        # later one to get going: the window the matrix counts (`fair`).
        after = ctx.case.tcp_after
        both_from: float | None = None
        both0 = (0, 0)
        if competitor is not None and not after:
            competitor.start()
            time.sleep(3.0)
            tcp0 = competitor.bytes()
        netns = lan.netns_inodes()
        anchor = lan.anchor
        assert anchor is not None, "the benchmark's LAN counts (Lan(counters=True))"
        for p in runner.daemons():
            p.baseline()
        cpu0, own0, procs0 = machine_cpu(), self_cpu(), process_cpu(netns)
        t0 = time.monotonic()
        sender = runner.submit()
        tx0 = tx_bytes(anchor.pid) or 0
        last_tx = 0.0
        result.rate_arg = runner.rate_arg
        profilers = []
        if ctx.profile is not None:
            profilers = [
                start_profiler(runner.sending(sender), ctx.profile, ctx),
                start_profiler(
                    runner.receivers[0], ctx.profile.with_name(f"{runner.name}-receiver.pyspy.txt"), ctx
                ),
            ]
        done: dict[str, float] = {}
        polled = [] if tree else lan.nodes
        sender_failed_at = None
        procs = [sender, *runner.receivers]
        while True:
            now = time.monotonic()
            if competitor is not None and both_from is None:
                if after and competitor.client is None and now - t0 >= after:
                    competitor.start()
                    tcp0 = competitor.bytes()
                elif competitor.client is not None and now - t0 >= after + 1.0:
                    both_from, both0 = now, competitor.counts()
            if now - last_tx >= 0.1:
                b = tx_bytes(anchor.pid)
                if b is not None:
                    result.timeline.append((round(now - t0, 3), b - tx0))
                    last_tx = now
            for p in procs:
                p.poll()
            for node in polled:
                if node.name not in done:
                    try:
                        if os.stat(runner.node_path(node)).st_size == size:
                            done[node.name] = now - t0
                    except OSError:
                        pass
            if not sender.running:
                exited = sender.ended - t0  # type: ignore[operator]
                if result.sender_exit is None:
                    result.sender_exit = exited
                if tree:
                    # mrsync push exits 0 once every node committed every
                    # file, uftp once every receiver acknowledged the end:
                    # each node's time is the sender's exit (checked below).
                    if sender.rc == 0:
                        done = {node.name: exited for node in lan.nodes}
                    break
                if len(done) == len(lan.nodes):
                    break
                sender_failed_at = sender_failed_at or now
                if now - sender_failed_at > 5.0:
                    result.error = (
                        f"sender exited {sender.rc} with {len(lan.nodes) - len(done)} nodes incomplete"
                    )
                    break
            if now - t0 > ctx.timeout:
                result.error = (
                    f"timed out after {ctx.timeout:.0f} s ({len(done)}/{len(lan.nodes)} nodes done)"
                )
                break
            time.sleep(0.02)
        end = time.monotonic()
        # The processes' CPU now, as the machine's: daemons run on, and
        # their shutdown (or a profiler's) is not the transfer's.
        for p in runner.receivers:
            p.sample(force=True)
        result.sender = runner.sender_usage(sender)
        result.receivers = [p.usage() for p in runner.receivers]
        result.machine_cpu = cpu_delta(cpu0, machine_cpu(), end - t0)
        result.machine_cpu["bench_self"] = round(self_cpu() - own0, 2)
        fc = foreign_cpu(procs0, process_cpu(netns))
        result.machine_cpu["kernel_threads"] = fc["kernel"]
        result.machine_cpu["other_processes"] = fc["other"]
        if competitor is not None:
            tcp1, udp1 = competitor.counts()
            moved = tcp1 - tcp0
            span = max(done.values()) if done else end - t0
            if after:  # the TCP flow's own time, not the push's
                span -= after
            result.tcp = {
                "bytes_during": moved,
                "seconds": span,
                "bps_during": moved * 8 / span if span > 0 else None,
                "congestion_control": competitor.congestion_control,
            }
            if both_from is not None:
                window = t0 + (max(done.values()) if done else end - t0) - both_from
                if window > 0:
                    result.tcp["both_seconds"] = round(window, 2)
                    result.tcp["both_tcp_bps"] = (tcp1 - both0[0]) * 8 / window
                    result.tcp["both_push_bps"] = (udp1 - both0[1]) * 8 / window
            competitor.stop_client()
        for profiler in profilers:
            if profiler is not None:
                stop_profiler(profiler)
        result.counters = lan.read_counters()
        snmp1 = lan.master.snmp()
        result.snmp = {
            k: snmp1[k] - snmp0.get(k, 0)
            for k in ("IpFragCreates", "IpFragOKs", "UdpSndbufErrors")
            if k in snmp1
        }
        qd1 = lan.qdisc_stats()
        result.qdisc = {k: (qd1.get(k) or 0) - (qd0.get(k) or 0) for k in qd1}
        result.dropped_udp = sum(n.dropped_udp() for n in lan.nodes)
        result.node_seconds = {n.name: done.get(n.name) for n in lan.nodes}
        result.wall = max(done.values()) if len(done) == len(lan.nodes) else None
        result.timeline = in_frames(result.timeline, result.qdisc.get("bytes"))
        result.phases = phases(result.timeline, result.wall)
        mc = result.machine_cpu
        busy = sum(mc[k] for k in ("user", "nice", "system", "irq", "softirq", "steal"))
        ours = result.sender["cpu"] + sum(p["cpu"] for p in result.receivers) + mc["bench_self"]
        # What the machine did besides our processes: kernel threads (softirq
        # packet work), other people's processes, and the rest (softirq
        # charged to nobody, short-lived processes): rough figures.
        mc["unaccounted"] = round(busy - ours - mc["kernel_threads"] - mc["other_processes"], 2)
        mc["others"] = mc["other_processes"]
        result.details = {"busy_before": busy_before, **runner.details()}
        if sender.rc not in (0, None) and not result.error:
            result.error = f"sender exited {sender.rc}"
        result.verified, mismatch = verify(runner, ctx.source, ctx.sha256)
        if mismatch and not result.error:
            result.error = mismatch
        result.ok = not result.error and all(result.verified.values())
        if result.ok:
            runner.after_first(result)
        runner.stop()
        if not result.ok:
            shown = [runner.sending(sender), sender, *runner.receivers[:2]]
            tails = {f"{p.host.name}-{p.role}": p.tail() for p in dict.fromkeys(shown)}
            result.details["log_tails"] = tails
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
        result.ok = False
    finally:
        runner.stop()
        runner.clean()
    return result


def start_profiler(proc: Proc, out: Path, ctx: Context) -> subprocess.Popen | None:
    """py-spy on an mrsyncd process (raw collapsed stacks), if py-spy is installed."""
    pyspy = shutil.which("py-spy") or next(
        (p for p in ("/tmp/venvpypi/bin/py-spy", "/usr/local/bin/py-spy") if os.path.exists(p)), None
    )
    if pyspy is None:
        print("  (py-spy not found: no profile)")
        return None
    # py-spy runs outside the namespace and attaches by pid; `stop_profiler` ends it.
    argv = [
        pyspy,
        "record",
        "--pid",
        str(proc.pid),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
        "--threads",
    ]
    with open(out.with_suffix(".log"), "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_profiler(p: subprocess.Popen) -> None:
    """Stop py-spy as Control-C does, so that it writes what it sampled (a daemon it watches runs on)."""
    p.send_signal(signal.SIGINT)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.terminate()
        p.wait()
