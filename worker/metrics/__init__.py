"""Prometheus metrics, read from the shared Redis at scrape time (any number of workers).

Modules: ``encode`` (histogram and status fields in the stats hash: ``observe_batch``,
``observe_status``), ``collector`` (the custom collector and the list of metrics),
``exporter`` (``coalesce metrics``: ``serve_metrics``, ``start_exporter``).
"""

from __future__ import annotations

from .collector import CoalesceCollector
from .encode import observe_batch, observe_status, status_label
from .exporter import DEFAULT_PORT, make_registry, serve_metrics, start_exporter

__all__ = [
    "DEFAULT_PORT",
    "CoalesceCollector",
    "make_registry",
    "observe_batch",
    "observe_status",
    "serve_metrics",
    "start_exporter",
    "status_label",
]
