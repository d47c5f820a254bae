"""
The master's Prometheus endpoint: the collector on a master's real state,
then a real master scraped over HTTP during and after a push.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from mrsyncd.daemon.config import MasterConfig
from mrsyncd.daemon.master import MasterService, NodeState
from mrsyncd.daemon.metrics import MasterCollector
from mrsyncd.testing.cluster import Cluster, free_tcp_port, random_file

prometheus_client = pytest.importorskip("prometheus_client")


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` to value, from the text exposition format."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def test_the_collector_reads_the_store_the_fleet_and_the_totals(tmp_path: Path) -> None:
    master = MasterService(MemoryReactorClock(), MasterConfig(state_dir=str(tmp_path)), lambda: None)
    try:
        queued = master.jobs.add({"sources": ["/a"]}, "op")
        done = master.jobs.add({"sources": ["/b"]}, "op")
        master.runner._finish(done, "done")
        master.fleet.nodes["n1"] = NodeState("n1", connection=object(), last_contact=1700000000.0)  # type: ignore[arg-type]
        master.fleet.nodes["n2"] = NodeState("n2", last_contact=1600000000.0, last_ok_at=1500000000.0)
        master.runner.totals["node", "n1", "done"] += 1
        master.runner.totals["node", "n2", "failed"] += 2
        master.runner.totals["sent", "data"] += 1234
        master.runner.totals["sent", "manifest"] += 99
        master.runner.totals["repaired",] += 34
        registry = prometheus_client.CollectorRegistry()
        registry.register(MasterCollector(master))
        got = samples(prometheus_client.generate_latest(registry).decode())
    finally:
        master.jobs.close()
    assert queued
    assert got['mrsyncd_jobs{state="queued"}'] == 1 and got['mrsyncd_jobs{state="done"}'] == 1
    assert got['mrsyncd_jobs{state="failed"}'] == 0
    assert got['mrsyncd_jobs_finished_total{result="done"}'] == 1
    assert got['mrsyncd_jobs_finished_total{result="cancelled"}'] == 0
    assert got['mrsyncd_nodes{state="connected"}'] == 1 and got['mrsyncd_nodes{state="disconnected"}'] == 1
    assert got['mrsyncd_node_up{node="n1"}'] == 1 and got['mrsyncd_node_up{node="n2"}'] == 0
    assert got['mrsyncd_node_last_contact_timestamp_seconds{node="n2"}'] == 1600000000.0
    assert got['mrsyncd_node_last_done_timestamp_seconds{node="n2"}'] == 1500000000.0
    assert 'mrsyncd_node_last_done_timestamp_seconds{node="n1"}' not in got
    assert got['mrsyncd_node_jobs_total{node="n2",result="failed"}'] == 2
    assert got['mrsyncd_sent_bytes_total{kind="data"}'] == 1234
    assert got['mrsyncd_sent_bytes_total{kind="manifest"}'] == 99
    assert got["mrsyncd_repaired_bytes_total"] == 34


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(response.read().decode())


def test_a_master_scraped_during_and_after_a_push(tmp_path: Path) -> None:
    metrics_port = free_tcp_port()
    c = Cluster(tmp_path, metrics=f"127.0.0.1:{metrics_port}")
    try:
        c.start_master()
        c.master.wait_log(rf"metrics on http://127.0.0.1:{metrics_port}/metrics", 10)
        c.add_node("node1")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = scrape(url)
        assert before['mrsyncd_node_up{node="node1"}'] == 1
        assert before['mrsyncd_jobs_finished_total{result="done"}'] == 0
        assert "process_resident_memory_bytes" in before

        size = 6 << 20
        random_file(tmp_path / "src" / "f.bin", size, 7)
        push = c.cli_popen("push", "--rate", "16M", f"{tmp_path / 'src'}/", f"all:{c.shared / 'dst'}")
        # The job runs once it is scanned; it has a rate once it sends.
        during: dict[str, float] = {}
        rates: list[float] = []
        deadline = time.monotonic() + 30
        while push.poll() is None and time.monotonic() < deadline and not rates:
            during = scrape(url)
            rates = [v for k, v in during.items() if k.startswith("mrsyncd_rate_bits_per_second{")]
            time.sleep(0.05)
        assert during.get('mrsyncd_jobs{state="running"}') == 1, during
        assert len(rates) == 1 and 0 < rates[0] <= 16e6, rates
        out, err = push.communicate(timeout=60)
        assert push.returncode == 0, f"{out}\n{err}"

        after = scrape(url)
        assert after['mrsyncd_jobs_finished_total{result="done"}'] == 1
        assert after['mrsyncd_jobs{state="done"}'] == 1 and after['mrsyncd_jobs{state="running"}'] == 0
        assert after['mrsyncd_node_jobs_total{node="node1",result="done"}'] == 1
        assert size <= after['mrsyncd_sent_bytes_total{kind="data"}'] <= size * 5 // 4
        assert not any(k.startswith("mrsyncd_rate_bits_per_second{") for k in after)
        assert re.search(r"job \d+ on node1: done", c.master.log())
    finally:
        c.close()
