"""``coalesce api``: uvicorn serving the app, one event loop per worker process."""

from __future__ import annotations

import uvicorn

from .._settings import load_settings
from .keys import load_keys

APP = "producer.api.app:create_app"


def serve(host: str, port: int, workers: int = 1, log_level: str = "info") -> None:
    """Check the settings and keys (ConfigError before any process starts), then serve."""
    load_keys(load_settings())
    uvicorn.run(
        APP,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        backlog=4096,
        timeout_graceful_shutdown=30,
    )
