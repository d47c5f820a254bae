"""
The benchmark's verdicts (bench/report.py): pure logic over a run's JSON,
so it is checked here with documents made by hand.
"""

from __future__ import annotations

from typing import Any

from bench import report

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
