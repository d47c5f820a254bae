"""
Figures from a run's JSON: the table, the issue's targets, and the chart.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.scenarios import TREE_MASTER_RSS, TREE_NODE_RSS

MiB = 1 << 20
#: CPU is compared per this much payload (mrsyncd's block on an IPv6 group;
#: 1428 on IPv4): the tools put different payloads in a datagram, so "per
#: datagram" is per 1408 bytes of file for all of them.
BLOCK = 1408


def derived(case: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """Throughput, efficiency and feedback share of one tool's result."""
    out: dict[str, Any] = {}
    wall = r.get("wall")
    if r.get("ok") and wall:
        out["payload_bps"] = case["size"] * 8 / wall
        out["efficiency"] = out["payload_bps"] / case["link_bps"]
    c = r.get("counters") or {}
    if c.get("sent_udp_bytes"):
        out["feedback_share"] = c.get("feedback_bytes", 0) / c["sent_udp_bytes"]
    blocks = case["size"] / BLOCK
    sender_cpu = (r.get("sender") or {}).get("cpu")
    if sender_cpu is not None and blocks:
        out["send_us_per_block"] = sender_cpu * 1e6 / blocks
    rx = r.get("receivers") or []
    if rx:
        cpus = [p["cpu"] for p in rx]
        out["recv_cpu_mean"] = sum(cpus) / len(cpus)
        out["recv_cpu_max"] = max(cpus)
        out["recv_cpu_total"] = sum(cpus)
        if blocks:
            out["recv_us_per_block"] = out["recv_cpu_mean"] * 1e6 / blocks
        out["recv_hwm_max"] = max(p["hwm_bytes"] for p in rx)
        # The share of one core a receiver would need to keep up with the
        # full link: its CPU seconds over the transfer's time at link rate.
        out["recv_core_at_link"] = out["recv_cpu_mean"] / (case["size"] * 8 / case["link_bps"])
    if (r.get("sender") or {}).get("hwm_bytes"):
        out["send_hwm"] = r["sender"]["hwm_bytes"]
    details = r.get("details") or {}
    changed = details.get("changed_1pct") or {}
    if changed.get("sent_bytes") is not None and changed.get("changed_bytes"):
        # A tree pushed again with some files changed: what it sent per changed byte.
        out["changed_sent_ratio"] = changed["sent_bytes"] / changed["changed_bytes"]
    return out


def push_text(push: dict[str, Any]) -> str:
    """One of a tree's later pushes (``details["again"]``, ``["changed_1pct"]``) in a few words."""
    sent = push.get("sent_bytes")
    text = f"{_f(push.get('seconds'), '.2f')} s, {_n(sent)} B sent"
    if push.get("changed_bytes") and sent is not None:
        text += f" ({sent / push['changed_bytes']:.2f} x the changed files' bytes)"
    verified = push.get("verified")
    if verified:
        text += f", {sum(verified.values())}/{len(verified)} nodes verified"
    return text + (f"; {push['error']}" if push.get("error") else "")


def tree_lines(doc: dict[str, Any]) -> list[str]:
    """Under the table, for each tree case: peak RSS, and mrsyncd's later pushes of the tree."""
    lines = []
    for c in doc["cases"]:
        case = c["case"]
        if not case.get("files"):
            continue
        for tool, r in c["results"].items():
            d = derived(case, r)
            lines.append(
                f"- {case['label']}, {tool}: {case['files']:,} files, {case['size']:,} B; peak RSS: sender "
                f"{_f(d.get('send_hwm') and d['send_hwm'] / MiB, '.1f')} MiB, nodes up to "
                f"{_f(d.get('recv_hwm_max') and d['recv_hwm_max'] / MiB, '.1f')} MiB"
            )
            details = r.get("details") or {}
            if details.get("again"):
                lines.append(f"  - the same push again: {push_text(details['again'])}")
            changed = details.get("changed_1pct")
            if changed:
                lines.append(
                    f"  - {_n(changed.get('files'))} files changed ({_n(changed.get('changed_bytes'))} B), "
                    f"pushed: {push_text(changed)}"
                )
            after = details.get("hwm_after_pushes")
            if after:
                lines.append(
                    f"  - peak RSS after those pushes: master {after['master'] / MiB:.1f} MiB, "
                    f"nodes up to {after['nodes_max'] / MiB:.1f} MiB"
                )
    return lines


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _n(value: int | None) -> str:
    """A count of bytes (or anything) with thousands separated; – for none."""
    return "–" if value is None else f"{value:,}"


