"""Embedders for the semantic cache: one vector per question, rows L2-normalised.

Three kinds, chosen by ``COALESCE_EMBEDDER``:

- ``hashing``: signed feature hashing of words, word pairs and character n-grams. No model and
  no download; tens of microseconds per text. It sees spelling, not meaning, so it finds
  rephrasings that share most of their words and little else.
- ``local``: WordLlama's static token embeddings (16 MB of weights shipped inside the PyPI
  package, numpy and tokenizers only; ``pip install 'coalesce[local]'``). Offline, about
  0.3 ms per text.
- ``openai``: any OpenAI-compatible ``/v1/embeddings`` endpoint.

Every embedder is safe to call from many threads at once: the worker's task threads share one.
"""

from __future__ import annotations

import abc
import logging
import re
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from producer import ConfigError, Settings

log = logging.getLogger("coalesce.cache")

Vectors = npt.NDArray[np.float32]


def _split(words: str) -> list[str]:
    return words.split()


LOCAL_EXTRA = "pip install 'coalesce[local]'"


class Embedder(abc.ABC):
    """Text to vectors; ``name`` identifies the vector space (vectors of two names never mix)."""

    name: str
    dim: int

    @abc.abstractmethod
    def embed(self, texts: Sequence[str]) -> Vectors:
        """float32 array of shape ``(len(texts), dim)``, each row of unit length."""


def normalise(vectors: npt.NDArray[Any]) -> Vectors:
    """Rows scaled to unit length (a zero row stays zero: it matches nothing)."""
    out = np.asarray(vectors, dtype=np.float32)
    if out.ndim == 1:
        out = out.reshape(1, -1)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(out / norms, dtype=np.float32)


class HashingEmbedder(Embedder):
    """Feature hashing: words, adjacent word pairs and character n-grams into ``dim`` signed slots.

    A stable hash (CRC-32, not Python's salted ``hash``) so every worker process puts a text at
    the same point. Function words weigh less, so "what is the X" and "what are X" stay close.
    """

    WORD = re.compile(r"\w+", re.UNICODE)
    LIGHT = frozenset(
        _split(
            """
            a an the and or of to in on at by for with from is are was were be been do does did
            i me my we you your it its this that what which who how why when where can could
            will would should shall may might must have has had there their they them he she his
            her so as if into about than then just also
            """
        )
    )

    def __init__(
        self,
        dim: int = 512,
        *,
        ngram: int = 4,
        word_weight: float = 1.0,
        pair_weight: float = 0.7,
        char_weight: float = 0.25,
        light_weight: float = 0.3,
    ) -> None:
        self.dim = dim
        self.ngram = ngram
        self.word_weight = word_weight
        self.pair_weight = pair_weight
        self.char_weight = char_weight
        self.light_weight = light_weight
        self.name = f"hashing-v1-{dim}-{ngram}"

    def _features(self, text: str) -> list[tuple[bytes, float]]:
        words = self.WORD.findall(text.lower())
        out: list[tuple[bytes, float]] = []
        for index, word in enumerate(words):
            light = word in self.LIGHT
            weight = self.word_weight * (self.light_weight if light else 1.0)
            out.append((b"w" + word.encode(), weight))
            if index:
                out.append(
                    (b"p" + f"{words[index - 1]} {word}".encode(), self.pair_weight * weight)
                )
            if light:
                continue
            padded = f" {word} "
            for start in range(max(1, len(padded) - self.ngram + 1)):
                out.append((b"c" + padded[start : start + self.ngram].encode(), self.char_weight))
        return out

    def _vector(self, text: str, row: Vectors) -> None:
        dim = self.dim
        for feature, weight in self._features(text):
            code = zlib.crc32(feature)
            row[code % dim] += weight if code & 0x80000000 else -weight

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for index, text in enumerate(texts):
            self._vector(text, out[index])
        return normalise(out)


class LocalEmbedder(Embedder):
    """WordLlama (static token embeddings, weights inside the package): offline, no torch."""

    def __init__(self, dim: int = 256) -> None:
        try:
            import wordllama  # type: ignore[import-untyped,import-not-found,unused-ignore]
            from wordllama import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
                WordLlama,
            )
        except ImportError:
            raise ConfigError(
                "COALESCE_EMBEDDER=local needs the offline model package: "
                f"{LOCAL_EXTRA} (or set COALESCE_EMBEDDER=hashing or openai)"
            ) from None
        # Load from the files the wheel ships; never reach for a download.
        package_dir = Path(wordllama.__file__).parent
        self._model = WordLlama.load(cache_dir=package_dir, dim=dim, disable_download=True)
        self._lock = threading.Lock()
        self.dim = dim
        self.name = f"local:wordllama-l2-supercat-{dim}"

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:  # the tokenizer's padding settings are shared state
            vectors = self._model.embed(list(texts), norm=True, return_np=True)
        return normalise(vectors)


# Known widths, so ``dim`` is right before the first call.
OPENAI_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


class OpenAIEmbedder(Embedder):
    """``POST {base}/embeddings`` of an OpenAI-compatible server, in batches."""

    BATCH = 256

    def __init__(
        self, base_url: str, model: str, api_key: str | None, *, timeout_s: float = 10.0
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s
        )
        self.model = model
        self.name = f"openai:{model}"
        # 0 until the first answer for a model of unknown width (the cache sizes its indexes
        # from the vectors themselves).
        self.dim = OPENAI_DIMS.get(model, 0)

    def embed(self, texts: Sequence[str]) -> Vectors:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.BATCH):
            rows += self._call(list(texts[start : start + self.BATCH]))
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = normalise(np.asarray(rows, dtype=np.float32))
        self.dim = int(vectors.shape[1])
        return vectors

    def _call(self, batch: list[str]) -> list[list[float]]:
        response = self._client.post("/embeddings", json={"model": self.model, "input": batch})
        if response.status_code != 200:
            # The body may echo the input: say only the status.
            raise httpx.HTTPStatusError(
                f"embeddings endpoint answered {response.status_code}",
                request=response.request,
                response=response,
            )
        data = response.json()["data"]
        if len(data) != len(batch):
            raise ValueError(f"embeddings endpoint returned {len(data)} rows for {len(batch)}")
        ordered = sorted(data, key=lambda item: int(item.get("index", 0)))
        return [list(item["embedding"]) for item in ordered]

    def close(self) -> None:
        self._client.close()


def make_embedder(settings: Settings) -> Embedder:
    """The embedder ``settings.embedder`` names; ConfigError naming the setting otherwise."""
    kind = settings.embedder.strip().lower()
    if kind == "hashing":
        return HashingEmbedder()
    if kind == "local":
        return LocalEmbedder()
    if kind == "openai":
        if not settings.embeddings_url:
            raise ConfigError(
                "COALESCE_EMBEDDER=openai needs COALESCE_EMBEDDINGS_URL (the /v1 base URL)"
            )
        secret = settings.embeddings_api_key or settings.upstream_api_key
        return OpenAIEmbedder(
            settings.embeddings_url,
            settings.embeddings_model,
            secret.get_secret_value() if secret is not None else None,
        )
    raise ConfigError(
        f"COALESCE_EMBEDDER={settings.embedder!r} is not one of 'hashing', 'local', 'openai'"
    )
