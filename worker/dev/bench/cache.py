"""``coalesce bench cache``: how often the semantic cache is right, how often wrong, how fast.

Labelled sets from ``data_dir`` (see its README), each judged the way a cache is used: the
cache holds every first question of the set at once, and each second question is looked up
against all of them, so a hit on the wrong entry counts as a wrong answer:

- QQP hold-out: 4,000 pairs (half duplicates) from the full release, disjoint from the
  2,000-pair subset used for tuning. A hit is right when both questions are one question in
  the release's duplicate graph (or identical), whatever the label of the looked-up pair: a
  question labelled "not a duplicate" of its own partner may still hit its identical twin
  stored from another pair. Any other hit is wrong. Recall counts only the right hits of
  lookups labelled duplicate.
- GPTCache mock: machine paraphrases (duplicates only: recall).
- Bitext support requests: every request looked up among all the others. Right only with
  the same intent and the same entity (order number, invoice, amount, name, city, account
  type); "one intent, other entity" hits are counted on their own and must be zero.
- Perturbed: bitext requests with their order number, invoice, amount or date changed, and
  QQP questions with a number changed. Every hit is wrong.
- Arena-hard: two prompts of one topic cluster. Every hit is wrong.

The baseline is an exact cache (identical text after lower-casing and collapsing spaces).
Then lookup latency at 10k and 100k entries (probe plus the Redis GET, against a private
redis-server) and embedding latency per text.
"""

from __future__ import annotations

import csv
import json
import random
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from producer import ConfigError, load_settings

from ...cache.embed import Embedder, HashingEmbedder, LocalEmbedder
from ...cache.guards import Features, features, mismatch
from ...cache.semantic import Probe, SemanticCache
from ..procs import start_redis

Out = Callable[[str], None]
TOP_K = 4


@dataclass
class LabelledSet:
    """Stored questions, and lookups with the stored question each may rightly hit (or none)."""

    name: str
    stored: list[str]
    queries: list[str]
    # right(query index, stored index) -> is that hit a right answer?
    right: Callable[[int, int], bool]
    # Lookups that have a right answer in the store (the recall denominator).
    answerable: list[bool]
    # trap(query index, stored index) -> is this hit one that must never happen (one intent,
    # another order/amount/date)? Counted apart from the other wrong hits.
    trap: Callable[[int, int], bool] = lambda q, s: False


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


class _Duplicates:
    """Union-find over QQP's duplicate pairs: which questions are one question."""

    def __init__(self, rows: Sequence[dict[str, object]]) -> None:
        self.parent: dict[str, str] = {}
        for row in rows:
            if int(str(row["label"])) == 1:
                self._union(_norm(str(row["text_a"])), _norm(str(row["text_b"])))

    def find(self, x: str) -> str:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(x, x) != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def _union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)

    def same(self, a: str, b: str) -> bool:
        na, nb = _norm(a), _norm(b)
        return na == nb or self.find(na) == self.find(nb)


def _qqp_rows(data_dir: Path) -> list[dict[str, object]]:
    with tarfile.open(data_dir / "qqp_pairs_full.json.tar.gz") as archive:
        member = next(m for m in archive.getmembers() if m.isfile())
        handle = archive.extractfile(member)
        assert handle is not None
        rows: list[dict[str, object]] = json.load(handle)
    return rows


def _pairs_set(
    name: str, pairs: Sequence[tuple[str, str, int]], same: Callable[[str, str], bool]
) -> LabelledSet:
    stored = sorted({a for a, _, _ in pairs})
    queries = [b for _, b, _ in pairs]
    labels = [label for _, _, label in pairs]
    return LabelledSet(
        name,
        stored,
        queries,
        right=lambda q, s: same(queries[q], stored[s]),
        answerable=[label == 1 for label in labels],
    )