def table(doc: dict[str, Any]) -> str:
    """A Markdown table of one scenario run."""
    head = (
        "| case | tool | ok | time s | payload Mbit/s | efficiency | time ÷ mrsyncd | sender CPU s "
        "| receiver CPU s mean (max) | CPU µs per 1408 B, sender / receiver "
        "| receiver core at link rate | receiver peak RSS MiB "
        "| feedback bytes (% of sent) | tbf drops | machine busy (others' CPU s, steal s) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in doc["cases"]:
        case = c["case"]
        base = c["results"].get("mrsyncd", {})
        for tool, r in c["results"].items():
            d = derived(case, r)
            ratio = None
            if r.get("ok") and base.get("ok") and base.get("wall"):
                ratio = r["wall"] / base["wall"]
            cnt = r.get("counters") or {}
            mc = r.get("machine_cpu") or {}
            others = None if mc.get("others") is None else max(0.0, mc["others"])
            fb = cnt.get("feedback_bytes")
            share = d.get("feedback_share")
            fb_text = (
                "–" if fb is None else f"{fb:,} ({share * 100:.2f}%)" if share is not None else f"{fb:,}"
            )
            ok = "yes" if r.get("ok") else f"NO: {r.get('error', '')[:60]}"
            lines.append(
                f"| {case['label']} | {tool} | {ok} | {_f(r.get('wall'), '.1f')} "
                f"| {_f(d.get('payload_bps') and d['payload_bps'] / 1e6, '.1f')} "
                f"| {_f(d.get('efficiency') and d['efficiency'] * 100, '.1f')}% "
                f"| {_f(ratio, '.2f')} | {_f((r.get('sender') or {}).get('cpu'), '.1f')} "
                f"| {_f(d.get('recv_cpu_mean'), '.1f')} ({_f(d.get('recv_cpu_max'), '.1f')}) "
                f"| {_f(d.get('send_us_per_block'), '.1f')} / {_f(d.get('recv_us_per_block'), '.1f')} "
                f"| {_f(d.get('recv_core_at_link') and d['recv_core_at_link'] * 100, '.0f')}% "
                f"| {_f(d.get('recv_hwm_max') and d['recv_hwm_max'] / MiB, '.1f')} "
                f"| {fb_text} | {(r.get('qdisc') or {}).get('drops', '–')} "
                f"| {_f(mc.get('busy_share') and mc['busy_share'] * 100, '.0f')}% ({_f(others, '.1f')}, "
                f"{_f(mc.get('steal'), '.2f')}) |"
            )
        if c.get("tcp_alone_bps"):
            pad = " |" * 10
            cc = c.get("tcp_congestion_control", "")
            lines.append(f"| {case['label']} | iperf3 alone {cc} | | | {c['tcp_alone_bps'] / 1e6:.1f} |{pad}")
            for tool, r in c["results"].items():
                bps = (r.get("tcp") or {}).get("bps_during")
                if bps:
                    lines.append(
                        f"| {case['label']} | iperf3 during {tool} | | | {bps / 1e6:.1f} "
                        f"| {bps / case['link_bps'] * 100:.0f}% of link |" + " |" * 9
                    )
    trees = tree_lines(doc)
    if trees:
        lines += ["", *trees]
    return "\n".join(lines)


def _tool(c: dict[str, Any], tool: str = "mrsyncd") -> dict[str, Any]:
    return c["results"].get(tool) or {}


def _meets(value: float | None, rule: str, limit: float) -> bool | None:
    if value is None:
        return None
    return {"<=": value <= limit, ">=": value >= limit, "<": value < limit}[rule]


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """
    The issue's targets for this scenario: each with the figure it judges
    (``value``), the rule (``value rule limit``), and whether it is met
    (None when not measurable).
    """
    name, cases = doc["scenario"], doc["cases"]
    out: list[dict[str, Any]] = []

    def add(text: str, value: float | None, rule: str, limit: float, evidence: str) -> None:
        met = _meets(value, rule, limit)
        out.append(
            {"target": text, "met": met, "value": value, "rule": rule, "limit": limit, "evidence": evidence}
        )

    def eff(c: dict[str, Any], tool: str = "mrsyncd") -> float | None:
        return derived(c["case"], _tool(c, tool)).get("efficiency")

    def wall(c: dict[str, Any], tool: str = "mrsyncd") -> float | None:
        r = _tool(c, tool)
        return r.get("wall") if r.get("ok") else None

    if name in ("A", "B"):
        goal = 0.93 if name == "A" else 0.88
        e = eff(cases[0])
        add(f"mrsyncd efficiency >= {goal:.0%}", e, ">=", goal, f"{_f(e and e * 100, '.1f')}%")
    if name in ("A", "B", "C", "N", "H", "T"):
        for peer in ("udpcast", "uftp"):
            if peer in cases[0]["results"]:
                m, p = wall(cases[0]), wall(cases[0], peer)
                # The time against the peer's; 0 when the peer did not finish.
                ratio = None if m is None else (m / p if p else 0.0)
                add(f"mrsyncd faster than {peer}", ratio, "<=", 1.0, f"{_f(m, '.2f')} s vs {_f(p, '.2f')} s")
    if name in ("H", "T"):
        c = cases[0]
        m = wall(c)
        bound = c["case"]["size"] * 8 / c["case"]["link_bps"]
        add(
            "mrsyncd within 1.5 x the link's bound",
            None if m is None else m / bound,
            "<=",
            1.5,
            f"{_f(m, '.1f')} s vs bound {bound:.1f} s",
        )
    if name == "T":
        details = _tool(cases[0]).get("details") or {}
        again = details.get("again") or {}
        again_s = again.get("seconds") if again.get("rc") == 0 else None
        add(
            "the same push again, nothing changed, ends in < 1.5 s",
            again_s,
            "<",
            1.5,
            f"{_f(again_s, '.2f')} s, {_n(again.get('sent_bytes'))} B sent",
        )
        changed = details.get("changed_1pct") or {}
        ratio = derived(cases[0]["case"], _tool(cases[0])).get("changed_sent_ratio")
        if changed.get("rc") != 0 or not all((changed.get("verified") or {"": False}).values()):
            ratio = None  # failed, or the nodes do not hold the changed tree
        add(
            "with 1% of the files changed, it sends <= 1.25 x their bytes",
            ratio,
            "<=",
            1.25,
            f"{_n(changed.get('sent_bytes'))} B sent for {_n(changed.get('files'))} files of "
            f"{_n(changed.get('changed_bytes'))} B = {_f(ratio, '.2f')}, "
            f"in {_f(changed.get('seconds'), '.2f')} s",
        )
    if name == "T100k":
        c = cases[0]
        r = _tool(c)
        verified = r.get("verified") or {}
        share = sum(verified.values()) / c["case"]["nodes"] if verified else None
        add(
            "every node's copy identical to the source",
            share,
            ">=",
            1.0,
            f"{sum(verified.values())}/{c['case']['nodes']} nodes verified",
        )
        d = derived(c["case"], r)
        node, master = d.get("recv_hwm_max"), d.get("send_hwm")
        add(
            f"node peak RSS <= {TREE_NODE_RSS // MiB} MiB",
            node and node / MiB,
            "<=",
            TREE_NODE_RSS / MiB,
            f"{_f(node and node / MiB, '.1f')} MiB, the largest of {len(r.get('receivers') or [])} nodes",
        )
        add(
            f"master peak RSS <= {TREE_MASTER_RSS // MiB} MiB",
            master and master / MiB,
            "<=",
            TREE_MASTER_RSS / MiB,
            f"{_f(master and master / MiB, '.1f')} MiB",
        )
    if name == "D" and len(cases) == 2:
        one, many = wall(cases[0]), wall(cases[1])
        ratio = many / one if one and many else None
        add(
            "24-node time <= 1.15 x 1-node time",
            ratio,
            "<=",
            1.15,
            f"{_f(many, '.1f')} s / {_f(one, '.1f')} s = {_f(ratio, '.2f')}",
        )
    if name == "E":
        c = cases[0]
        bps = (_tool(c).get("tcp") or {}).get("bps_during")
        share = bps / c["case"]["link_bps"] if bps else None
        add(
            "TCP keeps >= 40% of the link",
            share,
            ">=",
            0.40,
            f"{_f(bps and bps / 1e6, '.1f')} Mbit/s ({_f(share and share * 100, '.0f')}%); "
            f"alone {_f(c.get('tcp_alone_bps') and c['tcp_alone_bps'] / 1e6, '.1f')} Mbit/s, "
            f"TCP {c.get('tcp_congestion_control', '?')}",
        )
    if name == "F" and len(cases) == 2:
        base, slow = cases[0], cases[1]
        n_fast = base["case"]["nodes"]
        b = _tool(base).get("node_seconds") or {}
        s = _tool(slow).get("node_seconds") or {}
        fast_names = [f"node{i}" for i in range(1, n_fast + 1)]
        before = [b.get(n) for n in fast_names]
        after = [s.get(n) for n in fast_names]
        if all(before) and all(after):
            ratio = max(after) / max(before)  # type: ignore[type-var,operator]
            add("others within 1.25 x their time without the slow node", ratio, "<=", 1.25,
                f"{max(after):.1f} s vs {max(before):.1f} s = {ratio:.2f}")  # type: ignore[type-var] # fmt: skip
        else:
            add("others within 1.25 x their time without the slow node", None, "<=", 1.25, "incomplete")
        slow_name = f"node{slow['case']['nodes']}"
        t = s.get(slow_name)
        bound = slow["case"]["size"] * 8 / (slow["case"]["link_bps"] * slow["case"]["slow_factor"])
        add(
            "slow node within 1.25 x its own link's bound",
            None if t is None else t / bound,
            "<=",
            1.25,
            f"{_f(t, '.1f')} s vs bound {bound:.1f} s = {_f(t and t / bound, '.2f')}",
        )
    if name == "fair":
        cells = fairness(doc)
        tcp = [c["tcp"] for c in cells if c["tcp"] is not None]
        push = [c["push"] for c in cells if c["push"] is not None]
        complete = len(tcp) == len(push) == len(cells)
        worst_tcp = min(tcp) if tcp and complete else None
        worst_push = min(push) if push and complete else None
        both = [c for c in cells if c["tcp"] is not None and c["push"] is not None]
        off = [abs(c["tcp"] - c["push"]) / 2 for c in both]
        median_off = statistics.median(off) if off and complete else None
        add("TCP keeps >= 40 Mbit/s in every cell", worst_tcp and worst_tcp / 1e6, ">=", 40.0,
            f"least {_f(worst_tcp and worst_tcp / 1e6, '.1f')} Mbit/s of {len(cells)} cells")  # fmt: skip
        add("the push keeps >= 30 Mbit/s in every cell", worst_push and worst_push / 1e6, ">=", 30.0,
            f"least {_f(worst_push and worst_push / 1e6, '.1f')} Mbit/s")  # fmt: skip
        add("the median cell within 10 Mbit/s of an even split", median_off and median_off / 1e6, "<=", 10.0,
            f"median {_f(median_off and median_off / 1e6, '.1f')} Mbit/s off")  # fmt: skip
    if name in ("G", "H"):
        share = derived(cases[0]["case"], _tool(cases[0])).get("feedback_share")
        add("feedback < 1% of data bytes", share, "<", 0.01, f"{_f(share and share * 100, '.3f')}%")
    return out


def fairness(doc: dict[str, Any], tool: str = "mrsyncd") -> list[dict[str, Any]]:
    """A tool's cells of the fairness matrix: TCP's and the push's bit/s while both ran."""
    out = []
    for c in doc["cases"]:
        tcp = _tool(c, tool).get("tcp") or {}
        out.append(
            {
                "label": c["case"]["label"],
                "tcp": tcp.get("both_tcp_bps"),
                "push": tcp.get("both_push_bps"),
                "seconds": tcp.get("both_seconds"),
            }
        )
    return out


def fairness_table(doc: dict[str, Any]) -> str:
    """The matrix: one row a cell, TCP / push in Mbit/s for each tool."""
    tools = [t for t in TOOL_STYLE if any(t in c["results"] for c in doc["cases"])]
    lines = [
        "| TCP, start, queue, burst | " + " | ".join(f"{t}: TCP / push Mbit/s" for t in tools) + " |",
        "|---|" + "---|" * len(tools),
    ]
    columns = {t: fairness(doc, t) for t in tools}
    for i, c in enumerate(doc["cases"]):
        row = [
            f"{_f(cell['tcp'] and cell['tcp'] / 1e6, '.1f')} / "
            f"{_f(cell['push'] and cell['push'] / 1e6, '.1f')}"
            for cell in (columns[t][i] for t in tools)
        ]
        lines.append(f"| {c['case']['label']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def fairness_chart(doc: dict[str, Any], out: Path) -> Path:
    """TCP's and the push's Mbit/s in every cell, a panel a tool, with the targets' lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = [t for t in TOOL_STYLE if any(t in c["results"] for c in doc["cases"])]
    fig, axes = plt.subplots(len(tools), 1, figsize=(14, 3.2 * len(tools)), sharex=True, squeeze=False)
    labels = [c["case"]["label"] for c in doc["cases"]]
    xs = range(len(labels))
    for ax, tool in zip(axes[:, 0], tools, strict=True):
        cells = fairness(doc, tool)
        tcp = [(c["tcp"] or 0) / 1e6 for c in cells]
        ax.bar([x - 0.2 for x in xs], tcp, 0.4, label="TCP", color="tab:red")
        ax.bar([x + 0.2 for x in xs], [(c["push"] or 0) / 1e6 for c in cells], 0.4, label=tool,
               color=TOOL_STYLE[tool][0])  # fmt: skip
        ax.axhline(40, color="tab:red", linestyle=":", linewidth=1)
        ax.axhline(30, color=TOOL_STYLE[tool][0], linestyle=":", linewidth=1)
        ax.set_ylabel("Mbit/s")
        ax.set_ylim(0, 100)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xticks(list(xs))
    axes[-1, 0].set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    fig.suptitle(doc["title"][:110])
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def across(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The targets over repeated runs of one scenario, judged by the median of
    their figures: on a machine this busy one run can land on either side
    of a line that the median keeps to.
    """
    judged: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        for t in doc.get("targets") or targets(doc):
            judged.setdefault(t["target"], []).append(t)
    out = []
    for text, runs in judged.items():
        values = sorted(t["value"] for t in runs if t["value"] is not None)
        median = None
        if values:
            middle = len(values) // 2
            median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
        rule, limit = runs[0]["rule"], runs[0]["limit"]
        met_runs = sum(1 for t in runs if t["met"])
        spread = f", {values[0]:.4g}–{values[-1]:.4g}" if values else ""
        out.append(
            {
                "target": text,
                "met": _meets(median, rule, limit),
                "value": median,
                "rule": rule,
                "limit": limit,
                "evidence": f"median {_f(median, '.4g')} of {len(runs)} runs{spread}; "
                f"met in {met_runs} of {len(runs)}",
            }
        )
    return out


def load(paths: Iterable[Path]) -> list[dict[str, Any]]:
    docs = []
    for p in paths:
        try:
            docs.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return docs


TOOL_STYLE = {
    "mrsyncd": ("tab:blue", "o"),
    "mrsyncd-engine": ("tab:cyan", "P"),
    "udpcast": ("tab:orange", "s"),
    "udpcast-default": ("tab:brown", "v"),
    "uftp": ("tab:green", "^"),
    "uftp-tfmcc": ("tab:olive", "D"),
}


def chart(docs: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """
    Three panels: efficiency of each tool in each case; efficiency against
    the number of nodes (cases without loss, slow nodes or competing TCP);
    efficiency against loss.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cases = [(d["scenario"], c) for d in docs for c in d["cases"]]
    tools = [t for t in TOOL_STYLE if any(t in c["results"] for _, c in cases)]
    # One case alone has nothing to plot against nodes or loss: bars only.
    sides = len(cases) > 1
    if sides:
        fig, axes = plt.subplots(1, 3, figsize=(18, 6.6), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    else:
        fig, bar_ax = plt.subplots(1, 1, figsize=(6.5, 5.5))
        axes = [bar_ax]

    ax = axes[0]
    width = 0.8 / max(1, len(tools))
    labels = [
        f"{s}: {c['case']['label']}\n{c['case']['link_bps'] / 1e6:g} Mbit/s, {c['case']['size'] / MiB:g} MiB"
        for s, c in cases
    ]
    for i, tool in enumerate(tools):
        values = []
        for _, c in cases:
            r = c["results"].get(tool)
            values.append((derived(c["case"], r).get("efficiency") or 0) * 100 if r else 0)
        color, _ = TOOL_STYLE[tool]
        xs = [j + (i - (len(tools) - 1) / 2) * width for j in range(len(cases))]
        bars = ax.bar(xs, values, width, label=tool, color=color)
        for bar, v in zip(bars, values, strict=True):
            if v:
                ax.annotate(
                    f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7
                )
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("payload throughput, % of the master's link")
    ax.set_ylim(0, 105)
    ax.axhline(90, color="grey", lw=0.6, ls="--")
    ax.set_title("efficiency by case (0 = failed or not run)")
    ax.legend(fontsize=8, loc="lower left")

    def series(x_of: Any, keep: Any, group_of: Any) -> dict[tuple[str, Any], list[tuple[float, float]]]:
        """Points by tool and group (what else the cases share): only like is joined with like."""
        found: dict[tuple[str, Any], list[tuple[float, float]]] = {}
        for _, c in cases:
            k = c["case"]
            if not keep(k):
                continue
            for tool, r in c["results"].items():
                e = derived(k, r).get("efficiency")
                if e is not None:
                    found.setdefault((tool, group_of(k)), []).append((x_of(k), e * 100))
        return found

    def plain(k: dict[str, Any]) -> bool:
        return not k["slow_nodes"] and not k["tcp_competitor"] and not k.get("files")

    dashes = ["-", "--", ":", "-."]
    panels = [
        (
            lambda k: k["nodes"],
            lambda k: plain(k) and not k["loss"],
            lambda k: f"{k['link_bps'] / 1e6:g} Mbit/s, {k['size'] / MiB:g} MiB",
            "nodes",
            "against nodes (no loss)",
        ),
        (
            lambda k: k["loss"] * 100,
            plain,
            lambda k: f"{k['nodes']} nodes, {k['link_bps'] / 1e6:g} Mbit/s, {k['size'] / MiB:g} MiB",
            "random loss at every node, %",
            "against loss",
        ),
    ]
    for ax, (x_of, keep, group_of, xlabel, ttl) in zip(axes[1:], panels if sides else [], strict=True):
        found = series(x_of, keep, group_of)
        groups = sorted({g for _, g in found})
        used_tools = set()
        for (tool, group), points in sorted(found.items()):
            points.sort()
            color, marker = TOOL_STYLE.get(tool, ("black", "x"))
            style = dashes[groups.index(group) % len(dashes)]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, ls=style)
            used_tools.add(tool)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("payload throughput, % of link")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.set_title(ttl)
        handles = [
            Line2D([], [], color=TOOL_STYLE[t][0], marker=TOOL_STYLE[t][1], label=t)
            for t in tools
            if t in used_tools
        ] + [Line2D([], [], color="grey", ls=dashes[i % len(dashes)], label=g) for i, g in enumerate(groups)]
        if handles:
            ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
