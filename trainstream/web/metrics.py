"""
The server's own counters for Prometheus, at ``GET /metrics``.

Each server has its own ``CollectorRegistry`` (never the process-wide
default one), so two servers in one process, or a training script that uses
``prometheus_client`` itself, never mix their numbers. Values are read from
the backend (its hub, runs, clients and ``status()``) when scraped; nothing
on the event path counts for Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from trainstream._version import __version__
from trainstream.web.backend import Backend


class ServerCollector(Collector):
    """Reads one server's numbers at scrape time."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Metric]:
        backend = self.backend
        status = backend.status()
        hub = backend.hub
        info = GaugeMetricFamily(
            "trainstream_info", "trainstream version and history epoch", labels=["version", "epoch"]
        )
        info.add_metric([__version__, hub.store.epoch], 1)
        yield info
        yield CounterMetricFamily(
            "trainstream_events_accepted",
            "Events accepted since the server was created (publishers and the server's own)",
            value=hub.accepted_total,
        )
        yield GaugeMetricFamily(
            "trainstream_last_event_id", "Id of the newest event", value=hub.last_id
        )
        yield GaugeMetricFamily(
            "trainstream_oldest_event_id",
            "Events from this id on are still held (older ones were trimmed)",
            value=hub.store.oldest_id,
        )
        store = hub.store.health()
        yield GaugeMetricFamily(
            "trainstream_store_degraded",
            "1 while the history is in trouble (GET /api/health says why), else 0",
            value=1 if store.problems else 0,
        )
        yield GaugeMetricFamily(
            "trainstream_degraded",
            "1 while GET /api/health answers 503 degraded (the store or the server), else 0",
            value=1 if store.problems or status.problems else 0,
        )
        yield CounterMetricFamily(
            "trainstream_store_writer_restarts",
            "Times the history's writer process was started again after it died",
            value=store.writer_restarts,
        )
        yield CounterMetricFamily(
            "trainstream_store_events_lost",
            "Accepted events the history could not store at all",
            value=store.events_lost,
        )
        clients = GaugeMetricFamily(
            "trainstream_clients", "Open streaming clients by kind", labels=["kind"]
        )
        for kind, count in sorted(backend.clients.counts().items()):
            clients.add_metric([kind], count)
        yield clients
        yield GaugeMetricFamily(
            "trainstream_subscribers", "Live subscriptions on the hub", value=hub.subscriber_count
        )
        yield CounterMetricFamily(
            "trainstream_coalesced_events",
            "Metric events folded into a newer value for a slow client",
            value=hub.coalesced_total,
        )
        yield CounterMetricFamily(
            "trainstream_client_overflows",
            "Clients disconnected for reading too slowly",
            value=hub.overflows,
        )
        runs = backend.runs
        yield GaugeMetricFamily("trainstream_runs", "Runs the server knows", value=len(runs))
        by_state = GaugeMetricFamily(
            "trainstream_runs_by_state", "Runs the server knows, by state", labels=["state"]
        )
        for state, count in runs.count_by_state().items():
            by_state.add_metric([state], count)
        yield by_state
        yield CounterMetricFamily(
            "trainstream_stalls",
            "Times a run was marked stalled by the server",
            value=runs.stalls_total,
        )
        yield CounterMetricFamily(
            "trainstream_nan_alerts",
            "NaN/Infinity alerts the server published",
            value=runs.nan_alerts_total,
        )
        yield GaugeMetricFamily(
            "trainstream_uptime_seconds",
            "Seconds since the listeners were last bound",
            value=status.uptime_s,
        )
        yield GaugeMetricFamily(
            "trainstream_config_version",
            "Counts the config file's successful reloads (1 at start)",
            value=status.config_version,
        )
        lag = status.lag
        if lag is not None:
            yield HistogramMetricFamily(
                "trainstream_reactor_lag_seconds",
                "How late the reactor ran a call scheduled every 0.25 s (event-loop lag)",
                buckets=[(repr(b), n) for b, n in lag.buckets] + [("+Inf", lag.count)],
                sum_value=lag.sum_s,
            )
            yield GaugeMetricFamily(
                "trainstream_reactor_lag_max_seconds",
                f"The largest reactor lag of the last {lag.window_s:g} s",
                value=lag.max_s,
            )
            yield GaugeMetricFamily(
                "trainstream_reactor_lag_warn_seconds",
                "Reactor lag past which /api/health is degraded (--lag-warn)",
                value=lag.warn_s,
            )


class MetricsResource(Resource):
    """``GET /metrics``: Prometheus text format, from the server's own registry."""

    isLeaf = True

    def __init__(self, backend: Backend) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.registry.register(ServerCollector(backend))

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self.registry)


__all__ = ["MetricsResource", "ServerCollector"]
