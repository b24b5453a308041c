"""``coalesce api``: an OpenAI-compatible HTTP server that enqueues through AsyncClient.

Apps point their OpenAI base URL here and change nothing else. See ``app.create_app`` for
the application and ``server.serve`` for the process.
"""

from __future__ import annotations

from .app import create_app
from .server import serve

__all__ = ["create_app", "serve"]
