"""Prometheus metrics of one app, in a registry of its own (several apps in one process never share counters)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mmrag_http_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("mmrag_http_request_duration_seconds", "HTTP request latency by route (until the "
                                 "response ends, streams included)", ["route", "method"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ingested = Counter("mmrag_ingest_documents_total", "Documents by ingest outcome",
                                ["outcome"], registry=r)
        self.ingested_chunks = Counter("mmrag_ingest_chunks_total", "Chunks written by ingests", ["modality"],
                                       registry=r)
        self.generations = Counter("mmrag_generations_total", "Generations by outcome", ["outcome"], registry=r)
        self.generated_tokens = Counter("mmrag_generated_tokens_total", "Tokens generated", registry=r)
        self.generations_running = Gauge("mmrag_generations_admitted", "Generations running or queued", registry=r)
        self.searches = Counter("mmrag_searches_total", "Searches by grounded outcome", ["grounded"], registry=r)
        self.store_repairs = Counter("mmrag_store_repairs_total", "Acknowledged-to-be writes that the read-back "
                                     "found missing in Milvus and wrote again, by kind", ["kind"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every request and times it until its response ends, labelled by the route template (not the raw
    path, so ids never become label values)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def tracking_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(label, method, str(status)).inc()
            self.metrics.latency.labels(label, method).observe(time.perf_counter() - started)
