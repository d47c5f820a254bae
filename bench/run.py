"""
The LAN benchmark: mrsyncd against udpcast and UFTP on a LAN of namespaces.

    sudo python3 bench/run.py --scenario A            # one scenario (see --list)
    sudo python3 bench/run.py --scenario A --size 50M  # the same with a smaller file
    sudo python3 bench/run.py --all                    # the issue's scenarios A-G
    sudo python3 bench/run.py --scenario T --files 500 # a tree scenario with fewer files

Each case builds a fresh LAN (mrsyncd.testing.lan), then every tool sends the
same file (or tree of files) to every node in turn (bench/runners.py); every
copy is checked against the source's sha256 (or the tree's digest).  Results
go to bench/results/ as JSON, a Markdown table and a PNG chart; see
bench/README.md.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report  # noqa: E402
from bench.runners import RUNNERS, Competitor, Context, measure, tree_digest  # noqa: E402
from bench.scenarios import (  # noqa: E402
    ISSUE_SCENARIOS,
    SCENARIOS,
    Case,
    MiB,
    Scenario,
    parse_size,
    resized,
    retreed,
    tree_layout,
)
from mrsyncd.testing.lan import Lan, sweep_dead_runs  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NEEDS = {
    "ip": "iproute2",
    "tc": "iproute2",
    "sysctl": "procps",
    "iptables": "iptables",
    "iperf3": "iperf3",
    "udp-sender": "udpcast",
    "udp-receiver": "udpcast",
    "uftp": "uftp",
    "uftpd": "uftp",
}


#: Seconds each file of a tree case adds to a tool's timeout, besides its
#: bytes' time: UFTP announces and closes every file in turn (1.3-2.6 ms a
#: file here).
TREE_FILE_TIMEOUT = 0.01

#: Debian packages the run needs besides the commands of `NEEDS`: what
#: mrsyncd runs on (debian/control's Depends), the chart, and what builds
#: mrsyncd's C module (setup.py).
PACKAGES = [
    *("python3-twisted", "python3-openssl", "python3-service-identity", "python3-cryptography"),
    *("python3-systemd", "python3-matplotlib", "gcc", "python3-dev", "libssl-dev", "python3-setuptools"),
]


def install_needs(tree: Path) -> None:
    """
    Install what is missing (the peers, iperf3, the chart's matplotlib) and
    build mrsyncd's C module in ``tree``: measured without it, mrsyncd would
    be measured on its slow path.
    """
    wanted = sorted({*NEEDS.values(), *PACKAGES})

    def installed(package: str) -> bool:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        return status.stdout.endswith("install ok installed")

    missing = [p for p in wanted if not installed(p)]
    if missing:
        print(f"installing {' '.join(missing)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env
        )
    if not (tree / "setup.py").exists():
        return  # a tree from before the C module
    subprocess.run(
        ["/usr/bin/python3", "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree,
        check=True,
        env={**os.environ, "MRSYNCD_REQUIRE_NATIVE": "1"},
        stdout=subprocess.DEVNULL,
    )


#: Says this boot's memory was touched once (`warm_memory`): /run is a tmpfs, empty after a boot.
WARMED = Path("/run/mrsyncd-bench-warmed")
#: What is written: more than a case holds at once (C: a 1 GiB source and three copies).
WARM_BYTES = 8 << 30


def warm_memory(shm: Path = Path("/dev/shm")) -> None:
    """
    Write 8 GiB of memory (`WARM_BYTES`, less if less is free) once a boot.
    A new virtual machine's host backs a page of the guest's only when the
    guest first writes it:
    here, writing 3 GB into tmpfs ran at 0.57 GB/s the first time and at
    2.1 GB/s the next.  The first tool of a case (mrsyncd) would pay that
    for every page its nodes wrote, and the tools after it would write into
    the pages it freed: a 1 GiB push to one node (N) cost the node 7.6 s of
    CPU on a new machine, 6.0 s once its memory had been written.
    """
    if WARMED.exists() or not shm.is_dir():
        return
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    size = min(WARM_BYTES, available - (2 << 30), shutil.disk_usage(shm).free - (2 << 30))
    if size > 0:
        print(
            f"writing {size / (1 << 30):.1f} GiB of memory once this boot (a new VM's host backs a page "
            "only when it is first written)",
            flush=True,
        )
        path = shm / f"mrbench-warm-{os.getpid()}"
        zeros = bytes(64 << 20)
        try:
            with open(path, "wb", buffering=0) as f:
                for _ in range(size // len(zeros)):
                    f.write(zeros)
        finally:
            path.unlink(missing_ok=True)
    WARMED.touch()


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP end the run like Ctrl-C: through the finally blocks that tear down."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    # Also when started where SIGINT is ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)


def make_source(workdir: Path, case: Case, cache: dict[Any, tuple[Path, str]]) -> tuple[Path, str]:
    """
    The case's source and its digest, made once a run: a file of random
    bytes and its sha256, or, for a tree case, ``src-tree-<files>-…/tree``
    laid out by `tree_layout` (random contents) and its `tree_digest`.
    """
    if case.files:
        key: Any = ("tree", case.files, case.dirs, case.file_min, case.file_max)
        if key not in cache:
            root = workdir / f"src-tree-{case.files}-{case.dirs}-{case.file_min}-{case.file_max}" / "tree"
            listing = {}
            for rel, n in tree_layout(case.files, case.dirs, case.file_min, case.file_max):
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                data = os.urandom(n)
                path.write_bytes(data)
                listing[rel] = (n, hashlib.sha256(data).hexdigest())
            cache[key] = (root, tree_digest(listing))
        return cache[key]
    size = case.size
    if size not in cache:
        d = workdir / f"src-{size}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "payload.bin"
        h = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 16 << 20))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        cache[size] = (path, h.hexdigest())
    return cache[size]


def snapshot_code(workdir: Path, tree: Path) -> tuple[Path, str]:
    """
    Copy mrsyncd/ as it is now: others edit the work tree while a run goes
    on, and every case of a run must test the same code.
    """
    code = workdir / "code"
    shutil.copytree(tree / "mrsyncd", code / "mrsyncd", ignore=shutil.ignore_patterns("__pycache__"))
    # The twistd plugin, for the daemons (found on sys.path as twisted/plugins).
    if (tree / "twisted").is_dir():
        shutil.copytree(
            tree / "twisted", code / "twisted", ignore=shutil.ignore_patterns("__pycache__", "dropin.cache")
        )
    # Byte-compiled, as the Debian package installs it (py3compile): without
    # this, a process that may not write __pycache__ (PYTHONDONTWRITEBYTECODE)
    # compiles every module it imports, and `mrsync push` starts 17 ms later.
    compileall.compile_dir(code, quiet=1)
    h = hashlib.sha256()
    for p in sorted([*(code / "mrsyncd").rglob("*.py"), *(code / "mrsyncd").rglob("*.c")]):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return code, h.hexdigest()[:16]


def versions() -> dict[str, Any]:
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
    }
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version}\n", "udpcast", "uftp", "iperf3", "python3-twisted"],
        capture_output=True,
        text=True,
    ).stdout
    info["packages"] = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    repo = HERE.parent
    git = subprocess.run(
        ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    info["mrsyncd_commit"] = git.stdout.strip()
    return info


def run_case(
    scenario: Scenario,
    case_index: int,
    tools: list[str],
    args: argparse.Namespace,
    workdir: Path,
    logdir: Path,
    sources: dict[Any, tuple[Path, str]],
) -> dict[str, Any]:
    case = scenario.cases[case_index]
    source, digest = make_source(workdir, case, sources)
    slowest = case.link_bps * (case.slow_factor if case.slow_nodes else 1)
    # A tree's files cost each tool some time of their own besides their bytes.
    timeout = args.timeout or (4 * case.size * 8 / slowest + 90 + case.files * TREE_FILE_TIMEOUT)
    doc: dict[str, Any] = {"case": asdict(case), "results": {}}
    print(
        f"\n== {scenario.name}: {case.label} ({case.nodes} nodes, {case.link_bps / 1e6:g} Mbit/s, "
        f"{case.size / MiB:g} MiB{f' in {case.files:,} files' if case.files else ''}, loss {case.loss:.1%}"
        f"{f', {case.slow_nodes} slow' if case.slow_nodes else ''}"
        f"{', TCP competitor' if case.tcp_competitor else ''})",
        flush=True,
    )
    logdir.mkdir(parents=True, exist_ok=True)
    lan = Lan(case.nodes, counters=True)
    competitor = None
    try:
        lan.shape_master(case.link_bps, case.queue_ms, case.burst)
        for node in lan.nodes[len(lan.nodes) - case.slow_nodes :]:
            lan.shape_node(node, case.link_bps * case.slow_factor)
        if case.loss:
            for node in lan.nodes:
                node.drop_udp(case.loss)
        if case.tcp_competitor:
            competitor = Competitor(lan, logdir, f"{scenario.name}{case_index}", case.tcp_cc)
            doc["tcp_congestion_control"] = competitor.congestion_control
            if not case.tcp_cc:  # the matrix's targets are in Mbit/s, not shares of this
                doc["tcp_alone_bps"] = competitor.alone()
                alone = f"{doc['tcp_alone_bps'] / 1e6:.1f} Mbit/s"
                print(f"   iperf3 alone (TCP {competitor.congestion_control}): {alone}", flush=True)
        for tool in tools:
            caselog = logdir / f"case{case_index}"
            caselog.mkdir(parents=True, exist_ok=True)
            profile = None
            if args.profile and tool.startswith("mrsyncd"):
                profile = caselog / f"{tool}-sender.pyspy.txt"
            ctx = Context(
                lan,
                case,
                source,
                digest,
                workdir / "run",
                caselog,
                args.rate_factor,
                timeout,
                profile,
                args.code,
            )
            runner = RUNNERS[tool](ctx)
            result = measure(runner, competitor)
            d = asdict(result)
            mrsyncd = tool.startswith("mrsyncd")
            doc["results"][tool] = d
            x = report.derived(asdict(case), d)
            eff = x.get("efficiency")
            print(
                f"   {tool:16} {'ok ' if result.ok else 'FAILED'} time {result.wall or 0:7.2f} s  "
                f"eff {eff * 100 if eff else 0:5.1f}%  sender CPU {result.sender.get('cpu', 0):6.2f} s  "
                f"recv CPU mean {x.get('recv_cpu_mean', 0):6.2f} s  feedback "
                f"{result.counters.get('feedback_bytes', 0):,} B  tbf drops {result.qdisc.get('drops', '-')}"
                f"  busy {result.machine_cpu.get('busy_share', 0):.0%}"
                f" others {result.machine_cpu.get('others', 0):.1f} s"
                f" steal {result.machine_cpu.get('steal', 0):.2f} s"
                f"{'  rate median ' + str(d['details'].get('rate_mbit_median')) if mrsyncd else ''}"
                f"{''.join(f'  {k} {v:.2f} s' for k, v in d['details'].get('phases', {}).items())}"
                f"{'  ' + result.error if result.error else ''}",
                flush=True,
            )
            again, changed = d["details"].get("again"), d["details"].get("changed_1pct")
            if again:
                print(f"   {'':16} the same push again: {report.push_text(again)}", flush=True)
            if changed:
                print(
                    f"   {'':16} {changed['files']} files changed ({changed['changed_bytes']:,} B): "
                    f"{report.push_text(changed)}",
                    flush=True,
                )
            if profile is not None:
                for who, path in (
                    ("sender", profile),
                    ("receiver", profile.with_name(f"{tool}-receiver.pyspy.txt")),
                ):
                    if path.exists():
                        d["details"][f"profile_{who}"] = str(path)
                        d["details"][f"profile_{who}_top"] = summarize_profile(path)
            time.sleep(1.0)
    finally:
        if competitor is not None:
            competitor.close()
        lan.close()
    return doc


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """From py-spy's raw collapsed stacks: the functions with the most samples, self and total."""
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith(("thread", "process")):
            frames = frames[1:]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for f in set(frames):
            total_counts[f] = total_counts.get(f, 0) + count

    def best(counts: dict[str, int], of: int) -> list[tuple[str, float]]:
        return [(f, round(c / of, 4)) for f, c in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]

    # Waiting in epoll (the reactor asleep) is not work: the "busy" view leaves it out.
    idle = sum(c for f, c in self_counts.items() if f.startswith(("EPollReactor.doPoll", "Condition.wait")))
    busy = {
        f: c for f, c in self_counts.items() if not f.startswith(("EPollReactor.doPoll", "Condition.wait"))
    }
    if not samples:
        return {}
    return {
        "samples": samples,
        "idle_share": round(idle / samples, 4),
        "self": best(self_counts, samples),
        "self_of_busy": best(busy, max(1, samples - idle)),
        "total": best(total_counts, samples),
    }


def summary_chart() -> Path | None:
    """One chart from the latest full-size result of every scenario (runs with --size are left out)."""
    latest: dict[str, tuple[int, str, Path]] = {}
    for p in sorted(RESULTS.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except ValueError:
            continue
        if (
            doc.get("size_override")
            or doc.get("files_override")
            or str(doc.get("machine", {}).get("code_from", "")).startswith("/tmp")
        ):
            continue
        key = (1, doc.get("started", ""), p)
        if doc["scenario"] not in latest or key[:2] > latest[doc["scenario"]][:2]:
            latest[doc["scenario"]] = key
    if not latest:
        return None
    docs = report.load(v[2] for _, v in sorted(latest.items()))
    return report.chart(
        docs, RESULTS / "summary.png", "mrsyncd vs udpcast vs UFTP: latest result of each scenario"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", "-s", action="append", default=[], help="scenario name (repeatable)")
    parser.add_argument("--all", action="store_true", help=f"run {', '.join(ISSUE_SCENARIOS)}")
    parser.add_argument("--list", action="store_true", help="list the scenarios and tools")
    parser.add_argument("--size", help="file size for every case instead of the scenario's (e.g. 50M)")
    parser.add_argument(
        "--files", type=int, help="files in every tree case instead of the scenario's (e.g. 500: a quick run)"
    )
    parser.add_argument(
        "--tools", help=f"comma-separated, from {', '.join(RUNNERS)} (default: the scenario's)"
    )
    parser.add_argument(
        "--case", type=int, action="append", help="run only this case of the scenario (0-based)"
    )
    parser.add_argument(
        "--rate-factor",
        type=float,
        default=0.98,
        help="share of the link each fixed-rate tool is told to send at, counted in Ethernet "
        "frames (default 0.98)",
    )
    parser.add_argument("--workdir", default="/dev/shm", help="where sources and copies go (default: tmpfs)")
    parser.add_argument("--timeout", type=float, help="seconds one tool may take in one case")
    parser.add_argument(
        "--code-from",
        default=str(HERE.parent),
        help="a tree holding the mrsyncd/ to measure (default: this repository's), e.g. a patched copy",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each scenario this many times and judge its targets by the median (default 1)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the mrsyncd sender and node1's receiver (pip install py-spy)",
    )
    args = parser.parse_args()

    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:6} {s.title}\n       target: {s.target}\n       tools: {', '.join(s.tools)}")
            for c in s.cases:
                print(f"       case: {c}")
        print("\ntools: " + ", ".join(f"{n} ({r.description})" for n, r in RUNNERS.items()))
        return 0
    names = list(ISSUE_SCENARIOS) if args.all else args.scenario
    if not names:
        parser.error("say --scenario NAME, --all or --list")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown}; try --list")
    if os.geteuid() != 0:
        parser.error("run as root (network namespaces, tc, iptables)")
    install_needs(Path(args.code_from))
    warm_memory()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    tools_override = args.tools.split(",") if args.tools else None
    for t in tools_override or []:
        if t not in RUNNERS:
            parser.error(f"unknown tool {t}; from {', '.join(RUNNERS)}")

    interrupt_on_signals()
    swept = sweep_dead_runs()
    if swept:
        print(f"swept {len(swept)} namespaces of dead runs")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(args.workdir) / f"mrbench-{os.getpid()}"
    workdir.mkdir(parents=True)
    sources: dict[Any, tuple[Path, str]] = {}
    args.code, args.code_digest = snapshot_code(workdir, Path(args.code_from))
    size = parse_size(args.size) if args.size else None
    if args.files is not None and args.files < 1:
        parser.error("--files must be at least 1")
    status = 0
    try:
        for name in names:
            scenario = SCENARIOS[name]
            if size:
                scenario = resized(scenario, size)
            if args.files:
                scenario = retreed(scenario, args.files)
            tools = tools_override or list(scenario.tools)
            if scenario.name == "E" and not tools_override:
                tools = [*tools, "uftp-tfmcc"]
            docs = []
            for run in range(args.repeat):
                tag = f"{name}-{size // MiB}MiB" if size else f"{name}-full"
                if args.files and any(c.files for c in scenario.cases):
                    tag = f"{name}-{args.files}files"
                if args.repeat > 1:
                    tag += f"-run{run + 1}"
                doc = run_scenario(scenario, tag, stamp, tools, args, workdir, sources, size)
                docs.append(doc)
                if not all(r.get("ok") for c in doc["cases"] for r in c["results"].values()):
                    status = 1
            if args.repeat > 1:
                lines = [f"### {scenario.name} over {args.repeat} runs: {scenario.title}", ""]
                for t in report.across(docs):
                    mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
                    lines.append(f"- target {t['target']}: **{mark}** by the median ({t['evidence']})")
                text = "\n".join(lines)
                print("\n" + text)
                (RESULTS / f"{name}-{stamp}-median.md").write_text(text + "\n")
        chart = summary_chart()
        print(f"\nresults in {RESULTS}" + (f"; summary chart {chart}" if chart else ""))
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e}): tearing down", file=sys.stderr)
        status = 130
    finally:
        with contextlib.suppress(Exception):
            shutil.rmtree(workdir)
    return status


