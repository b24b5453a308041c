"""The semantic cache: answers of similar questions, shared by every worker through Redis.

The Redis on these machines (7.0) has no vector search, so the work is split:

- Redis holds each entry, ``coalesce:cs:e:<scope>:<id>`` (the answer record, with its TTL),
  and one log stream, ``coalesce:cs:log``, with what an index needs of every stored entry
  (scope, id, vector as float16 bytes, guard features, expiry) and never the question's text.
- Each worker keeps an in-memory index per scope (:mod:`.vectors`). A daemon thread loads the
  log at start and then follows it with ``XREAD BLOCK`` on a connection of its own, so an entry
  stored by any worker becomes a candidate in every worker within milliseconds.

:meth:`SemanticCache.probe` never touches Redis (embed, search, guards); the caller fetches the
candidates' entries in one MGET with its exact key and calls :meth:`SemanticCache.forget` for
any that are gone (expired, evicted, cleared, or lost in a Redis restart).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .embed import Embedder
from .guards import Features, features, mismatch
from .vectors import Indexes, now_ms

log = logging.getLogger("coalesce.cache")

PREFIX = "coalesce:cs:"
ENTRY_PREFIX = PREFIX + "e:"
LOG_KEY = PREFIX + "log"

CANDIDATES = 4
BLOCK_MS = 5_000
LOAD_BATCH = 2_000
READ_BATCH = 1_000
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0


@dataclass(frozen=True)
class Candidate:
    """A cached question close enough, whose guards passed: its entry's Redis key."""

    entry: str
    similarity: float


@dataclass(frozen=True)
class Probe:
    """What a lookup found, and what :meth:`SemanticCache.store` needs to store this question."""

    vector: npt.NDArray[np.float32]
    features: Features
    candidates: tuple[Candidate, ...]
    # Guards that turned away a close neighbour (for stats: "semantic near miss, numbers").
    blocked: tuple[str, ...] = ()


def entry_key(scope: str, entry_id: str) -> str:
    return f"{ENTRY_PREFIX}{scope}:{entry_id}"


def check_scope(scope: str) -> None:
    if not scope or ":" in scope or any(c.isspace() for c in scope):
        raise ValueError("a semantic cache scope is a non-empty string without ':' or spaces")


