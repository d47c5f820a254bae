"""
The benchmark's scenarios (issues 4 and 16), as a table.

A scenario is one or more cases; a case is one LAN (nodes, master link rate,
loss, slow nodes, a competing TCP flow) on which every tool sends the same
file (or the same tree of files: `Case.files`) in turn.  Scenario D compares
two node counts and F a LAN with and without its slow node, so they have two
cases each.  Targets are reported, never asserted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

MiB = 1 << 20
GiB = 1 << 30
Mbit = 1_000_000
Gbit = 1_000_000_000
#: T100k's memory bounds: the peak RSS of any node daemon, and of the master's.
TREE_NODE_RSS = 256 * MiB
TREE_MASTER_RSS = 512 * MiB


@dataclass(frozen=True)
class Case:
    label: str
    nodes: int
    link_bps: float
    size: int
    #: Share of UDP datagrams dropped at every node's INPUT.
    loss: float = 0.0
    #: The last ``slow_nodes`` nodes sit behind links of ``link_bps * slow_factor``.
    slow_nodes: int = 0
    slow_factor: float = 0.1
    #: An iperf3 TCP flow from the master to node1 across the bottleneck, during each transfer.
    tcp_competitor: bool = False
    #: That flow's congestion control (iperf3 ``-C``); empty: the host's default.
    tcp_cc: str = ""
    #: Seconds after the push began that the flow starts; 0: 3 s before it.
    tcp_after: float = 0.0
    #: The master link's token bucket: its queue in milliseconds, and its
    #: burst in bytes (0: 1 ms of traffic, at least 16 KB).
    queue_ms: float = 50.0
    burst: int = 0
    #: A tree of ``files`` files (0: the one file of ``size`` bytes) in
    #: ``dirs`` directories, each of ``file_min`` to ``file_max`` bytes, as
    #: `tree_layout` lays it out; ``size`` is then their total (`tree_case`).
    files: int = 0
    dirs: int = 0
    file_min: int = 0
    file_max: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    cases: tuple[Case, ...]
    target: str
    tools: tuple[str, ...] = ("mrsyncd", "udpcast", "uftp")
    notes: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def tree_layout(files: int, dirs: int, file_min: int, file_max: int) -> list[tuple[str, int]]:
    """
    A tree case's files: (relative path, size) for each, the same every time
    (a seeded generator): file ``i`` is ``d<i % dirs>/f<i>``.
    """
    rng = random.Random(f"mrsyncd bench tree {files} {dirs} {file_min} {file_max}")
    dw, fw = len(str(max(0, dirs - 1))), len(str(max(0, files - 1)))
    return [(f"d{i % dirs:0{dw}d}/f{i:0{fw}d}", rng.randint(file_min, file_max)) for i in range(files)]


def tree_case(
    label: str, nodes: int, link_bps: float, files: int, dirs: int, file_min: int, file_max: int
) -> Case:
    """A case that sends a tree: its ``size`` is the total of its files' sizes."""
    size = sum(n for _, n in tree_layout(files, dirs, file_min, file_max))
    return Case(label, nodes, link_bps, size, files=files, dirs=dirs, file_min=file_min, file_max=file_max)


