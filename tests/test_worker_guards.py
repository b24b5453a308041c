"""What the worker itself guarantees, whoever sends the task: checked input, no text in events
or logs, final failures, and upstreams that do not stream."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest
from celery import Celery

from producer import RequestFailed, load_settings
from producer._celeryconf import TASK_NAME, celery_config
from worker.dev.fakellm import expected_answer

pytestmark = pytest.mark.integration

MODEL = "gpt-4o-mini"


def raw_task(redis_url: str, payload: object, task_id: str, **kwargs: object) -> Celery:
    """Send a task the way any Celery client could, skipping the producer's checks."""
    app = Celery("raw", set_as_current=False)
    app.conf.update(celery_config(load_settings(redis_url=redis_url)))
    app.send_task(TASK_NAME, args=[payload], kwargs=kwargs, task_id=task_id)
    return app


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"prompt": "x" * 3_000_000, "model": MODEL}, "COALESCE_MAX_PROMPT_CHARS"),
        ({"prompt": "hi", "model": MODEL, "system": "s" * 200_000}, "COALESCE_MAX_SYSTEM_CHARS"),
        ({"prompt": "secret \ud800 text", "model": MODEL}, "prompt: contains text that cannot"),
        ({"prompt": "hi", "model": MODEL, "temperature": "hot"}, "temperature"),
        (["not", "an", "object"], "request must be an object"),
    ],
)
def test_the_worker_checks_payloads_and_names_the_field(
    fake_llm, worker_env, workers, client, redis_url, payload, expected
):
    fake = fake_llm()
    proc = workers(worker_env(fake.url))
    raw_task(redis_url, payload, "raw-bad-1")
    with pytest.raises(RequestFailed) as failed:
        client.ticket("raw-bad-1").get(timeout=30)
    message = str(failed.value)
    assert expected in message
    assert "secret" not in message and "sss" not in message and "xxx" not in message
    assert "secret" not in proc.log_tail(400)
    assert httpx.get(fake.url.removesuffix("/v1") + "/stats").json()["calls"] == 0


def test_a_stored_failure_is_final(fake_llm, worker_env, workers, client, redis_url):
    fake = fake_llm(reject_word="forbidden")
    workers(worker_env(fake.url))
    ticket = client.submit("Tell me about forbidden things.", model=MODEL)
    with pytest.raises(RequestFailed, match="safety system"):
        ticket.get(timeout=30)
    httpx.post(fake.url.removesuffix("/v1") + "/config", json={"reject_word": ""})
    calls = httpx.get(fake.url.removesuffix("/v1") + "/stats").json()["calls"]
    raw_task(redis_url, {"prompt": "Tell me about forbidden things.", "model": MODEL}, ticket.id,
             resent=True)  # fmt: skip
    time.sleep(2)
    with pytest.raises(RequestFailed, match="safety system"):
        client.ticket(ticket.id).get(timeout=5)
    assert httpx.get(fake.url.removesuffix("/v1") + "/stats").json()["calls"] == calls


def test_flower_sees_source_batch_and_cost_but_no_answer_text(
    fake_llm, worker_env, workers, client, redis_url
):
    fake = fake_llm()
    proc = workers(worker_env(fake.url))
    app = Celery("watch", broker=redis_url, set_as_current=False)
    seen: list[dict] = []  # every event, as Flower receives them (batched: worker.consumer)
    ready = threading.Event()
    receivers: list = []

    def listen() -> None:
        with app.connection() as conn:
            recv = app.events.Receiver(conn, handlers={"*": seen.append})
            receivers.append(recv)
            ready.set()
            while not recv.should_stop:
                with contextlib.suppress(TimeoutError, socket.timeout):
                    recv.capture(limit=None, timeout=1, wakeup=True)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(10)
    time.sleep(0.5)
    prompts = [f"Which saddle suits rider {n}?" for n in range(3)]
    answers = [t.get(timeout=30) for t in client.submit_many(
        {"prompt": p, "model": MODEL} for p in prompts)]  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        events = [e for e in seen if e["type"] == "task-succeeded"]
        if len(events) == 3:
            break
        time.sleep(0.1)
    receivers[0].should_stop = True
    listener.join(10)
    assert len(events) == 3
    for kind in ("task-received", "task-started"):  # sent in batches, but every one arrives
        assert {e["uuid"] for e in seen if e["type"] == kind} == {e["uuid"] for e in events}
    for event in events:
        assert "'source': 'batched'" in event["result"] and "cost_usd" in event["result"]
        assert "chars>" in event["result"]
        assert not any(a.text[:30] in event["result"] for a in answers)
    assert not any(a.text[:30] in proc.log_tail(400) for a in answers)


@pytest.mark.parametrize("mode", ["ignore", "reject"])
def test_an_upstream_that_does_not_stream_still_answers(
    fake_llm, worker_env, workers, client, mode
):
    fake = fake_llm(stream_mode=mode)
    workers(worker_env(fake.url))
    prompts = [f"How long do brake pads last on bike {n}?" for n in range(20)]
    for _ in range(2):  # the second round finds the choice remembered
        tickets = client.submit_many({"prompt": p, "model": MODEL} for p in prompts)
        for prompt, ticket in zip(prompts, tickets, strict=True):
            assert ticket.get(timeout=30).text == expected_answer(MODEL, None, prompt)
        prompts = [p + " (again)" for p in prompts]
    stats = httpx.get(fake.url.removesuffix("/v1") + "/stats").json()
    assert stats["streamed_calls"] == 0


def test_a_passthrough_result_shows_no_message_text_or_tool_arguments() -> None:
    """Flower's view of a passthrough answer: its shape, not the reply or the call's arguments."""
    from worker.app import _result_repr

    secret = "refund order 4417 to card ending 9921"
    answer = {
        "text": secret,
        "source": "passthrough",
        "cost_usd": 0.0001,
        "message": {
            "role": "assistant",
            "content": secret,
            "tool_calls": [{"function": {"name": "refund", "arguments": f'{{"q": "{secret}"}}'}}],
        },
        "finish_reason": "tool_calls",
    }
    shown = _result_repr(answer)
    assert "4417" not in shown and "9921" not in shown
    assert "'source': 'passthrough'" in shown and "1 tool calls" in shown
