"""Logs and metrics: logging set-up with a request id on every line, and the
Prometheus registry the middleware, the search service and ``/metrics`` share.

Kept free of torch and colbert imports so that it loads fast anywhere.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from contextvars import ContextVar
from typing import TYPE_CHECKING, TextIO

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from app.store.stats import read_store_stats

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.settings import Settings

# -- logs -------------------------------------------------------------------

# The id of the request being handled ("-" outside a request). Set by the
# request middleware; asyncio tasks and asyncio.to_thread copy it.
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def build_log_handler(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """A handler in the configured format (``text`` or ``json``) that adds the request id."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.log_format == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                JSON_FIELDS,
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                # uvicorn adds an ANSI-coloured copy of its messages.
                reserved_attrs=[*RESERVED_ATTRS, "color_message"],
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    return handler


_OWN_HANDLER = "_colbert_server_handler"


def configure_logging(settings: Settings) -> None:
    """Root logging for the server. Idempotent: a second app in the same
    process (tests) replaces the handler rather than adding one."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OWN_HANDLER, False):
            root.removeHandler(handler)
    handler = build_log_handler(settings)
    setattr(handler, _OWN_HANDLER, True)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # uvicorn's own lines (start-up, errors) go through the same handler and
    # format; its access log is replaced by ours, which names the route
    # template and carries the request id.
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True


# -- metrics ----------------------------------------------------------------

# Search latencies from milliseconds (small exact collections) to seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineMetrics:
    """What the search service records. Without a registry the metrics still
    count but are exported nowhere (the CLI, tests of the service alone)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.search_seconds = Histogram(
            "colbert_search_duration_seconds",
            "Search latency in the service (encode, score, join), by mode",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.query_encode_seconds = Histogram(
            "colbert_query_encode_duration_seconds",
            "Time to encode one query with the ColBERT model",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.answer_seconds = Histogram(
            "colbert_answer_duration_seconds",
            "Answer latency by stage (retrieve, generate, check, total)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.answers = Counter(
            "colbert_answers",
            "Answers by hallucination label (supported, unsupported, refused, empty)",
            ["label"],
            registry=registry,
        )


class Metrics:
    """One registry per app: HTTP, engine and server-state metrics."""

    def __init__(self, app: FastAPI | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "colbert_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "colbert_http_request_duration_seconds",
            "HTTP request latency by method, route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.overloaded = Counter(
            "colbert_http_overloaded",
            "Requests refused with 503 because their kind of route had its bound of requests in progress",
            ["kind"],
            registry=self.registry,
        )
        self.engine = EngineMetrics(self.registry)
        self.server = ServerCollector(app)
        self.registry.register(self.server)

    def render(self) -> bytes:
        """The Prometheus text exposition. Blocking (reads SQLite): call it in a thread.

        With ``PROMETHEUS_MULTIPROC_DIR`` set (several uvicorn workers),
        prometheus-client writes counters and histograms of every process to
        files there; this sums them, and adds this process's server state."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self.server)
            return generate_latest(registry)
        return generate_latest(self.registry)


class ServerCollector:
    """Gauges read at scrape time: index sizes and queues from the store (the
    same in every process), model and writer state of this process."""

    def __init__(self, app: FastAPI | None):
        self.app = app

    def describe(self):
        return []  # nothing to check at registration; the names are fixed

    def collect(self):
        state = getattr(self.app, "state", None)
        service = getattr(state, "service", None)
        settings = getattr(state, "settings", None)
        up = GaugeMetricFamily("colbert_models_loaded", "1 once the models are loaded in this process")
        up.add_metric([], float(bool(service and service.ready)))
        yield up
        writer = service.writer_state() if service is not None else None
        role = GaugeMetricFamily(
            "colbert_index_writer", "Index writer state of this process (1 = true)", labels=["state"]
        )
        role.add_metric(["lease_held"], float(bool(writer and writer.role == "writer")))
        role.add_metric(["thread_alive"], float(bool(writer and writer.alive)))
        role.add_metric(["busy"], float(bool(writer and writer.busy)))
        role.add_metric(["last_step_failed"], float(bool(writer and writer.last_error)))
        role.add_metric(["degraded"], float(bool(writer and writer.degraded)))
        role.add_metric(["stalled"], float(bool(writer and writer.stalled_s)))
        yield role
        failed = CounterMetricFamily(
            "colbert_index_documents_failed",
            "Documents marked failed by this process's writer since it started, each isolated from its batch",
        )
        failed.add_metric([], float(writer.documents_failed if writer else 0))
        yield failed
        if settings is None:
            return
        try:
            stats = read_store_stats(settings.database_path)
        except sqlite3.Error:
            logging.getLogger("app.metrics").warning("could not read the store for /metrics", exc_info=True)
            return
        labels = ["collection"]
        families = {
            "generation": GaugeMetricFamily(
                "colbert_collection_generation", "Committed index generation", labels=labels
            ),
            "documents": GaugeMetricFamily("colbert_collection_documents", "Live documents", labels=labels),
            "passages": GaugeMetricFamily(
                "colbert_collection_passages", "Passages (chunks) of live documents in the index", labels=labels
            ),
            "pending_documents": GaugeMetricFamily(
                "colbert_collection_pending_documents", "Documents waiting for the index writer", labels=labels
            ),
            "pending_chunks": GaugeMetricFamily(
                "colbert_collection_pending_chunks", "Chunks waiting for the index writer", labels=labels
            ),
        }
        # (The stateless tier's collections live in Qdrant: its local rows
        # only hold upload jobs, and would read as empty collections.)
        for collection in [] if settings.stateless else stats.collections:
            for key, family in families.items():
                family.add_metric([collection.name], float(getattr(collection, key)))
        yield from families.values()
        queued = GaugeMetricFamily("colbert_job_files_queued", "Uploaded files waiting for text extraction")
        queued.add_metric([], float(stats.queued_files))
        yield queued
        jobs = GaugeMetricFamily("colbert_jobs", "Upload jobs by state", labels=["state"])
        for job_state, count in stats.jobs.items():
            jobs.add_metric([job_state], float(count))
        yield jobs
