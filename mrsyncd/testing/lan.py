"""
A LAN of network namespaces on this machine, for the multi-host tests, the
benchmark and the demo.

Layout: one namespace holds the switch (a Linux bridge ``br0`` with IGMP/MLD
snooping off, so that multicast floods to every port); every host (``master``,
``node1`` .. ``nodeN``, and any added later) is a namespace of its own with
``lo`` and an ``eth0`` that is one end of a veth pair whose other end,
``p<host>``, is a port of the bridge.  Hosts get addresses in 10.231.77.0/24
and fd77:231::/64 (no duplicate address detection), which only these
namespaces hold; nothing here is connected to the machine's own network, so
no test traffic can leave.  A switch port carries one datagram a frame, as a
wire does.

Shaping (with ``tbf``: the kernels this runs on may have no netem):

- a host's link: a token bucket on its ``eth0`` egress (`Host.cap_egress`,
  `Lan.shape_master`), which everything it sends crosses;
- a slow node: a token bucket on the bridge port toward it (`Lan.shape_node`),
  so only what reaches *that* node is held back;
- loss: an ``iptables -m statistic`` DROP rule on a host's INPUT, for UDP to
  one port or to every port (`Host.drop_udp`).

Counters (``Lan(counters=True)``, the benchmark's): the master gets chains
``MRB_IN`` (traffic from the nodes, by protocol: the feedback a sender
receives) and ``MRB_OUT`` (what the master sends); iperf3's port is left out
of both.

Namespaces are named ``mrt-<pid>-<lan>-<host>`` so that parallel runs do not
clash; `Lan.close` kills every process started in them (and any other process
found inside them) and deletes them, and is called from the fixture's
teardown (also after SIGINT or SIGTERM) and on interpreter exit.  A run that died by SIGKILL
leaves namespaces whose pid is gone: the next run sweeps those.

Use the ``lan`` fixture (a factory, in tests/conftest.py; this module does
not import pytest, so that demo/ can use it on a machine without the test
tools)::

    def test_x(lan):
        net = lan(nodes=3)
        net.master.cap_egress("100mbit")
        for node in net.nodes:
            node.drop_udp(0.05, port=7717)
        proc = net.master.popen([sys.executable, "-m", "mrsyncd.scripts.mrsync_engine", ...])
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mrsyncd.testing import environment

SUBNET4 = ipaddress.IPv4Network("10.231.77.0/24")
SUBNET6 = ipaddress.IPv6Network("fd77:231::/64")
PREFIX = "mrt-"
IFNAME = "eth0"
BRIDGE = "br0"
#: A competing TCP flow's port (the benchmark's iperf3), which the counters leave out.
IPERF_PORT = 5201

_lan_numbers = itertools.count(1)


def unavailable() -> str | None:
    """Why this machine cannot build a LAN, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "building a LAN of network namespaces needs root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns does not work here: {probe.stderr.strip()}"
    return None


