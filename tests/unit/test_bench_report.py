"""
The benchmark's verdicts (bench/report.py): pure logic over a run's JSON,
so it is checked here with documents made by hand.
"""

from __future__ import annotations

from typing import Any

from bench import report
from bench.runners import in_frames, phases

MiB = 1 << 20


def d_run(one: float, many: float) -> dict[str, Any]:
    """Scenario D as the benchmark writes it: 1 node, then 24, at 50 Mbit/s."""

    def case(nodes: int, wall: float) -> dict[str, Any]:
        return {
            "case": {"nodes": nodes, "size": 100 * MiB, "link_bps": 50e6},
            "results": {"mrsyncd": {"ok": True, "wall": wall}},
        }

    return {"scenario": "D", "cases": [case(1, one), case(24, many)]}


def test_a_target_carries_its_figure_and_rule():
    [target] = report.targets(d_run(18.0, 21.6))
    assert target["value"] == 21.6 / 18.0 and (target["rule"], target["limit"]) == ("<=", 1.15)
    assert target["met"] is False
    assert report.targets(d_run(18.0, 20.0))[0]["met"] is True


def test_a_peer_that_never_finished_is_beaten():
    run = {
        "scenario": "C",
        "cases": [
            {
                "case": {"nodes": 3, "size": 1 << 30, "link_bps": 1e9},
                "results": {"mrsyncd": {"ok": True, "wall": 20.0}, "udpcast": {"ok": False, "wall": None}},
            }
        ],
    }
    [target] = report.targets(run)
    assert target["value"] == 0.0 and target["met"] is True


def test_repeated_runs_are_judged_by_the_median():
    # Ratios 1.20, 1.10, 1.14, 1.16, 1.12: two single runs miss, the median (1.14) meets.
    runs = [d_run(18.0, 18.0 * r) for r in (1.20, 1.10, 1.14, 1.16, 1.12)]
    [target] = report.across(runs)
    assert abs(target["value"] - 1.14) < 1e-9 and target["met"] is True
    assert "of 5 runs" in target["evidence"] and "met in 3 of 5" in target["evidence"]
    # A median over the line misses, whatever the best run did.
    [target] = report.across([d_run(18.0, 18.0 * r) for r in (1.05, 1.18, 1.20)])
    assert abs(target["value"] - 1.18) < 1e-9 and target["met"] is False


def test_an_even_number_of_runs_takes_the_mean_of_the_middle_two():
    [target] = report.across([d_run(18.0, 18.0 * r) for r in (1.10, 1.12, 1.18, 1.30)])
    assert abs(target["value"] - 1.15) < 1e-9 and target["met"] is True


def test_a_run_that_failed_does_not_count_as_a_figure():
    failed = d_run(18.0, 20.0)
    failed["cases"][1]["results"]["mrsyncd"] = {"ok": False, "wall": None}
    [target] = report.across([failed, d_run(18.0, 19.8), d_run(18.0, 21.0)])
    assert abs(target["value"] - (19.8 + 21.0) / 2 / 18.0) < 1e-9
    assert "of 3 runs" in target["evidence"] and "met in 1 of 3" in target["evidence"]
    [target] = report.across([failed])
    assert target["value"] is None and target["met"] is None


def t_run(wall: float, uftp_wall: float, again_s: float, sent: int, changed: int) -> dict[str, Any]:
    """Scenario T as the benchmark writes it: a tree of 100 MB to 8 nodes, pushed three times by mrsyncd."""
    details = {
        "again": {"seconds": again_s, "rc": 0, "sent_bytes": 0},
        "again_s": again_s,
        "changed_1pct": {
            "seconds": 1.0,
            "rc": 0,
            "sent_bytes": sent,
            "files": 100,
            "changed_bytes": changed,
            "verified": {f"node{i}": True for i in range(1, 9)},
        },
    }
    return {
        "scenario": "T",
        "cases": [
            {
                "case": {
                    "label": "8 nodes",
                    "nodes": 8,
                    "size": 100_000_000,
                    "link_bps": 100e6,
                    "files": 10_000,
                },
                "results": {
                    "mrsyncd": {"ok": True, "wall": wall, "details": details},
                    "uftp": {"ok": True, "wall": uftp_wall},
                },
            }
        ],
    }


