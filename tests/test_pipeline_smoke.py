"""End to end through real processes: producer → Redis → worker → fake upstream → result."""

from __future__ import annotations

import httpx
import pytest

from worker.dev.fakellm import expected_answer

pytestmark = pytest.mark.integration


def test_one_request_round_trip(fake_llm, worker_env, workers, client):
    fake = fake_llm()
    workers(worker_env(fake.url))
    answer = client.submit("What is the capital of France?", model="gpt-4o-mini").get(timeout=30)
    assert answer.text == expected_answer("gpt-4o-mini", None, "What is the capital of France?")
    assert answer.source == "single"
    assert answer.prompt_tokens > 0 and answer.completion_tokens > 0
    stats = httpx.get(fake.url.removesuffix("/v1") + "/stats").json()
    assert stats["calls"] == 1