def qqp_holdout(data_dir: Path, rows: list[dict[str, object]], n: int = 4000) -> LabelledSet:
    tuned = {
        (r["text_a"], r["text_b"])
        for r in map(json.loads, (data_dir / "qqp_gptcache_subset_2000.jsonl").open())
    }
    rest = [r for r in rows if (r["text_a"], r["text_b"]) not in tuned]
    random.Random(7).shuffle(rest)
    positives = [r for r in rest if int(str(r["label"])) == 1][: n // 2]
    negatives = [r for r in rest if int(str(r["label"])) == 0][: n // 2]
    chosen = positives + negatives
    random.Random(8).shuffle(chosen)
    graph = _Duplicates(rows)
    pairs = [(str(r["text_a"]), str(r["text_b"]), int(str(r["label"]))) for r in chosen]
    return _pairs_set("QQP hold-out", pairs, graph.same)


def gptcache_mock(data_dir: Path) -> LabelledSet:
    rows = json.loads((data_dir / "gptcache_mock_data.json").read_text())
    pairs = [(r["origin"], r["similar"], 1) for r in rows]
    return _pairs_set("GPTCache mock", pairs, lambda a, b: True)


def arena_clusters(data_dir: Path) -> LabelledSet:
    clusters: dict[str, list[str]] = {}
    for line in (data_dir / "arena_hard_v0.1_questions.jsonl").open():
        row = json.loads(line)
        clusters.setdefault(row["cluster"], []).append(row["prompt"])
    pairs = [(v[0], v[1], 0) for v in clusters.values() if len(v) == 2]
    return _pairs_set("arena-hard same topic", pairs, lambda a, b: False)


def _bitext_rows(data_dir: Path) -> list[dict[str, str]]:
    with (data_dir / "bitext_customer_support_train.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def bitext_requests(rows: list[dict[str, str]]) -> LabelledSet:
    """Each request among all the others (leave-one-out: its own row never counts)."""
    texts = [r["instruction"] for r in rows]
    intents = [r["intent"] for r in rows]
    entities = [(r["entity_type"], r["entity_value"].strip().lower()) for r in rows]
    by_key = Counter(zip(intents, entities, strict=True))

    def right(q: int, s: int) -> bool:
        return q != s and intents[q] == intents[s] and entities[q] == entities[s]

    return LabelledSet(
        "bitext support",
        texts,
        texts,
        right=right,
        answerable=[by_key[(intents[i], entities[i])] > 1 for i in range(len(rows))],
        trap=lambda q, s: intents[q] == intents[s] and entities[q] != entities[s],
    )


DATE_SWAPS = (("today", "tomorrow"), ("monday", "friday"), ("march 3", "march 4"))


def perturbed(rows: list[dict[str, str]], qqp: LabelledSet) -> LabelledSet:
    """Requests whose order number, invoice, amount or date changed: every hit is wrong."""
    rng = random.Random(11)
    stored: list[str] = []
    queries: list[str] = []
    for row in rows:
        text, value = row["instruction"], row["entity_value"].strip()
        if row["entity_type"] in ("order_id", "invoice_id", "refund_amount") and value in text:
            digits = re.sub(r"\d", lambda _: str(rng.randrange(10)), value)
            if digits != value:
                stored.append(text)
                queries.append(text.replace(value, digits))
    for text in qqp.stored:
        match = re.search(r"\b\d+\b", text)
        if match:
            stored.append(text)
            queries.append(
                text[: match.start()] + str(int(match.group()) + 1) + text[match.end() :]
            )
        low = text.lower()
        for old, new in DATE_SWAPS:
            if old in low:
                stored.append(text)
                queries.append(re.sub(old, new, text, flags=re.I))
                break
    stored_unique = sorted(set(stored))
    known = {_norm(t) for t in stored_unique}
    queries = [q for q in queries if _norm(q) not in known]  # a change that made another row
    return LabelledSet(
        "perturbed (number/amount/date)",
        stored_unique,
        queries,
        right=lambda q, s: False,
        answerable=[False] * len(queries),
        trap=lambda q, s: True,
    )


@dataclass(frozen=True)
class Score:
    lookups: int
    hits: int
    right: int
    wrong: int
    trap_hits: int
    answerable: int
    served: int  # right hits of lookups that have a right answer (the recall numerator)

    @property
    def recall(self) -> float:
        return self.served / self.answerable if self.answerable else float("nan")

    @property
    def wrong_rate(self) -> float:
        return self.wrong / self.lookups if self.lookups else float("nan")

    @property
    def precision(self) -> float:
        return self.right / self.hits if self.hits else float("nan")


class _Embedded:
    """One set's vectors and features for one embedder, reused for every threshold."""

    def __init__(self, labelled: LabelledSet, embedder: Embedder, feats: dict[str, Features]):
        self.labelled = labelled
        stored_v = embedder.embed(labelled.stored)
        query_v = embedder.embed(labelled.queries)
        self.sims = query_v @ stored_v.T
        if labelled.stored is labelled.queries:  # leave-one-out
            np.fill_diagonal(self.sims, -2.0)
        self.top = np.argsort(-self.sims, axis=1)[:, :TOP_K]
        self.stored_f = [feats.setdefault(t, features(t)) for t in labelled.stored]
        self.query_f = [feats.setdefault(t, features(t)) for t in labelled.queries]

    def score(self, threshold: float, *, guarded: bool = True) -> Score:
        hits = right = wrong = traps = served = 0
        s = self.labelled
        for q in range(len(s.queries)):
            hit = self._lookup(q, threshold, guarded)
            if hit is None:
                continue
            hits += 1
            if s.right(q, hit):
                right += 1
                served += s.answerable[q]
            else:
                wrong += 1
                traps += s.trap(q, hit)
        return Score(len(s.queries), hits, right, wrong, traps, sum(s.answerable), served)

    def _lookup(self, q: int, threshold: float, guarded: bool) -> int | None:
        for s in self.top[q]:
            if self.sims[q, s] < threshold:
                return None
            if not guarded or mismatch(self.query_f[q], self.stored_f[int(s)]) is None:
                return int(s)
        return None


def exact_baseline(labelled: LabelledSet) -> Score:
    index: dict[str, int] = {}
    for i, text in enumerate(labelled.stored):
        index.setdefault(" ".join(text.lower().split()), i)
    hits = right = wrong = traps = served = 0
    loo = labelled.stored is labelled.queries
    for q, text in enumerate(labelled.queries):
        s = index.get(" ".join(text.lower().split()))
        if s is None or (loo and s == q):
            continue
        hits += 1
        right += labelled.right(q, s)
        served += labelled.right(q, s) and labelled.answerable[q]
        wrong += not labelled.right(q, s)
        traps += not labelled.right(q, s) and labelled.trap(q, s)
    return Score(len(labelled.queries), hits, right, wrong, traps, sum(labelled.answerable), served)


def _embedders(only: str | None) -> list[Embedder]:
    out: list[Embedder] = []
    if only in (None, "hashing"):
        out.append(HashingEmbedder())
    if only in (None, "local"):
        try:
            out.append(LocalEmbedder())
        except ConfigError as exc:
            if only == "local":
                raise
            print(f"(local embedder skipped: {exc})")
    if only not in (None, "hashing", "local"):
        from ...cache.embed import make_embedder

        out.append(make_embedder(load_settings(embedder=only)))
    return out


def _fmt(score: Score) -> str:
    recall = "    -" if not score.answerable else f"{score.recall * 100:5.1f}%"
    precision = "    -" if not score.hits else f"{score.precision * 100:5.1f}%"
    return (
        f"{score.lookups:6d} {score.hits:6d}  {precision}  {recall}  "
        f"{score.wrong:5d} ({score.wrong_rate * 100:5.2f}%)  {score.trap_hits:5d}"
    )


HEADER = (
    "  set                              lookups   hits  precis  recall  wrong (of lookups)  traps"
)


def _quality(
    sets: list[LabelledSet], embedders: list[Embedder], thresholds: Sequence[float], out: Out
) -> None:
    out("Quality (guards on; 'traps' = hits between requests naming another order/amount/date)")
    out(HEADER)
    for labelled in sets:
        out(f"  {labelled.name[:30]:30s} {_fmt(exact_baseline(labelled))}   exact-match baseline")
    feats: dict[str, Features] = {}
    for embedder in embedders:
        for labelled in sets:
            embedded = _Embedded(labelled, embedder, feats)
            for threshold in thresholds:
                label = f"{embedder.name} @{threshold:.2f}"
                out(f"  {labelled.name[:30]:30s} {_fmt(embedded.score(threshold))}   {label}")
            unguarded = embedded.score(thresholds[0], guarded=False)
            out(f"  {labelled.name[:30]:30s} {_fmt(unguarded)}   (no guards @{thresholds[0]:.2f})")


def _embed_latency(embedders: list[Embedder], texts: list[str], out: Out) -> None:
    out("\nEmbedding latency per text (one text per call; batch of 256)")
    for embedder in embedders:
        embedder.embed(texts[:8])
        times = []
        for text in texts[:300]:
            start = time.perf_counter()
            embedder.embed([text])
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        embedder.embed(texts[:256])
        batch = (time.perf_counter() - start) / 256
        p50, p99 = np.percentile(np.array(times) * 1e3, [50, 99])
        out(
            f"  {embedder.name:34s} p50 {p50:.3f} ms  p99 {p99:.3f} ms  "
            f"batched {batch * 1e3:.3f} ms"
        )


def _lookup_latency(embedder: Embedder, texts: list[str], sizes: tuple[int, ...], out: Out) -> None:
    out(
        f"\nLookup latency: probe (embed + search + guards) + Redis GET, one scope, {embedder.name}"
    )
    proc = start_redis()
    try:
        for size in sizes:
            cache = SemanticCache(proc.url, embedder, threshold=0.0, max_entries=size)
            try:
                _fill(cache, texts, size, out)
                probe_ms, total_ms = _time_lookups(cache, texts[:size], 1000)
                out(
                    f"  {size:>7,d} entries: probe p50 {np.percentile(probe_ms, 50):.2f} ms "
                    f"p99 {np.percentile(probe_ms, 99):.2f} ms; with GET p50 "
                    f"{np.percentile(total_ms, 50):.2f} ms p99 {np.percentile(total_ms, 99):.2f} ms"
                )
            finally:
                cache.stop()
            _flush(proc.url)
    finally:
        proc.stop()


def _flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()


def _fill(cache: SemanticCache, texts: list[str], size: int, out: Out) -> None:
    scope = "bench.scope.x"
    started = time.perf_counter()
    for start in range(0, size, 1000):
        chunk = [
            texts[i % len(texts)] + ("" if i < len(texts) else f" #{i}")
            for i in range(start, min(size, start + 1000))
        ]
        vectors = cache.embedder.embed(chunk)
        for text, vector in zip(chunk, vectors, strict=True):
            cache.store(scope, Probe(vector, features(text), ()), "r" * 500, 3_600_000)
    out(f"  (filled {size:,d} entries in {time.perf_counter() - started:.0f} s)")


def _time_lookups(
    cache: SemanticCache, texts: list[str], count: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    rng = random.Random(3)
    probe_ms: list[float] = []
    total_ms: list[float] = []
    client = cache._redis
    for _ in range(count):
        text = rng.choice(texts)
        text = text + " please" if rng.random() < 0.5 else text
        start = time.perf_counter()
        probe = cache.probe("bench.scope.x", text)
        probed = time.perf_counter()
        if probe.candidates:
            client.get(probe.candidates[0].entry)
        done = time.perf_counter()
        probe_ms.append((probed - start) * 1e3)
        total_ms.append((done - start) * 1e3)
    return np.array(probe_ms), np.array(total_ms)


def run_cache_bench(
    data_dir: Path,
    *,
    embedder: str | None,
    sizes: tuple[int, ...] = (10_000, 100_000),
    out: Callable[[str], None] = print,
) -> None:
    """Print quality per labelled set and embedder, embedding latency and lookup latency."""
    settings = load_settings()
    default = settings.semantic_threshold
    thresholds = sorted({default, 0.8, 0.95} - {default}, key=lambda t: abs(t - default))
    thresholds = [default, *thresholds]
    rows = _qqp_rows(data_dir)
    bitext = _bitext_rows(data_dir)
    qqp = qqp_holdout(data_dir, rows)
    sets = [
        qqp,
        gptcache_mock(data_dir),
        bitext_requests(bitext),
        perturbed(bitext, qqp),
        arena_clusters(data_dir),
    ]
    embedders = _embedders(embedder)
    out(
        f"semantic cache bench (default threshold {default}, "
        f"default embedder {settings.embedder})\n"
    )
    _quality(sets, embedders, thresholds, out)
    texts = list(dict.fromkeys(str(r[k]) for r in rows for k in ("text_a", "text_b")))
    _embed_latency(embedders, texts, out)
    if sizes:
        _lookup_latency(embedders[0] if embedder else HashingEmbedder(), texts, sizes, out)
