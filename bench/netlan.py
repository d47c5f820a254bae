"""
The benchmark's LAN: network namespaces on one bridge, with shaped links.

Layout: a ``switch`` namespace holds a Linux bridge ``br0`` with multicast
snooping off (multicast floods every port); each host (``master``,
``node1`` .. ``nodeN``) is a namespace with ``eth0``, one end of a veth pair
whose other end, ``p<host>``, is a bridge port.  Hosts are numbered in
10.231.88.0/24, which only these namespaces hold; nothing is connected to
the machine's own network.

Shaping (this kernel has no netem):

- the master's link: a token bucket (``tbf``) on the master's ``eth0``
  egress, which every datagram and TCP segment it sends crosses;
- a slow node: a ``tbf`` on the bridge-side port toward that node, so only
  what reaches *that* node is held back;
- loss: an ``iptables -m statistic`` DROP rule on each node's INPUT for UDP
  (every port: data and any UDP control of the tools alike).

Counters: the master gets chains ``MRB_IN`` (traffic from the nodes, by
protocol: the feedback a sender receives) and ``MRB_OUT`` (what the master
sends); a node can count a competing TCP flow's bytes.  iperf3's port is
left out of the feedback and data counters.

Namespaces are named ``mrb-<pid>-<host>``.  `Lan.close` kills whatever runs
in them and deletes them; it runs from ``finally`` blocks, on SIGINT/SIGTERM
(turned into KeyboardInterrupt by bench/run.py) and at interpreter exit.
A run killed with SIGKILL leaves namespaces whose pid is gone: the next run
sweeps them (`sweep_dead_runs`).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SUBNET = ipaddress.IPv4Network("10.231.88.0/24")
PREFIX = "mrb-"
IFNAME = "eth0"
BRIDGE = "br0"
IPERF_PORT = 5201


def run(args: Sequence[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
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


def netns_names() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kill_netns_pids(netns: str, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, whatever still runs inside one of our namespaces."""

    def pids() -> list[int]:
        out = run(["ip", "netns", "pids", netns], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        found = pids()
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in found):
            time.sleep(0.05)


def sweep_dead_runs() -> list[str]:
    """Delete namespaces left by benchmark runs whose process is gone."""
    removed = []
    for name in netns_names():
        m = re.fullmatch(rf"{PREFIX}(\d+)-[\w.-]+", name)
        if m and not _alive(int(m.group(1))):
            kill_netns_pids(name)
            run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


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
    ip: str
    port: str  # its bridge-side veth, in the switch namespace
    uid: int  # its number on the LAN, also its last address byte

    def argv(self, args: Sequence[str]) -> list[str]:
        # ip netns exec execs the command itself: the pid is the command's.
        return ["ip", "netns", "exec", self.netns, *args]

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return run(self.argv(args), check=check, timeout=timeout)

    def iptables(self, *args: str) -> str:
        return self.run(["iptables", "-w", *args]).stdout

    def drop_udp(self, probability: float) -> None:
        """Drop a random share of every UDP datagram this host receives."""
        self.iptables(
            "-A",
            "INPUT",
            "-p",
            "udp",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            f"{probability:.6f}",
            "-j",
            "DROP",
        )

    def dropped_udp(self) -> int:
        total = 0
        for line in self.iptables("-L", "INPUT", "-v", "-n", "-x").splitlines():
            if "statistic" in line and "DROP" in line:
                total += int(line.split()[0])
        return total

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


