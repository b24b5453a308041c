"""The in-memory nearest-neighbour index of one scope, and the set of them a worker keeps.

A scope's index starts as a plain numpy matrix (exact, and fastest while small) and moves to a
usearch HNSW graph once it outgrows ``BRUTE_MAX`` entries: brute force over 100k x 384 floats
takes about 7 ms on two cores, the graph well under one. Entries carry their expiry, and a
search skips expired ones, so a stale vector never yields a candidate even before it is swept.

Not thread-safe by itself: :class:`Indexes` takes one lock around every call.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .guards import Features

BRUTE_MAX = 4096
HNSW_CONNECTIVITY = 16
HNSW_EXPANSION_ADD = 48
HNSW_EXPANSION_SEARCH = 64

Vector = npt.NDArray[np.float32]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Hit:
    """One neighbour: the entry's Redis key, its cosine similarity and its guard features."""

    key: str
    similarity: float
    features: Features


@dataclass
class _Entry:
    label: int
    features: Features
    expires_ms: int


class ScopeIndex:
    """The vectors of one scope: exact search while small, HNSW (usearch) beyond that."""

    def __init__(self, dim: int, *, brute_max: int = BRUTE_MAX) -> None:
        self.dim = dim
        self.brute_max = brute_max
        self._entries: dict[str, _Entry] = {}
        self._keys: dict[int, str] = {}
        self._next_label = 0
        # Brute-force storage: rows 0..n-1 of _matrix, _row_labels maps row -> label.
        self._matrix = np.zeros((16, dim), dtype=np.float32)
        self._row_labels: list[int] = []
        self._rows: dict[int, int] = {}
        self._hnsw: Any = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def uses_hnsw(self) -> bool:
        return self._hnsw is not None

    def add(self, key: str, vector: Vector, features: Features, expires_ms: int) -> None:
        """Add or replace ``key``."""
        if key in self._entries:
            self.remove(key)
        label = self._next_label
        self._next_label += 1
        self._entries[key] = _Entry(label, features, expires_ms)
        self._keys[label] = key
        vector = np.asarray(vector, dtype=np.float32).reshape(self.dim)
        if self._hnsw is not None:
            self._hnsw.add(label, vector)
            return
        self._append_row(label, vector)
        if len(self._row_labels) > self.brute_max:
            self._to_hnsw()

    def remove(self, key: str) -> bool:
        """Drop ``key``; False if it was not there."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        del self._keys[entry.label]
        if self._hnsw is not None:
            self._hnsw.remove(entry.label)
        else:
            self._drop_row(entry.label)
        return True

    def expires_ms(self, key: str) -> int | None:
        entry = self._entries.get(key)
        return entry.expires_ms if entry else None

    def search(self, vector: Vector, k: int, *, min_similarity: float, at_ms: int) -> list[Hit]:
        """Up to ``k`` live entries at least ``min_similarity`` close, nearest first."""
        if not self._entries:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(self.dim)
        # Ask for a few more than k: expired entries are skipped, not returned.
        labels, sims = self._nearest(query, min(len(self._entries), k + 4))
        hits: list[Hit] = []
        for label, sim in zip(labels, sims, strict=True):
            if sim < min_similarity:
                break
            key = self._keys.get(int(label))
            if key is None:
                continue
            entry = self._entries[key]
            if entry.expires_ms <= at_ms:
                continue
            hits.append(Hit(key, float(sim), entry.features))
            if len(hits) == k:
                break
        return hits

    def _nearest(self, query: Vector, count: int) -> tuple[list[int], list[float]]:
        if self._hnsw is not None:
            matches = self._hnsw.search(query, count)
            # usearch's inner-product "distance" is 1 - dot.
            return [int(x) for x in matches.keys], [1.0 - float(d) for d in matches.distances]
        n = len(self._row_labels)
        sims = self._matrix[:n] @ query
        top = np.argpartition(-sims, count - 1)[:count] if count < n else np.arange(n)
        top = top[np.argsort(-sims[top])]
        return [self._row_labels[i] for i in top], [float(sims[i]) for i in top]

    def _append_row(self, label: int, vector: Vector) -> None:
        n = len(self._row_labels)
        if n == len(self._matrix):
            grown = np.zeros((2 * n, self.dim), dtype=np.float32)
            grown[:n] = self._matrix
            self._matrix = grown
        self._matrix[n] = vector
        self._row_labels.append(label)
        self._rows[label] = n

    def _drop_row(self, label: int) -> None:
        row = self._rows.pop(label)
        last = len(self._row_labels) - 1
        if row != last:  # move the last row into the hole
            moved = self._row_labels[last]
            self._matrix[row] = self._matrix[last]
            self._row_labels[row] = moved
            self._rows[moved] = row
        self._row_labels.pop()

    def _to_hnsw(self) -> None:
        from usearch.index import Index

        index = Index(
            ndim=self.dim,
            metric="ip",
            dtype="f16",
            connectivity=HNSW_CONNECTIVITY,
            expansion_add=HNSW_EXPANSION_ADD,
            expansion_search=HNSW_EXPANSION_SEARCH,
        )
        n = len(self._row_labels)
        index.add(np.asarray(self._row_labels, dtype=np.uint64), self._matrix[:n])
        self._hnsw = index
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)
        self._row_labels = []
        self._rows = {}


class Indexes:
    """Every scope's index in one worker, capped at ``max_entries`` (oldest dropped first).

    Thread-safe: task threads search while the follower thread adds.
    """

    def __init__(self, max_entries: int, *, brute_max: int = BRUTE_MAX) -> None:
        self.max_entries = max_entries
        self.brute_max = brute_max
        self._scopes: dict[str, ScopeIndex] = {}
        self._order: OrderedDict[str, str] = OrderedDict()  # key -> scope, oldest first
        self._expiry: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._order)

    def add(
        self, scope: str, key: str, vector: Vector, features: Features, expires_ms: int
    ) -> None:
        with self._lock:
            self._sweep(now_ms())
            index = self._scopes.get(scope)
            if index is None or index.dim != len(vector):
                index = self._scopes[scope] = ScopeIndex(len(vector), brute_max=self.brute_max)
            index.add(key, vector, features, expires_ms)
            self._order[key] = scope
            self._order.move_to_end(key)
            heapq.heappush(self._expiry, (expires_ms, key))
            if len(self._expiry) > 4 * len(self._order) + 1024:
                self._compact_expiry()
            while len(self._order) > self.max_entries:
                old_key, old_scope = self._order.popitem(last=False)
                self._drop(old_scope, old_key)

    def remove(self, key: str) -> bool:
        with self._lock:
            scope = self._order.pop(key, None)
            return scope is not None and self._drop(scope, key)

    def search(self, scope: str, vector: Vector, k: int, *, min_similarity: float) -> list[Hit]:
        with self._lock:
            index = self._scopes.get(scope)
            if index is None or index.dim != len(vector):
                return []
            return index.search(vector, k, min_similarity=min_similarity, at_ms=now_ms())

    def _drop(self, scope: str, key: str) -> bool:
        index = self._scopes.get(scope)
        if index is None or not index.remove(key):
            return False
        if not len(index):
            del self._scopes[scope]
        return True

    def _compact_expiry(self) -> None:
        """Rebuild the expiry heap from live entries (re-added keys leave stale items)."""
        live = []
        for key, scope in self._order.items():
            expires = self._scopes[scope].expires_ms(key)
            if expires is not None:
                live.append((expires, key))
        heapq.heapify(live)
        self._expiry = live

    def _sweep(self, at_ms: int) -> None:
        """Forget entries whose expiry passed (Redis has dropped them too)."""
        while self._expiry and self._expiry[0][0] <= at_ms:
            expires, key = heapq.heappop(self._expiry)
            scope = self._order.get(key)
            if scope is None:
                continue
            index = self._scopes.get(scope)
            # A re-added key has a later expiry: only drop the entry this heap item was for.
            if index is not None and index.expires_ms(key) == expires:
                self._order.pop(key, None)
                self._drop(scope, key)
