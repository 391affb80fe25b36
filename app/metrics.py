"""Prometheus metrics: HTTP requests (middleware), and job state read at scrape time.

Workers run on other machines, so job counts, stage durations and queue depth are read
from the database and the broker when ``/metrics`` is scraped, not kept in process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.models import JobStatus
from app.queue import JobQueue

log = logging.getLogger(__name__)


class StateCollector(Collector):
    def __init__(self, engine: Engine, queue: JobQueue) -> None:
        self.engine = engine
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily | SummaryMetricFamily]:
        jobs = GaugeMetricFamily("cnc_jobs", "Jobs by status", labels=["status"])
        stages = SummaryMetricFamily(
            "cnc_stage_duration_seconds", "Stage wall time of finished jobs", labels=["stage"]
        )
        try:
            with self.engine.connect() as conn:
                counts: dict[str, int] = dict(
                    conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all()
                )
                rows = conn.execute(
                    text(
                        "SELECT t.key, count(*), sum(t.value::float) FROM jobs, "
                        "jsonb_each_text(jobs.timings) AS t "
                        "WHERE jobs.status = 'succeeded' AND jsonb_typeof(jobs.timings) = 'object' "
                        "AND t.value ~ '^[0-9.eE+-]+$' GROUP BY t.key"
                    )
                ).all()
            for status in JobStatus:
                jobs.add_metric([status.value], float(counts.get(status.value, 0)))
            for key, count, total in rows:
                stages.add_metric([key], count_value=count, sum_value=total)
        except Exception:  # noqa: BLE001 - a scrape must not fail on a DB hiccup
            log.warning("metrics: database unavailable", exc_info=True)
        yield jobs
        yield stages
        depth = GaugeMetricFamily(
            "cnc_queue_depth", "Tasks waiting in the broker", labels=["queue"]
        )
        try:
            for name, value in self.queue.depth().items():
                depth.add_metric([name], float(value))
        except Exception:  # noqa: BLE001
            log.warning("metrics: broker unavailable", exc_info=True)
        yield depth


class Metrics:
    """A registry per app, so tests can build many apps in one process."""

    def __init__(self, engine: Engine, queue: JobQueue) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cnc_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cnc_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
            registry=self.registry,
        )
        self.registry.register(StateCollector(engine, queue))


class MetricsMiddleware:
    """Counts requests by route template (not raw path, which would explode labels).

    Plain ASGI rather than BaseHTTPMiddleware, which would buffer streamed responses."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope.get("method", "GET")
            self.metrics.requests.labels(method, path, str(status)).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)