class Lan:
    """A bridge and hosts, each in its own namespace; see the module docstring."""

    def __init__(self, nodes: int) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError("1 to 200 nodes")
        self.id = f"{PREFIX}{os.getpid()}"
        if any(n.startswith(self.id + "-") for n in netns_names()):
            raise RuntimeError(f"namespaces {self.id}-* exist already: one LAN per process at a time")
        self.switch = f"{self.id}-switch"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._closed = False
        atexit.register(self.close)
        try:
            self._add_netns(self.switch)
            run(["ip", "-n", self.switch, "link", "add", BRIDGE, "type", "bridge"])
            run(["ip", "-n", self.switch, "link", "set", BRIDGE, "type", "bridge", "mcast_snooping", "0"])
            run(["ip", "-n", self.switch, "link", "set", BRIDGE, "up"])
            self._add_host("master")
            for i in range(1, nodes + 1):
                self._add_host(f"node{i}")
            self._wait_up()
            self._counters()
            # A process that lives in the master's namespace, so that the
            # benchmark can read its /proc/PID/net/dev without forking.
            self.anchor = subprocess.Popen(self.master.argv(["sleep", "infinity"]), start_new_session=True)
            time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    @property
    def master(self) -> Host:
        return self.hosts["master"]

    @property
    def nodes(self) -> list[Host]:
        return [h for name, h in self.hosts.items() if name != "master"]

    def _add_netns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _add_host(self, name: str) -> Host:
        number = len(self.hosts) + 1
        netns, port = f"{self.id}-{name}", f"p{name}"
        self._add_netns(netns)
        run(
            [
                "ip",
                "-n",
                netns,
                "link",
                "add",
                IFNAME,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.switch,
            ]
        )
        # A switch port puts one datagram in each frame, as a wire does: a
        # veth would otherwise hand a node a batch sent with UDP_SEGMENT (or
        # a TCP super-packet) whole, and the node's loss rule would drop it
        # whole, a burst instead of one datagram.  (The node's UDP layer
        # would cut it up anyway; here the port does, before the node.)
        run(["ip", "-n", self.switch, "link", "set", port, "gso_max_segs", "1"])
        run(["ip", "-n", self.switch, "link", "set", port, "master", BRIDGE, "up"])
        ip = str(SUBNET[number])
        run(["ip", "-n", netns, "addr", "add", f"{ip}/{SUBNET.prefixlen}", "brd", "+", "dev", IFNAME])
        run(["ip", "-n", netns, "link", "set", IFNAME, "up"])
        # Multicast leaves by eth0 (the only route there is: no default route).
        run(["ip", "-n", netns, "route", "add", "224.0.0.0/4", "dev", IFNAME])
        host = Host(self, name, netns, ip, port, number)
        self.hosts[name] = host
        return host

    def _wait_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for host in self.hosts.values():
            while True:
                info = json.loads(run(["ip", "-n", host.netns, "-j", "link", "show", "dev", IFNAME]).stdout)[
                    0
                ]
                if info.get("operstate") == "UP":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{host.name} did not come up: {info}")
                time.sleep(0.05)

    def _counters(self) -> None:
        m = self.master
        m.iptables("-N", "MRB_IN")
        m.iptables("-A", "INPUT", "-s", str(SUBNET), "-j", "MRB_IN")
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

    def netns_inodes(self) -> set[int]:
        """The inode numbers of this LAN's network namespaces (as /proc/PID/ns/net shows them)."""
        found = set()
        for name in self._namespaces:
            with contextlib.suppress(OSError):
                found.add(os.stat(f"/run/netns/{name}").st_ino)
        return found

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

    def shape_master(self, rate_bps: float, queue_ms: float = 50.0, burst: int = 0) -> None:
        """The master's link: everything it sends crosses this bucket."""
        bucket = tbf_args(rate_bps, queue_ms, burst)
        self.master.run(["tc", "qdisc", "replace", "dev", IFNAME, "root", *bucket])

    def shape_node(self, node: Host, rate_bps: float) -> None:
        """A node behind a slower link: what the bridge sends toward it."""
        run(
            [
                "ip",
                "netns",
                "exec",
                self.switch,
                "tc",
                "qdisc",
                "replace",
                "dev",
                node.port,
                "root",
                *tbf_args(rate_bps),
            ]
        )

    def qdisc_stats(self, host: Host | None = None) -> dict[str, Any]:
        """Sent/dropped/overlimits of a tbf: the master's, or a slow node's port."""
        if host is None:
            out = self.master.run(["tc", "-s", "-j", "qdisc", "show", "dev", IFNAME]).stdout
        else:
            out = run(
                ["ip", "netns", "exec", self.switch, "tc", "-s", "-j", "qdisc", "show", "dev", host.port]
            ).stdout
        for q in json.loads(out):
            if q.get("kind") == "tbf":
                return {k: q.get(k) for k in ("bytes", "packets", "drops", "overlimits", "requeues")}
        return {}

    def close(self) -> None:
        """Kill every process in the LAN and delete its namespaces (idempotent)."""
        if self._closed:
            return
        anchor = getattr(self, "anchor", None)
        if anchor is not None and anchor.poll() is None:
            anchor.kill()
            anchor.wait()
        for netns in reversed(self._namespaces):
            kill_netns_pids(netns)
            run(["ip", "netns", "del", netns], check=False)
        left = set(self._namespaces) & set(netns_names())
        if left:
            print(f"bench: could not delete namespaces {sorted(left)}")
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
