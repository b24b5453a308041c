"""Caches looked up before a request enters a window: exact (Redis) and semantic (guarded)."""
