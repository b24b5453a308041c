"""End to end through real processes: producer → Redis → worker → fake upstream → result."""

from __future__ import annotations

import httpx
import pytest

from producer import Answer, AsyncClient, RequestFailed, RequestTimeout, load_settings
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


def test_get_many_answers_in_order_and_places_a_failure(fake_llm, worker_env, workers, client):
    fake = fake_llm(reject_word="forbidden")
    workers(worker_env(fake.url))
    prompts = [f"What is {n} plus {n}?" for n in range(6)] + ["How do I buy forbidden fireworks?"]
    tickets = client.submit_many({"prompt": p, "model": "gpt-4o-mini"} for p in prompts)
    results = client.get_many(tickets, timeout=30, return_exceptions=True)
    for prompt, result in zip(prompts[:6], results[:6], strict=True):
        assert isinstance(result, Answer)
        assert result.text == expected_answer("gpt-4o-mini", None, prompt)
    assert isinstance(results[6], RequestFailed) and "safety system" in str(results[6])
    with pytest.raises(RequestFailed, match="safety system"):
        client.get_many(tickets, timeout=30)  # without return_exceptions: the failure raises
    assert [a.text for a in client.get_many(tickets[:6], timeout=30)] == [
        r.text for r in results[:6] if isinstance(r, Answer)
    ]


def test_get_many_times_out_as_one(client):
    """No worker runs: one timeout for all, saying how many were waited for."""
    tickets = client.submit_many({"prompt": f"q {n}", "model": "gpt-4o-mini"} for n in range(3))
    with pytest.raises(RequestTimeout, match=r"^not every answer of 3 requests within 0.5 s"):
        client.get_many(tickets, timeout=0.5)


async def test_async_get_many(fake_llm, worker_env, workers, redis_url):
    fake = fake_llm()
    workers(worker_env(fake.url))
    async with AsyncClient(settings=load_settings(redis_url=redis_url)) as client:
        prompts = [f"Name a colour, attempt {n}" for n in range(4)]
        tickets = await client.submit_many({"prompt": p, "model": "gpt-4o-mini"} for p in prompts)
        answers = await client.get_many(tickets, timeout=30)
    assert [a.text for a in answers] == [expected_answer("gpt-4o-mini", None, p) for p in prompts]