#: Issue 20's cells: every pairing of a TCP variant, its start, the queue and the burst.
FAIRNESS_CELLS = tuple(
    Case(
        f"{cc} {'after' if after else 'before'} {queue:g} ms {burst // 1000} KB",
        4,
        100 * Mbit,
        100 * MiB,
        tcp_competitor=True,
        tcp_cc=cc,
        tcp_after=after,
        queue_ms=queue,
        burst=burst,
    )
    for cc in ("cubic", "bbr")
    for after in (0.0, 4.0)
    for queue in (5.0, 20.0, 50.0)
    for burst in (16_000, 256_000)
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "A",
            "100 Mbit/s, 8 nodes, 200 MiB, no loss",
            (Case("8 nodes", 8, 100 * Mbit, 200 * MiB),),
            "mrsyncd >= 93% efficiency and faster than udpcast and UFTP",
        ),
        Scenario(
            "B",
            "100 Mbit/s, 8 nodes, 200 MiB, 2% random loss at every node",
            (Case("8 nodes, 2% loss", 8, 100 * Mbit, 200 * MiB, loss=0.02),),
            "mrsyncd >= 88% efficiency and faster than udpcast and UFTP",
        ),
        Scenario(
            "C",
            "1 Gbit/s, 3 nodes, 1 GiB",
            (Case("3 nodes", 3, 1 * Gbit, 1 * GiB),),
            "mrsyncd faster than udpcast and UFTP",
        ),
        Scenario(
            "N",
            "no rate cap (a 10 Gbit/s bucket on the veth), 1 node, 1 GiB",
            (Case("1 node, no cap", 1, 10 * Gbit, 1 * GiB),),
            "mrsyncd's throughput at least the faster peer's",
            notes="The CPU is the bound: a sender and one receiver on the machine's 2 cores.",
        ),
        Scenario(
            "D",
            "time flat in nodes: 1 vs 24 nodes, 50 Mbit/s, 100 MiB",
            (Case("1 node", 1, 50 * Mbit, 100 * MiB), Case("24 nodes", 24, 50 * Mbit, 100 * MiB)),
            "mrsyncd's 24-node time <= 1.15 x its 1-node time",
            notes="100 MiB instead of 200 MiB keeps 25 copies in memory and the run short; "
            "24 receivers share the machine's 2 cores, so their CPU is part of what is measured.",
        ),
        Scenario(
            "E",
            "TCP-friendliness: an iperf3 TCP flow across the 100 Mbit/s bottleneck, 8 nodes, 200 MiB",
            (Case("8 nodes + TCP", 8, 100 * Mbit, 200 * MiB, tcp_competitor=True),),
            "the TCP flow keeps >= 40% of the link during the transfer (alone it gets ~96 Mbit/s)",
        ),
        Scenario(
            "F",
            "a slow node: 8 nodes at 100 Mbit/s, one behind a 10 Mbit/s link, 50 MiB",
            (
                Case("7 nodes", 7, 100 * Mbit, 50 * MiB),
                Case("7 nodes + 1 slow", 8, 100 * Mbit, 50 * MiB, slow_nodes=1),
            ),
            "the others finish within 1.25 x their time without the slow node; "
            "the slow node within 1.25 x its own link's bound",
            notes="50 MiB: the slow node's bound alone is 42 s at 10 Mbit/s.",
        ),
        Scenario(
            "G",
            "feedback: 24 nodes at 2% loss, 100 Mbit/s, 100 MiB",
            (Case("24 nodes, 2% loss", 24, 100 * Mbit, 100 * MiB, loss=0.02),),
            "feedback bytes (nodes -> master) < 1% of data bytes sent",
        ),
        Scenario(
            "H",
            "scale: 64 nodes on a 20 Mbit/s link, 1% random loss at every node, 20 MiB",
            (Case("64 nodes, 1% loss", 64, 20 * Mbit, 20 * MiB, loss=0.01),),
            "every node verified; mrsyncd at most the faster peer's time and 1.5 x the link's bound; "
            "feedback < 1% of data",
            notes="64 receivers share the machine's 2 cores.",
        ),
        Scenario(
            "fair",
            "fairness matrix: a TCP flow (cubic, bbr) across the 100 Mbit/s bottleneck, started before or "
            "after the push, behind a 5, 20 or 50 ms queue with a 16 KB or 256 KB burst; 4 nodes, 100 MiB",
            FAIRNESS_CELLS,
            "in every cell TCP keeps >= 40 Mbit/s and the push >= 30 Mbit/s while both run; "
            "the median cell within 10 Mbit/s of an even split",
            notes="Rates are counted at node1 (IP bytes of the TCP flow and of the push's UDP) from the "
            "moment both run, plus 1 s, until the last node holds its copy.",
        ),
        Scenario(
            "T",
            "a tree: 10,000 files of 1-20 kB in 100 directories (about 100 MiB) to 8 nodes at 100 Mbit/s",
            (tree_case("8 nodes, 10,000 files", 8, 100 * Mbit, 10_000, 100, 1_000, 20_000),),
            "mrsyncd within 1.5 x the link's bound and faster than UFTP; the same push again, nothing "
            "changed, ends in < 1.5 s; with 1% of the files changed it sends <= 1.25 x their bytes",
            tools=("mrsyncd", "uftp"),
            notes="udpcast sends one file, not a tree.  A node is done when the sender exits (mrsync push "
            "once every node committed every file; uftp once every receiver acknowledged); every copy is "
            "walked and compared with the source afterwards.  mrsyncd then pushes the same source again, "
            "and a copy of it with 1% of its files changed, while its daemons run.",
        ),
        Scenario(
            "T100k",
            "many tiny files: 100,000 files of 0-100 bytes in 1,000 directories to 4 nodes at 100 Mbit/s",
            (tree_case("4 nodes, 100,000 files", 4, 100 * Mbit, 100_000, 1_000, 0, 100),),
            f"every node's copy identical to the source; node peak RSS <= {TREE_NODE_RSS // MiB} MiB "
            f"and the master's <= {TREE_MASTER_RSS // MiB} MiB",
            tools=("mrsyncd", "uftp"),
            notes="Timed and verified as T.  The bytes are few (about 5 MB): what is measured is the "
            "cost of a file, in time and in memory.",
        ),
        # Sweeps for the chart: throughput against nodes and against loss.
        Scenario(
            "nodes",
            "sweep: 1, 2, 4, 8, 16 nodes at 100 Mbit/s, 100 MiB, no loss",
            tuple(Case(f"{n} nodes", n, 100 * Mbit, 100 * MiB) for n in (1, 2, 4, 8, 16)),
            "flat",
        ),
        Scenario(
            "tree-nodes",
            "sweep: T's tree to 1, 2, 4, 8 nodes at 100 Mbit/s",
            tuple(
                tree_case(f"{n} nodes, 10,000 files", n, 100 * Mbit, 10_000, 100, 1_000, 20_000)
                for n in (1, 2, 4, 8)
            ),
            "flat: where it is not, the nodes share this machine's cores (on disk: its ext4 too)",
            tools=("mrsyncd", "uftp"),
        ),
        Scenario(
            "loss",
            "sweep: 0, 0.5, 1, 2, 5% loss, 8 nodes at 100 Mbit/s, 100 MiB",
            tuple(Case(f"{p:g}% loss", 8, 100 * Mbit, 100 * MiB, loss=p / 100) for p in (0, 0.5, 1, 2, 5)),
            "graceful",
        ),
    ]
}

#: What ``--all`` runs: the issue's scenarios (the sweeps are run by name).
ISSUE_SCENARIOS = ("A", "B", "C", "N", "D", "E", "F", "G", "H")


def resized(scenario: Scenario, size: int) -> Scenario:
    """The same scenario with every case's file ``size`` bytes (a quick run); a tree keeps its own."""
    return replace(scenario, cases=tuple(c if c.files else replace(c, size=size) for c in scenario.cases))


def retreed(scenario: Scenario, files: int) -> Scenario:
    """The same scenario with ``files`` files in every tree case, as many to a directory (a quick run)."""

    def fewer(c: Case) -> Case:
        if not c.files:
            return c
        dirs = max(1, round(c.dirs * files / c.files))
        t = tree_case(c.label, c.nodes, c.link_bps, files, dirs, c.file_min, c.file_max)
        return replace(c, label=f"{c.nodes} nodes, {files:,} files", files=t.files, dirs=t.dirs, size=t.size)

    return replace(scenario, cases=tuple(fewer(c) for c in scenario.cases))


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": GiB}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)
