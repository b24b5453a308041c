"""Embedders: unit rows of the right width, stable across processes, and the settings' errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import numpy as np
import pytest
from pydantic import SecretStr

from producer import ConfigError, load_settings
from worker.cache.embed import HashingEmbedder, OpenAIEmbedder, make_embedder

TEXTS = ["How do I learn Python?", "What is the best way to learn Python?", "How do I cook rice?"]


def test_hashing_rows_are_unit_and_similar_texts_are_close() -> None:
    embedder = HashingEmbedder()
    vectors = embedder.embed(TEXTS)
    assert vectors.shape == (3, embedder.dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    assert embedder.embed([]).shape == (0, embedder.dim)
    assert np.all(embedder.embed([""]) == 0)  # nothing to hash matches nothing


def test_hashing_is_stable_across_processes() -> None:
    """Every worker must put a text at the same point (no salted hash())."""
    code = (
        "from worker.cache.embed import HashingEmbedder;"
        "print(HashingEmbedder().embed(['cancel order 42'])[0][:8].round(5).tolist())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_make_embedder_by_setting() -> None:
    assert make_embedder(load_settings(embedder="hashing")).name.startswith("hashing")
    with pytest.raises(ConfigError, match="COALESCE_EMBEDDER"):
        make_embedder(load_settings(embedder="bert"))
    with pytest.raises(ConfigError, match="COALESCE_EMBEDDINGS_URL"):
        make_embedder(load_settings(embedder="openai"))


def test_local_embedder() -> None:
    """Offline WordLlama when the extra is installed; otherwise a ConfigError saying how."""
    if importlib.util.find_spec("wordllama") is None:
        with pytest.raises(ConfigError, match=r"COALESCE_EMBEDDER.*pip install"):
            make_embedder(load_settings(embedder="local"))
        return
    embedder = make_embedder(load_settings(embedder="local"))
    vectors = embedder.embed(TEXTS)
    assert vectors.shape == (3, embedder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert (vectors @ vectors.T)[0, 1] > (vectors @ vectors.T)[0, 2]


class _Embeddings(BaseHTTPRequestHandler):
    """A tiny OpenAI-compatible /v1/embeddings: a vector from each input's length and vowels."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), **body}
        )
        if body["input"] == ["fail"]:
            self.send_response(500)
            self.end_headers()
            return
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": [len(t), sum(c in "aeiou" for c in t), 1.0],
            }
            for i, t in enumerate(body["input"])
        ]
        payload = json.dumps(
            {"object": "list", "data": data[::-1], "model": body["model"]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def embeddings_url() -> Iterator[str]:
    _Embeddings.calls.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Embeddings)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_embedder_batches_orders_and_normalises(embeddings_url: str) -> None:
    settings = load_settings(
        embedder="openai",
        embeddings_url=embeddings_url,
        embeddings_model="tiny-embed",
        upstream_api_key=SecretStr("sk-upstream"),
    )
    embedder = make_embedder(settings)
    assert isinstance(embedder, OpenAIEmbedder) and embedder.name == "openai:tiny-embed"
    embedder.BATCH = 2
    vectors = embedder.embed(["ab", "abcde", "a"])
    expected = np.array([[2, 1, 1], [5, 2, 1], [1, 1, 1]], dtype=np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(vectors, expected, atol=1e-6)
    assert embedder.dim == 3
    calls = _Embeddings.calls
    assert [c["input"] for c in calls] == [["ab", "abcde"], ["a"]]
    assert {c["path"] for c in calls} == {"/v1/embeddings"}
    assert {c["auth"] for c in calls} == {"Bearer sk-upstream"}  # falls back to the upstream key
    embedder.close()


def test_openai_embedder_prefers_its_own_key_and_hides_bodies(embeddings_url: str) -> None:
    embedder = make_embedder(
        load_settings(
            embedder="openai",
            embeddings_url=embeddings_url,
            embeddings_model="tiny-embed",
            embeddings_api_key=SecretStr("sk-embed"),
            upstream_api_key=SecretStr("sk-upstream"),
        )
    )
    assert embedder.dim == 0  # an unknown model's width is learnt from its first answer
    assert embedder.embed(["abc"]).shape == (1, 3) and embedder.dim == 3
    assert _Embeddings.calls[-1]["auth"] == "Bearer sk-embed"
    with pytest.raises(Exception, match="500") as caught:
        embedder.embed(["fail"])
    assert "sk-embed" not in str(caught.value)
