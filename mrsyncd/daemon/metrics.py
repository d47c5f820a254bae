"""
The master's Prometheus endpoint (``[master] metrics = "ADDRESS:PORT"``,
off by default): ``GET /metrics``, rendered by prometheus_client.

Everything is read from the master's own state when scraped (a custom
collector, as prometheus_client advises for state kept elsewhere): the
job store's jobs by state, the fleet's nodes, the running transfers'
rates and bytes, and the job runner's totals of what finished jobs did
since the master started (`JobRunner.totals`).  That state belongs to
the reactor's thread, so the page is rendered there (`MetricsPage`), not by
prometheus_client's Twisted resource, which runs its WSGI app in the thread
pool.  prometheus_client is imported only here, so a master without
metrics does not need it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mrsyncd import logs
from mrsyncd.daemon import store

log = logs.logger(__name__)


class MasterCollector:
    """The master's state as metrics, at each scrape."""

    def __init__(self, master: Any) -> None:
        self.master = master

    def collect(self) -> Iterator[Metric]:
        master = self.master
        runner, fleet = master.runner, master.fleet
        totals = runner.totals

        jobs = GaugeMetricFamily("mrsyncd_jobs", "Jobs in the job store, by state.", labels=["state"])
        for state, count in master.jobs.count_by_state().items():
            jobs.add_metric([state], count)
        yield jobs

        finished = CounterMetricFamily(
            "mrsyncd_jobs_finished", "Jobs that ended since the master started, by result.", labels=["result"]
        )
        for state in store.FINISHED:
            finished.add_metric([state], totals["jobs", state])
        yield finished

        running = {job_id: t for job_id, t in runner.running.items() if t is not None}
        sent = CounterMetricFamily(
            "mrsyncd_sent_bytes",
            "Bytes multicast since the master started, repairs included: files' data, their"
            " parities, and manifests sent to the nodes by multicast.",
            labels=["kind"],
        )
        for kind, stat in (("data", "payload"), ("parity", "parity")):
            live = sum(t.sender.stats[stat] for t in running.values())
            sent.add_metric([kind], totals["sent", kind] + live)
        # A running job's manifest is counted once its delivery ends.
        sent.add_metric(
            ["manifest"], totals["sent", "manifest"] + sum(t.manifest_sent for t in running.values())
        )
        yield sent
        yield CounterMetricFamily(
            "mrsyncd_repaired_bytes",
            "File bytes of finished jobs sent again to repair what nodes lost.",
            value=totals["repaired",],
        )

        rate = GaugeMetricFamily(
            "mrsyncd_rate_bits_per_second", "The sending rate of each running job.", labels=["job"]
        )
        for job_id, transfer in running.items():
            rate.add_metric([str(job_id)], transfer.sender.pacer.rate_bps)
        yield rate

        nodes = GaugeMetricFamily(
            "mrsyncd_nodes",
            "Nodes the master expects (registered, not forgotten), by state.",
            labels=["state"],
        )
        up = GaugeMetricFamily("mrsyncd_node_up", "1 while a node is connected.", labels=["node"])
        contact = GaugeMetricFamily(
            "mrsyncd_node_last_contact_timestamp_seconds", "When a node was last heard from.", labels=["node"]
        )
        done = GaugeMetricFamily(
            "mrsyncd_node_last_done_timestamp_seconds",
            "When a node last completed a job (absent: never since it was first known).",
            labels=["node"],
        )
        states = {"connected": 0, "disconnected": 0}
        for node in fleet.nodes.values():
            connected = node.connection is not None
            states["connected" if connected else "disconnected"] += 1
            up.add_metric([node.name], 1 if connected else 0)
            contact.add_metric([node.name], node.last_contact)
            if node.last_ok_at is not None:
                done.add_metric([node.name], node.last_ok_at)
        for state, count in states.items():
            nodes.add_metric([state], count)
        yield nodes
        yield up
        yield contact
        yield done

        node_jobs = CounterMetricFamily(
            "mrsyncd_node_jobs",
            "Jobs that ended on each node since the master started, by result.",
            labels=["node", "result"],
        )
        for key, count in sorted(totals.items()):
            if key[0] == "node":
                node_jobs.add_metric([key[1], key[2]], count)
        yield node_jobs


class MetricsPage(Resource):
    """``/metrics``: the registry in the text format, collected in the reactor's thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class MetricsService(service.Service):
    """Serves ``/metrics`` on its endpoint; a port it cannot take stops the daemon, with the reason."""

    def __init__(self, reactor: Any, master: Any, address: str, port: int) -> None:
        self.reactor = reactor
        registry = CollectorRegistry()
        registry.register(MasterCollector(master))
        ProcessCollector(registry=registry)
        root = Resource()
        root.putChild(b"metrics", MetricsPage(registry))
        self.site = Site(root)
        self.site.noisy = False
        endpoint_type = endpoints.TCP6ServerEndpoint if ":" in address else endpoints.TCP4ServerEndpoint
        self.endpoint = endpoint_type(reactor, port, interface=address)
        self._port: Any = None

    def startService(self) -> None:
        super().startService()
        d = self.endpoint.listen(self.site)
        d.addCallbacks(self._listening, self._cannot_listen)

    def _listening(self, port: Any) -> None:
        self._port = port
        host = port.getHost()
        log.info("metrics on http://{host}:{port}/metrics", host=host.host, port=host.port)

    def _cannot_listen(self, failure: Failure) -> None:
        log.critical("cannot serve metrics: {why}", why=failure.getErrorMessage())
        self.reactor.stop()

    def stopService(self) -> defer.Deferred | None:  # type: ignore[override]
        super().stopService()
        if self._port is not None:
            return defer.maybeDeferred(self._port.stopListening)
        return None
