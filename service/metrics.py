"""Prometheus metrics at ``/metrics`` (text format, no token: scrape it from the private network; the values
carry no patient data — labels are job states, route templates, status codes and the device name).

* ``voxeldose_jobs{state}`` — jobs per state (read from the store at each scrape)
* ``voxeldose_queue_depth`` — queued jobs; ``voxeldose_jobs_running`` — running jobs
* ``voxeldose_job_duration_seconds{state}`` — histogram of finished jobs' run time (started → finished), observed
  at scrape time for jobs that finished since this process started
* ``voxeldose_worker_device_info{device}`` — 1 for the dose device the dispatcher reports; ``voxeldose_ray_up``
* ``voxeldose_http_requests_total{method,route,status}`` and ``voxeldose_http_request_duration_seconds{method,route}``
  — per route *template* (``/v1/jobs/{job_id}``), so no ids or patient ids end up in label values
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .store import NodeCounts, Store

# ASGI (spelled out here: the core does not import Starlette)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class DeviceReport(Protocol):
    """What the metrics ask the dispatcher (:class:`service.dispatcher.Dispatcher`)."""

    def device(self) -> str: ...

    def ray_ok(self) -> bool: ...


log = logging.getLogger("service.metrics")
access_log = logging.getLogger("service.access")

disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated; no *_created series: they double the output and nobody graphs them
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, float("inf"))


class _StoreCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        counts: dict[str, int] = {}
        try:
            counts = self.m.store.counts_by_state()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            log.warning("metrics: could not read job counts")
        g = GaugeMetricFamily("voxeldose_jobs", "Jobs by state", labels=["state"])
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            g.add_metric([state], counts.get(state, 0))
        yield g
        yield GaugeMetricFamily("voxeldose_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0))
        yield GaugeMetricFamily("voxeldose_jobs_running", "Jobs being computed", value=counts.get("running", 0))
        d = self.m.dispatcher
        device, ray_up = "none", 0.0
        if d is not None:
            try:
                device = str(d.device())
            except Exception:  # noqa: BLE001
                device = "unknown"
            try:
                ray_up = 1.0 if d.ray_ok() else 0.0
            except Exception:  # noqa: BLE001
                ray_up = 0.0
        info = GaugeMetricFamily("voxeldose_worker_device_info", "Dose device of the workers", labels=["device"])
        info.add_metric([device], 1.0)
        yield info
        yield GaugeMetricFamily("voxeldose_ray_up", "1 when the Ray cluster answers", value=ray_up)
        node: NodeCounts = {"instances": 0, "cycles": {}, "deliveries": {}}
        try:
            node = self.m.store.node_counts()
        except Exception:  # noqa: BLE001
            log.warning("metrics: could not read the DICOM node's counts")
        yield GaugeMetricFamily(
            "voxeldose_dicom_instances", "DICOM instances received (DICOM node, STOW-RS)", value=node["instances"]
        )
        c = GaugeMetricFamily(
            "voxeldose_dicom_cycles", "Therapy cycles seen by the trigger, by state", labels=["state"]
        )
        for state in ("waiting", "started", "error"):
            c.add_metric([state], node["cycles"].get(state, 0))
        yield c
        dl = GaugeMetricFamily(
            "voxeldose_deliveries", "Results sent to the PACS, by state (failed: gave up)", labels=["state"]
        )
        for state in ("pending", "sent", "failed"):
            dl.add_metric([state], node["deliveries"].get(state, 0))
        yield dl


class Metrics:
    """One registry per app (several apps in one test process do not collide)."""

    def __init__(self, store: Store, dispatcher: DeviceReport | None = None) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = datetime.now(UTC)
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.requests = Counter(
            "voxeldose_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "voxeldose_http_request_duration_seconds",
            "HTTP request duration",
            ["method", "route"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "voxeldose_job_duration_seconds",
            "Run time of finished jobs (start to end)",
            ["state"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(self))

    def observe_finished(self) -> None:
        """Observe the durations of jobs that finished since this process started (once each)."""
        with self._lock:
            for state in ("succeeded", "failed", "cancelled"):
                offset = 0
                while True:
                    try:
                        rows, _total = self.store.list_jobs(state=state, limit=200, offset=offset)
                    except Exception:  # noqa: BLE001
                        return
                    # newest first by creation: stop once a page holds only jobs created before we started
                    fresh = False
                    for r in rows:
                        if r.finished_at is None or r.finished_at < self.started:
                            continue
                        fresh = True
                        if r.id in self._seen or r.started_at is None:
                            continue
                        self._seen.add(r.id)
                        self.job_duration.labels(state).observe(
                            max(0.0, (r.finished_at - r.started_at).total_seconds())
                        )
                    offset += len(rows)
                    if not rows or (not fresh and rows[-1].created_at < self.started) or offset >= 5000:
                        break

    def record_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def exposition(self) -> bytes:
        self.observe_finished()
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Count requests by method, route template and status, and log one access line per request with the
    route template only (run uvicorn with ``access_log=False``: its lines carry the raw path) — pure ASGI."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            seconds = time.perf_counter() - t0
            self.metrics.record_request(scope.get("method", "?"), route, status, seconds)
            # the route template, never the path or query (they can hold patient ids)
            access_log.info("%s %s %d %.0f ms", scope.get("method", "?"), route, status, seconds * 1000)