class SemanticCache:
    """Guarded nearest-question lookups over entries every worker shares (see the module doc)."""

    def __init__(
        self, redis_url: str, embedder: Embedder, *, threshold: float, max_entries: int
    ) -> None:
        self.redis_url = redis_url
        self.embedder = embedder
        self.threshold = threshold
        self.max_entries = max_entries
        self._indexes = Indexes(max_entries)
        # Cache calls must be quick or fail: short timeouts, no client-side retries.
        self._redis = redis.Redis.from_url(
            redis_url,
            socket_timeout=2.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
        )
        self._follower_redis: redis.Redis | None = None
        self._last_id = "0-0"
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set once the existing log is loaded

    def __len__(self) -> int:
        return len(self._indexes)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the follower: it loads the existing log, then follows new entries.

        Returns at once; :attr:`ready` is set when the log is loaded (until then lookups only
        see entries stored since). A Redis outage delays that, it does not fail the start.
        """
        if self._thread is not None:
            return
        self._stopping.clear()
        self._follower_redis = redis.Redis.from_url(
            self.redis_url,
            socket_timeout=BLOCK_MS / 1000 + 5,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )
        self._thread = threading.Thread(
            target=self._follow, name="coalesce-semantic-follower", daemon=True
        )
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout)

    def stop(self) -> None:
        """Stop the follower (interrupting its blocked read) and close the connections."""
        self._stopping.set()
        follower = self._follower_redis
        thread = self._thread
        deadline = time.monotonic() + 5
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            # Closing the socket ends a blocked XREAD; repeat in case a read had not begun yet.
            if follower is not None:
                follower.connection_pool.disconnect(inuse_connections=True)
            thread.join(timeout=0.05)
        self._thread = None
        if follower is not None:
            follower.close()
            self._follower_redis = None
        self._redis.close()

    # -- lookups and writes ----------------------------------------------------------------

    def probe(self, scope: str, text: str) -> Probe:
        """Embed ``text`` and list the scope's close cached questions whose guards pass."""
        vector = self.embedder.embed([text])[0]
        wanted = features(text)
        hits = self._indexes.search(scope, vector, CANDIDATES, min_similarity=self.threshold)
        candidates: list[Candidate] = []
        blocked: list[str] = []
        for hit in hits:
            guard = mismatch(wanted, hit.features)
            if guard is None:
                candidates.append(Candidate(hit.key, hit.similarity))
            else:
                blocked.append(guard)
        return Probe(vector, wanted, tuple(candidates), tuple(blocked))

    def store(self, scope: str, probe: Probe, record: str, ttl_ms: int) -> None:
        """Store ``record`` as the answer to the probed question: one pipelined round trip.

        Raises ``redis.RedisError`` (``ConnectionError``, ``TimeoutError``, ...) when Redis
        fails, and ValueError on a malformed scope or TTL; nothing is indexed then.
        """
        check_scope(scope)
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        vector = np.asarray(probe.vector, dtype=np.float32)
        packed = vector.astype(np.float16).tobytes()
        dumped = probe.features.dump()
        digest = hashlib.blake2b(digest_size=12)
        for part in (self.embedder.name.encode(), packed, dumped.encode()):
            digest.update(part)
        key = entry_key(scope, digest.hexdigest())
        expires = now_ms() + ttl_ms
        fields: dict[Any, Any] = {
            "s": scope,
            "k": key,
            "v": packed,
            "f": dumped,
            "x": expires,
            "m": self.embedder.name,
        }
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(key, record, px=ttl_ms)
        pipe.xadd(LOG_KEY, fields, maxlen=self.max_entries, approximate=True)
        pipe.execute()
        self._indexes.add(scope, key, vector, probe.features, expires)

    def forget(self, entry: str) -> None:
        """``entry`` was gone from Redis: stop offering it."""
        self._indexes.remove(entry)

    # -- the follower ----------------------------------------------------------------------

    def _follow(self) -> None:
        delay = BACKOFF_MIN_S
        while not self._stopping.is_set():
            try:
                if not self.ready.is_set():
                    self._load()
                    self.ready.set()
                self._read()
                delay = BACKOFF_MIN_S
            except Exception as exc:  # the follower must outlive any one failure
                if self._stopping.is_set():
                    break  # stop() closed the socket under a blocked read
                # Say what failed, never what was stored.
                log.warning(
                    "semantic cache follower: %s; retrying in %.1f s", type(exc).__name__, delay
                )
                self._stopping.wait(delay)
                delay = min(BACKOFF_MAX_S, delay * 2)

    def _load(self) -> None:
        """Index every live entry the log holds, oldest first."""
        assert self._follower_redis is not None
        start = "-"
        while not self._stopping.is_set():
            batch: Any = self._follower_redis.xrange(LOG_KEY, min=start, max="+", count=LOAD_BATCH)
            for entry_id, fields in batch:
                self._apply(fields)
                self._last_id = entry_id.decode()
            if len(batch) < LOAD_BATCH:
                return
            start = "(" + self._last_id

    def _read(self) -> None:
        """One blocking read of new log entries (the only command the follower sends idle)."""
        assert self._follower_redis is not None
        reply: Any = self._follower_redis.xread(
            {LOG_KEY: self._last_id}, count=READ_BATCH, block=BLOCK_MS
        )
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._apply(fields)
                self._last_id = entry_id.decode()

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        """Index one log entry, unless expired, malformed or of another embedder's space."""
        try:
            if fields[b"m"].decode() != self.embedder.name:
                return
            expires = int(fields[b"x"])
            if expires <= now_ms():
                return
            vector = np.frombuffer(fields[b"v"], dtype=np.float16).astype(np.float32)
            scope = fields[b"s"].decode()
            key = fields[b"k"].decode()
            feats = Features.load(fields[b"f"].decode())
        except (KeyError, ValueError, UnicodeDecodeError):
            log.warning("semantic cache: skipped a malformed log entry")
            return
        if not key.startswith(ENTRY_PREFIX + scope + ":"):
            return
        self._indexes.add(scope, key, vector, feats, expires)
