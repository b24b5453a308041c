"""``coalesce metrics``: a Prometheus endpoint (prometheus-client's HTTP server) on ``/metrics``.

Run one anywhere that reaches the shared Redis: it reads every figure from Redis at scrape
time (see ``collector``), so it is correct with any number of worker processes, and it does
not need to run beside a worker.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, start_http_server
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer import Settings, get_settings
from worker.ledger.store import Ledger

from .collector import CoalesceCollector

log = logging.getLogger("coalesce.metrics")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
# A scrape must fail fast rather than hang on a Redis that stopped answering.
_SOCKET_TIMEOUT_S = 5.0


def scrape_client(url: str) -> redis.Redis:
    """No retries and short timeouts: a scrape that cannot read Redis says so at once."""
    return redis.Redis.from_url(
        url,
        socket_timeout=_SOCKET_TIMEOUT_S,
        socket_connect_timeout=2,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )


def make_registry(settings: Settings) -> CollectorRegistry:
    """A registry holding only coalesce's collector (nothing of the exporter process)."""
    client = scrape_client(settings.redis_url)
    ledger = Ledger(
        client,
        raw_ttl_s=settings.ledger_raw_ttl_s,
        rollup_ttl_s=settings.ledger_rollup_ttl_s,
        daily_ttl_s=settings.ledger_daily_ttl_s,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoalesceCollector(client, queue=settings.queue, ledger=ledger))
    return registry


def start_exporter(
    settings: Settings | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` from a daemon thread; ``port=0`` picks a free port.

    Returns the server (``server.server_port``; ``server.shutdown()`` stops it) and its thread.
    """
    registry = make_registry(settings or get_settings())
    return start_http_server(port, addr=host, registry=registry)


def serve_metrics(
    *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, settings: Settings | None = None
) -> None:
    """The body of ``coalesce metrics``: serve until interrupted."""
    server, thread = start_exporter(settings, host=host, port=port)
    log.info("coalesce metrics on http://%s:%d/metrics", host, server.server_port)
    print(f"serving Prometheus metrics on http://{host}:{server.server_port}/metrics", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