def _run(args: Sequence[str], *, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        said = result.stderr.strip() or result.stdout.strip()
        raise RuntimeError(f"{' '.join(args)} failed with exit {result.returncode}: {said}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_dead_runs() -> list[str]:
    """Delete LAN namespaces left by runs whose process is gone (killed with SIGKILL)."""
    removed = []
    for name in _netns_names():
        m = re.fullmatch(rf"{PREFIX}(\d+)-\d+-[\w.-]+", name)
        if m and not _alive(int(m.group(1))):
            _kill_netns_pids(name)
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


def _kill_netns_pids(netns: str, grace: float = 2.0) -> None:
    """Terminate, then kill, whatever still runs inside a namespace of ours."""

    def pids() -> list[int]:
        out = _run(["ip", "netns", "pids", netns], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        found = pids()
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in found):
            time.sleep(0.05)


def tbf_args(rate_bps: float, queue_ms: float = 50.0, burst: int = 0) -> list[str]:
    """
    A token bucket at ``rate_bps``: a burst of ``burst`` bytes (0: 1 ms of
    traffic, at least 16 KB, a few full frames) and a queue of ``queue_ms``.
    """
    burst = burst or max(16000, int(rate_bps / 8 * 0.001))
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", f"{queue_ms:g}ms"]


@dataclass
class Host:
    lan: Lan
    name: str
    netns: str
    ipv4: str
    ipv6: str
    #: Its bridge-side veth, in the switch's namespace.
    port: str = ""
    ifname: str = IFNAME
    #: Processes started here with `popen`, for teardown.
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ipv4} {self.ipv6} in {self.netns}>"

    @property
    def ip(self) -> str:
        return self.ipv4

    def argv(self, args: Sequence[str]) -> list[str]:
        # ip netns exec execs the command itself (no fork), so a Popen's pid
        # is the command's pid and its rusage is the command's.
        return ["ip", "netns", "exec", self.netns, *args]

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess:
        """Run a command in this host and wait for it (text output captured)."""
        return _run(self.argv(args), check=check, timeout=timeout, **kwargs)

    def iptables(self, *args: str) -> str:
        return self.run(["iptables", "-w", *args]).stdout

    def chain_counters(self, chain: str) -> list[tuple[int, int]]:
        """(packets, bytes) of each rule of one of our chains, in order."""
        rows = []
        for line in self.iptables("-L", chain, "-v", "-n", "-x").splitlines()[2:]:
            fields = line.split()
            if len(fields) >= 2 and fields[0].isdigit():
                rows.append((int(fields[0]), int(fields[1])))
        return rows

    def snmp(self) -> dict[str, int]:
        """This namespace's /proc/net/snmp Ip: and Udp: counters (fragments, errors)."""
        text = self.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
        values: dict[str, int] = {}
        for head, row in zip(text[::2], text[1::2], strict=False):
            proto, names = head.split(":", 1)
            for key, value in zip(names.split(), row.split(":", 1)[1].split(), strict=False):
                with contextlib.suppress(ValueError):
                    values[f"{proto}{key}"] = int(value)
        return values

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a command in this host; the LAN kills it at teardown if it still runs."""
        kwargs.setdefault("start_new_session", True)
        env = environment(env=kwargs.pop("env", None))
        proc = subprocess.Popen(self.argv(args), env=env, **kwargs)
        self.processes.append(proc)
        return proc

    def python(
        self, args: Sequence[str], *, rusage: str | os.PathLike | None = None, **kwargs: Any
    ) -> subprocess.Popen:
        """
        Start ``python3 ARGS`` (this interpreter, unbuffered) in this host.
        With ``rusage``, the process runs under a small wrapper that writes
        its resource usage there as JSON when it ends (see `read_rusage`).
        """
        argv = [sys.executable, "-u", *args]
        if rusage is not None:
            argv = [sys.executable, "-S", "-c", _RUSAGE_WRAPPER, os.fspath(rusage), *argv]
        return self.popen(argv, **kwargs)

    def cap_egress(self, rate: str = "100mbit", burst: str = "32kbit", latency: str = "50ms") -> None:
        """Cap what this host sends on its LAN link with a token bucket filter."""
        self.egress(["tbf", "rate", rate, "burst", burst, "latency", latency])

    def egress(self, qdisc: Sequence[str]) -> None:
        """The queue everything this host sends on its LAN link crosses (``tc qdisc … root``)."""
        self.run(["tc", "qdisc", "replace", "dev", self.ifname, "root", *qdisc])

    def drop_udp(self, probability: float, port: int | None = None) -> None:
        """
        Drop a random share of incoming UDP datagrams to ``port``, or to
        every port (both IP versions), leaving TCP alone.
        """
        ports = ["--dport", str(port)] if port is not None else []
        for tool in ("iptables", "ip6tables"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed; it is needed to drop datagrams")
            self.run(
                [
                    tool,
                    "-w",
                    "-A",
                    "INPUT",
                    "-p",
                    "udp",
                    *ports,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    str(probability),
                    "-j",
                    "DROP",
                ]
            )
            listed = self.run([tool, "-w", "-S", "INPUT"]).stdout
            if "statistic" not in listed:
                raise RuntimeError(f"{tool} in {self.netns} did not keep the rule: {listed}")

    def dropped_udp(self, version: int | None = None) -> int:
        """Packets the `drop_udp` rules have dropped so far (IPv4, IPv6 or both)."""
        total = 0
        tools = {4: ("iptables",), 6: ("ip6tables",), None: ("iptables", "ip6tables")}[version]
        for tool in tools:
            out = self.run([tool, "-w", "-L", "INPUT", "-v", "-n", "-x"]).stdout
            for line in out.splitlines():
                if "statistic" in line and "DROP" in line:
                    total += int(line.split()[0])
        return total

    def kill_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in self.processes:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class Lan:
    """A bridge and hosts, each in its own namespace; see the module docstring."""

    def __init__(self, nodes: int = 3, *, master: bool = True, counters: bool = False) -> None:
        """
        ``nodes`` hosts ``node1`` .. (and ``master`` first).  With
        ``counters``, wait until every link is up and count the master's
        traffic (`read_counters`), and keep a process in the master's
        namespace (``anchor``) whose /proc/PID/net/dev reads its link's bytes
        without a fork.
        """
        self.id = f"{PREFIX}{os.getpid()}-{next(_lan_numbers)}"
        self.anchor: subprocess.Popen | None = None
        self.switch = f"{self.id}-switch"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._closed = False
        atexit.register(self.close)
        try:
            self._add_netns(self.switch)
            _run(["ip", "-n", self.switch, "link", "add", BRIDGE, "type", "bridge"])
            # Without snooping the bridge floods multicast to every port; with
            # it, delivery would depend on IGMP/MLD reports and a querier.
            _run(["ip", "-n", self.switch, "link", "set", BRIDGE, "type", "bridge", "mcast_snooping", "0"])
            _run(["ip", "-n", self.switch, "link", "set", BRIDGE, "up"])
            if self.bridge_snooping() != 0:
                raise RuntimeError("the bridge still snoops multicast")
            if master:
                self.add_host("master")
            for i in range(1, nodes + 1):
                self.add_host(f"node{i}")
            if counters:
                self.wait_ready()
                self._counters()
                sleeper = self.master.argv(["sleep", "infinity"])
                self.anchor = subprocess.Popen(sleeper, start_new_session=True)
        except BaseException:
            self.close()
            raise

    @property
    def master(self) -> Host:
        return self.hosts["master"]

    @property
    def nodes(self) -> list[Host]:
        return [h for name, h in self.hosts.items() if re.fullmatch(r"node\d+", name)]

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        # Addresses (and the link-local one) usable at once, without DAD.
        for key in ("default", "all"):
            _run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.accept_dad=0"])

    def bridge_snooping(self) -> int:
        info = json.loads(_run(["ip", "-n", self.switch, "-d", "-j", "link", "show", BRIDGE]).stdout)
        return int(info[0]["linkinfo"]["info_data"]["mcast_snooping"])

    def add_host(self, name: str) -> Host:
        """Add a host with the next free addresses (master first, so it gets .1)."""
        if name in self.hosts or not re.fullmatch(r"[a-z][a-z0-9]{0,9}", name):
            raise ValueError(f"bad or duplicate host name {name!r}")
        number = len(self.hosts) + 1
        netns = f"{self.id}-{name}"
        self._add_netns(netns)
        port = f"p{name}"
        _run(["ip", "-n", netns, "link", "add", IFNAME, "type", "veth",
              "peer", "name", port, "netns", self.switch])  # fmt: skip
        # A switch port puts one datagram in each frame, as a wire does: a
        # veth would otherwise hand a node a batch sent with UDP_SEGMENT (or
        # a TCP super-packet) whole, and the node's loss rule would drop it
        # whole, a burst instead of one datagram.
        _run(["ip", "-n", self.switch, "link", "set", port, "gso_max_segs", "1"])
        _run(["ip", "-n", self.switch, "link", "set", port, "master", BRIDGE, "up"])
        ipv4, ipv6 = str(SUBNET4[number]), str(SUBNET6[number])
        _run(["ip", "-n", netns, "addr", "add", f"{ipv4}/{SUBNET4.prefixlen}", "brd", "+", "dev", IFNAME])
        _run(["ip", "-n", netns, "addr", "add", f"{ipv6}/{SUBNET6.prefixlen}", "dev", IFNAME, "nodad"])
        _run(["ip", "-n", netns, "link", "set", IFNAME, "up"])
        # Multicast leaves by eth0 for a tool that names no interface (there is no default route).
        _run(["ip", "-n", netns, "route", "add", "224.0.0.0/4", "dev", IFNAME])
        host = Host(self, name, netns, ipv4, ipv6, port)
        self.hosts[name] = host
        return host

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until every host's link is up, with its IPv6 link-local address usable."""
        deadline = time.monotonic() + timeout
        for host in self.hosts.values():
            while True:
                out = _run(["ip", "-n", host.netns, "-j", "addr", "show", "dev", IFNAME]).stdout
                info = json.loads(out)[0]
                tentative = any(a.get("tentative") for a in info.get("addr_info", []))
                if info.get("operstate") == "UP" and not tentative:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{host} did not come up: {info}")
                time.sleep(0.05)

    def _counters(self) -> None:
        m = self.master
        m.iptables("-N", "MRB_IN")
        m.iptables("-A", "INPUT", "-s", str(SUBNET4), "-j", "MRB_IN")
        m.iptables("-A", "MRB_IN", "-s", m.ip, "-j", "RETURN")  # its own multicast, looped back
        m.iptables("-A", "MRB_IN", "-p", "tcp", "--sport", str(IPERF_PORT), "-j", "RETURN")
        m.iptables("-A", "MRB_IN", "-p", "tcp")  # rule 3: TCP from nodes
        m.iptables("-A", "MRB_IN", "-p", "udp")  # rule 4: UDP from nodes
        m.iptables("-A", "MRB_IN", "!", "-p", "tcp")  # rule 5: everything but TCP (UDP, ICMP, IGMP)
        m.iptables("-N", "MRB_OUT")
        m.iptables("-A", "OUTPUT", "-j", "MRB_OUT")
        m.iptables("-A", "MRB_OUT", "-p", "tcp", "--dport", str(IPERF_PORT), "-j", "RETURN")
        m.iptables("-A", "MRB_OUT", "-p", "udp")  # rule 2: UDP sent (data, repairs, udp control)
        m.iptables("-A", "MRB_OUT", "-p", "tcp")  # rule 3: TCP sent (control)
        for node in self.nodes:
            # Also makes the INPUT chain exist (iptables-nft creates it with its first rule).
            node.iptables("-A", "INPUT", "-p", "udp")  # UDP arriving, before any drop rule

    def zero_counters(self) -> None:
        self.master.iptables("-Z", "MRB_IN")
        self.master.iptables("-Z", "MRB_OUT")
        for node in self.nodes:
            node.iptables("-Z", "INPUT")

    def read_counters(self) -> dict[str, int]:
        i = self.master.chain_counters("MRB_IN")
        o = self.master.chain_counters("MRB_OUT")
        return {
            "feedback_tcp_bytes": i[2][1],
            "feedback_udp_bytes": i[3][1],
            "feedback_bytes": i[2][1] + i[4][1],
            "feedback_packets": i[2][0] + i[4][0],
            "sent_udp_bytes": o[1][1],
            "sent_udp_packets": o[1][0],
            "sent_tcp_bytes": o[2][1],
        }

    def netns_inodes(self) -> set[int]:
        """The inode numbers of this LAN's network namespaces (as /proc/PID/ns/net shows them)."""
        found = set()
        for name in self._namespaces:
            with contextlib.suppress(OSError):
                found.add(os.stat(f"/run/netns/{name}").st_ino)
        return found

    def shape_master(self, rate_bps: float, queue_ms: float = 50.0, burst: int = 0) -> None:
        """The master's link: everything it sends crosses this bucket."""
        self.master.egress(tbf_args(rate_bps, queue_ms, burst))

    def shape_node(self, node: Host, rate_bps: float) -> None:
        """A node behind a slower link: what the bridge sends toward it."""
        _run(["ip", "netns", "exec", self.switch, "tc", "qdisc", "replace", "dev", node.port, "root",
              *tbf_args(rate_bps)])  # fmt: skip

    def qdisc_stats(self, host: Host | None = None) -> dict[str, Any]:
        """Sent/dropped/overlimits of a tbf: the master's, or a slow node's port."""
        if host is None:
            out = self.master.run(["tc", "-s", "-j", "qdisc", "show", "dev", IFNAME]).stdout
        else:
            out = _run(["ip", "netns", "exec", self.switch, "tc", "-s", "-j", "qdisc", "show",
                        "dev", host.port]).stdout  # fmt: skip
        for q in json.loads(out):
            if q.get("kind") == "tbf":
                return {k: q.get(k) for k in ("bytes", "packets", "drops", "overlimits", "requeues")}
        return {}

    def close(self) -> None:
        """
        Kill every process started in the LAN and delete its namespaces.
        Idempotent, and safe to run again (at exit) if it was interrupted.
        """
        if self._closed:
            return
        if self.anchor is not None and self.anchor.poll() is None:
            self.anchor.kill()
            self.anchor.wait()
        for host in self.hosts.values():
            host.kill_all()
        for netns in reversed(self._namespaces):
            _kill_netns_pids(netns)
            _run(["ip", "netns", "del", netns], check=False)
        left = set(self._namespaces) & set(_netns_names())
        if left:
            print(f"lan: could not delete namespaces {sorted(left)}", file=sys.stderr)
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """
    Turn SIGTERM into KeyboardInterrupt while LANs exist, so that pytest
    stops the run and teardown deletes them (SystemExit would only fail the
    current test and go on to the next).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Why a wrapper: Linux carries a process's peak RSS (ru_maxrss) across exec,
# and Python starts children with vfork, so a child of the test process
# reports at least the test process's own peak.  The wrapper is a bare
# interpreter (-S, about 8 MB) that forks the command and reports its usage.
_RUSAGE_WRAPPER = r"""
import json, os, signal, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"maxrss_bytes": ru.ru_maxrss * 1024, "utime": ru.ru_utime, "stime": ru.ru_stime,
               "status": status}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def read_rusage(path: str | os.PathLike) -> dict[str, Any]:
    """What a ``python(..., rusage=path)`` process used: maxrss_bytes (its peak RSS), utime, stime."""
    with open(path) as f:
        result: dict[str, Any] = json.load(f)
    return result
