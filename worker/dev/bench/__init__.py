"""Benchmarks that print figures (``coalesce bench …``); not part of the test run.

Each runs its baseline in the same invocation, against real processes: a private
redis-server, the fake upstream over HTTP and ``celery`` worker processes.
"""

from __future__ import annotations

from .latency import run_latency_bench
from .pipeline import run_pipeline_bench
from .scale import run_scale_bench

__all__ = ["run_latency_bench", "run_pipeline_bench", "run_scale_bench"]