def run_scenario(
    scenario: Scenario,
    tag: str,
    stamp: str,
    tools: list[str],
    args: argparse.Namespace,
    workdir: Path,
    sources: dict[Any, tuple[Path, str]],
    size: int | None,
) -> dict[str, Any]:
    """Every case of a scenario with every tool: written as JSON, a table and a chart."""
    logdir = RESULTS / f"{tag}-{stamp}-logs"
    doc: dict[str, Any] = {
        "scenario": scenario.name,
        "title": scenario.title,
        "target": scenario.target,
        "notes": scenario.notes,
        "size_override": size,
        "files_override": args.files,
        "rate_factor": args.rate_factor,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {**versions(), "mrsyncd_code_sha256": args.code_digest, "code_from": args.code_from},
        "tools": tools,
        "cases": [],
    }
    print(f"\n#### scenario {scenario.name}: {scenario.title}\n     target: {scenario.target}")
    out = RESULTS / f"{tag}-{stamp}.json"
    for i in range(len(scenario.cases)):
        if args.case and i not in args.case:
            continue
        doc["cases"].append(run_case(scenario, i, tools, args, workdir, logdir, sources))
        doc["targets"] = report.targets(doc)
        out.write_text(json.dumps(doc, indent=1))
    table = report.table(doc)
    if scenario.name == "fair":
        table += "\n\n" + report.fairness_table(doc)
        report.fairness_chart(doc, RESULTS / f"{tag}-{stamp}-matrix.png")
    lines = [f"### {scenario.name}: {scenario.title}", "", table, ""]
    for t in doc["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"- target {t['target']}: **{mark}** ({t['evidence']})")
    text = "\n".join(lines)
    print("\n" + text)
    (RESULTS / f"{tag}-{stamp}.md").write_text(text + "\n")
    report.chart([doc], RESULTS / f"{tag}-{stamp}.png", f"{scenario.name}: {scenario.title}")
    return doc


if __name__ == "__main__":
    sys.exit(main())