def test_a_tree_is_judged_by_its_bound_its_peer_and_its_later_pushes():
    # The bound is 8 s: 100 MB at 100 Mbit/s.
    verdicts = {t["target"]: t for t in report.targets(t_run(11.0, 30.0, 1.2, 1_100_000, 1_000_000))}
    assert verdicts["mrsyncd within 1.5 x the link's bound"]["value"] == 11.0 / 8.0
    assert verdicts["mrsyncd faster than uftp"]["met"] is True
    assert verdicts["the same push again, nothing changed, ends in < 1.5 s"]["value"] == 1.2
    changed = verdicts["with 1% of the files changed, it sends <= 1.25 x their bytes"]
    assert changed["value"] == 1.1 and changed["met"] is True
    assert all(t["met"] for t in verdicts.values())
    verdicts = {t["target"]: t for t in report.targets(t_run(13.0, 12.0, 1.6, 2_000_000, 1_000_000))}
    assert not any(t["met"] for t in verdicts.values())


def test_a_changed_tree_the_nodes_do_not_hold_is_not_a_figure():
    run = t_run(11.0, 30.0, 1.2, 1_100_000, 1_000_000)
    run["cases"][0]["results"]["mrsyncd"]["details"]["changed_1pct"]["verified"]["node3"] = False
    [changed] = [t for t in report.targets(run) if t["target"].startswith("with 1%")]
    assert changed["value"] is None and changed["met"] is None


def test_many_tiny_files_are_judged_by_the_copies_and_the_memory():
    def run(verified: int, node_mib: int, master_mib: int) -> dict[str, Any]:
        mrsyncd = {
            "ok": verified == 4,
            "wall": 60.0,
            "verified": {f"node{i}": i <= verified for i in range(1, 5)},
            "sender": {"cpu": 30.0, "hwm_bytes": master_mib * MiB},
            "receivers": [{"cpu": 20.0, "hwm_bytes": node_mib * MiB} for _ in range(4)],
        }
        case = {"label": "4 nodes", "nodes": 4, "size": 5_000_000, "link_bps": 100e6, "files": 100_000}
        return {"scenario": "T100k", "cases": [{"case": case, "results": {"mrsyncd": mrsyncd}}]}

    assert [t["met"] for t in report.targets(run(4, 200, 400))] == [True, True, True]
    copies, node, master = report.targets(run(3, 300, 600))
    assert copies["value"] == 0.75 and "3/4 nodes" in copies["evidence"]
    assert (node["met"], node["value"], master["met"]) == (False, 300, False)


def test_the_table_of_a_tree_shows_its_later_pushes():
    text = report.table(t_run(11.0, 30.0, 1.2, 1_100_000, 1_000_000))
    assert "the same push again: 1.20 s, 0 B sent" in text
    assert "100 files changed (1,000,000 B), pushed: 1.00 s, 1,100,000 B sent (1.10 x" in text


def test_the_master_s_bytes_are_scaled_to_the_frames_its_bucket_sent():
    """A batch the tbf passes whole counts one set of headers in /proc/net/dev; the tbf counts every frame."""
    counted = [(0.1 * i, 97_600 * i) for i in range(101)]  # 97.6% of 100,000 frame bytes each 0.1 s
    scaled = in_frames(counted, 100_000 * 100)
    assert scaled[-1] == (counted[-1][0], 100_000 * 100)
    assert phases(scaled, 10.0)["steady_wire_bps"] == 8_000_000
    assert in_frames(counted, None) == counted  # no tbf on the master's link: as counted
