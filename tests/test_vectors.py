"""The per-scope index: exact while small, usearch HNSW beyond, expiry and the entry cap."""

from __future__ import annotations

import time

import numpy as np
import pytest

from worker.cache.guards import Features
from worker.cache.vectors import Indexes, ScopeIndex, now_ms

FEATS = Features()
LATER = now_ms() + 3_600_000


def unit(rows: np.ndarray) -> np.ndarray:
    out: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return out


@pytest.fixture
def vectors() -> np.ndarray:
    return unit(np.random.default_rng(7).standard_normal((300, 32)))


@pytest.mark.parametrize("brute_max", [10_000, 50])
def test_search_finds_nearest_both_ways(vectors: np.ndarray, brute_max: int) -> None:
    index = ScopeIndex(32, brute_max=brute_max)
    for i, v in enumerate(vectors):
        index.add(f"k{i}", v, FEATS, LATER)
    assert index.uses_hnsw == (brute_max < len(vectors))
    noisy = unit(vectors[:20] + 0.05 * np.random.default_rng(1).standard_normal((20, 32)))
    found = 0
    for i, query in enumerate(noisy):
        hits = index.search(query, 3, min_similarity=0.0, at_ms=now_ms())
        found += hits[0].key == f"k{i}" and hits[0].similarity > 0.9
        assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    # Brute force is exact; HNSW is approximate (its graph is built on several threads), so
    # it may miss a neighbour now and then: a miss is a cache miss, never a wrong hit.
    assert found == 20 if not index.uses_hnsw else found >= 19
    # A threshold cuts the list; remove takes an entry out.
    assert index.search(vectors[5], 3, min_similarity=0.999, at_ms=now_ms())[0].key == "k5"
    assert index.remove("k5") and not index.remove("k5")
    hits = index.search(vectors[5], 3, min_similarity=0.0, at_ms=now_ms())
    assert "k5" not in {h.key for h in hits}
    assert len(index) == len(vectors) - 1


def test_brute_force_removal_keeps_rows_consistent(vectors: np.ndarray) -> None:
    index = ScopeIndex(32)
    for i, v in enumerate(vectors[:10]):
        index.add(f"k{i}", v, FEATS, LATER)
    for i in (0, 9, 4):
        index.remove(f"k{i}")
    for i in (1, 2, 3, 5, 6, 7, 8):
        assert index.search(vectors[i], 1, min_similarity=0.0, at_ms=now_ms())[0].key == f"k{i}"
    index.add("k1", vectors[0], FEATS, LATER)  # re-adding replaces
    assert len(index) == 7
    assert index.search(vectors[0], 1, min_similarity=0.0, at_ms=now_ms())[0].key == "k1"


@pytest.mark.parametrize("brute_max", [10_000, 50])
def test_expired_entries_are_skipped_then_swept(vectors: np.ndarray, brute_max: int) -> None:
    scope = ScopeIndex(32, brute_max=brute_max)
    now = now_ms()
    for i, v in enumerate(vectors[:100]):
        scope.add(f"k{i}", v, FEATS, now + (1000 if i % 2 else 3_600_000))
    assert scope.search(vectors[1], 1, min_similarity=0.5, at_ms=now)[0].key == "k1"
    assert scope.search(vectors[1], 1, min_similarity=0.5, at_ms=now + 1000) == []
    assert scope.search(vectors[2], 1, min_similarity=0.5, at_ms=now + 1000)[0].key == "k2"

    indexes = Indexes(1000, brute_max=brute_max)
    for i, v in enumerate(vectors[:100]):
        indexes.add("s", f"k{i}", v, FEATS, now + (30 if i % 2 else 3_600_000))
    time.sleep(0.05)
    assert indexes.search("s", vectors[1], 1, min_similarity=0.5) == []
    assert indexes.search("s", vectors[2], 1, min_similarity=0.5)[0].key == "k2"
    indexes.add("s", "new", vectors[200], FEATS, LATER)  # an add sweeps what expired
    assert len(indexes) == 51


def test_scopes_are_separate_and_capped(vectors: np.ndarray) -> None:
    indexes = Indexes(5)
    for i in range(8):
        indexes.add("a" if i % 2 else "b", f"k{i}", vectors[i], FEATS, LATER)
    assert len(indexes) == 5  # k0..k2 dropped, oldest first
    assert indexes.search("a", vectors[1], 1, min_similarity=0.9) == []
    assert indexes.search("a", vectors[3], 1, min_similarity=0.9)[0].key == "k3"
    assert indexes.search("b", vectors[3], 1, min_similarity=0.9) == []
    assert indexes.search("c", vectors[3], 1, min_similarity=0.0) == []
    assert indexes.remove("k3") and not indexes.remove("k3")
    assert indexes.search("a", np.ones(7, dtype=np.float32), 1, min_similarity=0.0) == []
