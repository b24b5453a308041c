"""The API server's own behaviour: errors, keys, limits, replies and streams.

The app runs in-process (httpx's ASGI transport) against a real Redis; the producer's
AsyncClient is replaced by a stand-in that validates with the real ``validate_request`` and
answers at once, so each test looks at one piece of the API. The end-to-end tests with real
processes and the official ``openai`` package are in ``test_api_e2e.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from producer import Answer, ConfigError, load_settings
from producer._exceptions import (
    BrokerUnavailable,
    RequestFailed,
    UpstreamRateLimited,
    UpstreamRejected,
)
from producer.api import create_app
from producer.api.errors import from_exception
from producer.api.keys import KeyTable, load_keys
from producer.api.tickbatch import TickBatcher
from worker.dev.procs import free_port

# Make this folder importable however pytest is invoked.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_stub import KEY_A, KEY_B, StubClient

CHAT = "/v1/chat/completions"
HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}


Make = Callable[..., Awaitable[tuple[httpx.AsyncClient, StubClient]]]


@pytest.fixture
async def api(redis_url: str) -> AsyncIterator[Make]:
    """``await make(**settings)``: an httpx client on a running app, and its stand-in client."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> tuple[httpx.AsyncClient, StubClient]:
            overrides.setdefault("api_keys", f"{KEY_A}=tenant-a,{KEY_B}=tenant-b")
            overrides.setdefault("redis_url", redis_url)
            settings = load_settings(**overrides)
            app = create_app(settings, client_factory=StubClient)
            await stack.enter_async_context(app.router.lifespan_context(app))
            http = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://api",
                headers={"authorization": f"Bearer {KEY_A}"},
            )
            await stack.enter_async_context(http)
            stub = get_state_of(app).client
            assert isinstance(stub, StubClient)
            return http, stub

        yield make


def get_state_of(app: Any) -> Any:
    return app.state.coalesce


def error_of(reply: httpx.Response) -> dict[str, Any]:
    """The ``error`` object, after checking the reply has exactly OpenAI's error shape."""
    body = reply.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


async def test_plain_request_gets_a_chat_completion_with_usage_and_headers(api: Make) -> None:
    http, stub = await api()
    stub.answer = Answer(
        text="Hi!",
        source="batched",
        model="gpt-4o-mini",
        batch_size=3,
        prompt_tokens=12,
        completion_tokens=3,
        cost_usd=0.00001,
    )
    reply = await http.post(CHAT, json=HELLO)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["id"] == "chatcmpl-task-1"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert reply.headers["x-coalesce-source"] == "batched"
    assert reply.headers["x-coalesce-batch-size"] == "3"
    assert float(reply.headers["x-coalesce-cost-usd"]) == pytest.approx(0.00001)
    assert reply.headers["x-request-id"] == "task-1"
    assert stub.calls == [{**HELLO, "tenant": "tenant-a"}]


async def test_key_picks_the_tenant_and_other_fields_are_forwarded(api: Make) -> None:
    http, stub = await api()
    body = {**HELLO, "top_p": 0.5, "seed": 7, "temperature": 1, "future_field": {"x": 1}}
    reply = await http.post(CHAT, json=body, headers={"authorization": f"Bearer {KEY_B}"})
    assert reply.status_code == 200, reply.text
    reply = await http.post(CHAT, json=body, headers={"authorization": "", "api-key": KEY_A})
    assert reply.status_code == 200, reply.text
    assert [call["tenant"] for call in stub.calls] == ["tenant-b", "tenant-a"]
    assert stub.calls[0]["future_field"] == {"x": 1} and stub.calls[0]["seed"] == 7
    assert type(stub.calls[0]["temperature"]) is int  # forwarded as sent, not coerced


@pytest.mark.parametrize(
    "headers",
    [{"authorization": ""}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Basic eA=="}],
)
async def test_missing_or_wrong_key_is_401_and_not_echoed(
    api: Make, headers: dict[str, str]
) -> None:
    http, stub = await api()
    reply = await http.post(CHAT, json=HELLO, headers=headers)
    assert reply.status_code == 401
    error = error_of(reply)
    assert error["type"] == "authentication_error"
    assert "sk-wrong" not in reply.text and "Hello there" not in reply.text
    assert stub.calls == []


def test_no_keys_refuses_to_start_unless_anonymous_is_explicit(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="COALESCE_API_ALLOW_ANONYMOUS"):
        create_app(load_settings())
    table = load_keys(load_settings(api_allow_anonymous=True))
    assert table.find(None) is not None and table.find(None).tenant == "default"  # type: ignore[union-attr]


def test_keys_file_and_bad_entries_are_named_without_the_key(tmp_path: Any) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nsk-one=acme\n\nsk-two=globex\n")
    table = load_keys(load_settings(api_keys_file=str(path), api_keys="sk-three=initech"))
    assert [table.find(k).tenant for k in ("sk-one", "sk-two", "sk-three")] == [  # type: ignore[union-attr]
        "acme",
        "globex",
        "initech",
    ]
    assert table.find("sk-on") is None and table.find("") is None
    with pytest.raises(ConfigError, match="entry 2 is not 'key=tenant'") as caught:
        load_keys(load_settings(api_keys="sk-ok=a,sk-secret-no-tenant"))
    assert "sk-secret" not in str(caught.value)
    with pytest.raises(ConfigError, match="listed twice"):
        load_keys(load_settings(api_keys="sk-x=a,sk-x=b"))


def test_key_table_compares_every_key() -> None:
    table = KeyTable([("k1", "a"), ("k2", "b"), ("k3", "c")])
    assert table.find("k3").tenant == "c"  # type: ignore[union-attr]
    assert table.find("k4") is None


async def test_malformed_body_is_400_naming_the_field(api: Make) -> None:
    http, stub = await api()
    cases = [
        ({"model": "gpt-4o-mini"}, "messages"),
        ({**HELLO, "messages": "hi"}, "messages"),
        ({**HELLO, "temperature": "hot"}, "temperature"),
        ({**HELLO, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
        ({**HELLO, "tenant": "someone-else"}, "tenant"),
    ]
    for body, field in cases:
        reply = await http.post(CHAT, json=body)
        assert reply.status_code == 400, (body, reply.text)
        error = error_of(reply)
        assert error["type"] == "invalid_request_error"
        assert error["param"] is not None and error["param"].startswith(field), error
        assert field in error["message"]
    reply = await http.post(CHAT, content=b'{"model": "m", "messages": [', headers=_json())
    assert reply.status_code == 400 and error_of(reply)["param"] == "body"
    assert stub.calls == []


def _json() -> dict[str, str]:
    return {"content-type": "application/json"}


async def test_body_over_the_limit_is_413_before_parsing(api: Make) -> None:
    http, stub = await api(api_max_body_bytes=64 * 1024)
    big = {**HELLO, "messages": [{"role": "user", "content": "x" * 100_000}]}
    reply = await http.post(CHAT, json=big)
    assert reply.status_code == 413
    assert error_of(reply)["type"] == "invalid_request_error"
    assert "COALESCE_API_MAX_BODY_BYTES" in error_of(reply)["message"]

    async def chunked() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
        for _ in range(10):
            yield b" " * 10_000

    reply = await http.post(CHAT, content=chunked(), headers=_json())
    assert reply.status_code == 413 and error_of(reply)["type"] == "invalid_request_error"
    assert stub.calls == []


async def test_limits_from_the_producer_are_400_before_enqueueing(api: Make) -> None:
    http, stub = await api(max_prompt_chars=50, max_messages=2)
    long = {**HELLO, "messages": [{"role": "user", "content": "y" * 80}]}
    reply = await http.post(CHAT, json=long)
    assert reply.status_code == 400, reply.text
    assert "COALESCE_MAX_PROMPT_CHARS" in error_of(reply)["message"]
    assert "yyyy" not in reply.text
    many = {**HELLO, "messages": [{"role": "user", "content": "hi"}] * 3}
    reply = await http.post(CHAT, json=many)
    assert reply.status_code == 400 and "COALESCE_MAX_MESSAGES" in error_of(reply)["message"]
    assert error_of(reply)["param"] == "messages"
    reply = await http.post(CHAT, json={**HELLO, "max_tokens": 10**6})
    assert reply.status_code == 400 and error_of(reply)["param"] == "max_tokens"
    assert stub.calls == []


FAILED = "request t failed: "
NOT_FOUND, BAD = "not_found_error", "invalid_request_error"


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (BrokerUnavailable("Redis at redis://:***@h:6379 unavailable"), 503, "service_unavailable"),
        (UpstreamRejected("upstream rejected it (400)", 400), 400, "invalid_request_error"),
        (UpstreamRateLimited("upstream returned 429 on 9 attempts"), 429, "rate_limit_error"),
        (RequestFailed(FAILED + "UpstreamTimeout: deadline"), 504, "timeout"),
        (RequestFailed(FAILED + "UpstreamStatusError: upstream returned 404: x"), 404, NOT_FOUND),
        (RequestFailed(FAILED + "UpstreamRejected: upstream rejected it (422): x"), 422, BAD),
        (RequestFailed(FAILED + "RuntimeError: boom"), 500, "server_error"),
        (RuntimeError("boom"), 500, "server_error"),
    ],
)  # fmt: skip
async def test_producer_errors_map_to_openai_statuses(
    api: Make, error: BaseException, status: int, kind: str
) -> None:
    http, stub = await api()
    stub.error = error
    reply = await http.post(CHAT, json=HELLO)
    assert reply.status_code == status, reply.text
    assert error_of(reply)["type"] == kind
    assert "***" not in reply.text  # addresses stay in the server log
    if status in (429, 503):
        assert int(reply.headers["retry-after"]) >= 1


async def test_timeout_is_504_naming_the_task_which_stays_retrievable(api: Make) -> None:
    http, stub = await api(api_timeout_s=0.2)
    stub.delay = 0.5
    reply = await http.post(CHAT, json=HELLO)
    assert reply.status_code == 504
    assert "task-1" in error_of(reply)["message"] and reply.headers["x-request-id"] == "task-1"
    other = await http.get(f"{CHAT}/chatcmpl-task-1", headers={"authorization": f"Bearer {KEY_B}"})
    assert other.status_code == 404  # another tenant cannot fetch it
    stub.delay = 0.0
    fetched = await http.get(f"{CHAT}/chatcmpl-task-1")
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["choices"][0]["message"]["content"] == "Hi!"
    assert (await http.get(f"{CHAT}/chatcmpl-task-99")).status_code == 404


async def test_requests_per_minute_is_shared_through_redis(api: Make, redis_url: str) -> None:
    http, _ = await api(api_rpm=3)
    other, _ = await api(api_rpm=3)  # a second API process on the same Redis
    statuses = [(await h.post(CHAT, json=HELLO)).status_code for h in (http, other, http, other)]
    assert statuses == [200, 200, 200, 429]
    reply = await http.post(CHAT, json=HELLO)
    assert reply.status_code == 429
    assert error_of(reply)["code"] == "rate_limit_exceeded"
    assert 1 <= int(reply.headers["retry-after"]) <= 21
    reply = await http.post(CHAT, json=HELLO, headers={"authorization": f"Bearer {KEY_B}"})
    assert reply.status_code == 200  # per key


async def test_in_flight_limit_and_release_on_every_exit(api: Make, redis_url: str) -> None:
    http, stub = await api(api_max_in_flight=2)
    stub.delay = 0.3
    replies = await asyncio.gather(*(http.post(CHAT, json=HELLO) for _ in range(3)))
    assert sorted(r.status_code for r in replies) == [200, 200, 429]
    stub.delay, stub.error = 0.0, UpstreamRejected("no", 400)
    for _ in range(3):  # failures release their slot too
        assert (await http.post(CHAT, json=HELLO)).status_code == 400
    stub.error = None
    for _ in range(3):
        assert (await http.post(CHAT, json={**HELLO, "stream": True})).status_code == 200
    r = redis.Redis.from_url(redis_url)
    assert r.keys("coalesce:api:inflight:*") == []  # every slot released
    stub.delay = 0.3
    waiting = asyncio.create_task(http.post(CHAT, json=HELLO))
    await asyncio.sleep(0.1)
    keys: list[bytes] = list(r.keys("coalesce:api:inflight:*"))  # type: ignore[arg-type]
    assert len(keys) == 1
    key = keys[0]
    assert 0 < int(r.pttl(key)) <= (90 + 30) * 1000  # slots a dead process held lapse
    pairs: Any = r.zrange(key, 0, -1, withscores=True)
    expiries = [float(score) for _, score in pairs]
    assert expiries and all(expiry / 1000 > time.time() for expiry in expiries)
    assert (await waiting).status_code == 200


async def test_stream_of_a_batched_answer(api: Make) -> None:
    http, stub = await api()
    stub.answer = Answer(
        text="Hi!", source="dedup", model="gpt-4o-mini", prompt_tokens=4, completion_tokens=2
    )
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    reply = await http.post(CHAT, json=body)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith(
        "text/event-stream"
    )
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        == "Hi!"
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6
    assert reply.headers["x-coalesce-source"] == "dedup"
    assert stub.calls[0]["stream"] is True


async def test_stream_of_a_passthrough_relays_chunks_then_usage(api: Make) -> None:
    http, stub = await api()
    stub.answer = Answer(
        text="ab", source="passthrough", model="gpt-4o-mini", prompt_tokens=5, completion_tokens=2
    )
    stub.chunks = [
        {"id": "up", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
         "choices": [{"index": 0, "delta": {"content": part}, "finish_reason": None}]}
        for part in ("a", "b")
    ]  # fmt: skip
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    reply = await http.post(CHAT, json=body)
    events = sse_events(reply.text)
    assert [json.loads(e) for e in events[:2]] == stub.chunks
    assert json.loads(events[2])["usage"]["prompt_tokens"] == 5 and events[3] == "[DONE]"
    assert reply.headers["x-coalesce-source"] == "passthrough"


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


async def test_stream_failure_before_the_first_byte_is_an_error_status(api: Make) -> None:
    http, stub = await api()
    stub.error = UpstreamRejected("upstream rejected the request (400 content_filter)", 400)
    reply = await http.post(CHAT, json={**HELLO, "stream": True})
    assert reply.status_code == 400 and error_of(reply)["type"] == "invalid_request_error"
    assert reply.headers["x-request-id"] == "task-1"


async def test_tool_calls_and_finish_reason_of_a_passthrough_answer(api: Make) -> None:
    http, stub = await api()
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    stub.answer = Answer(
        text="",
        source="passthrough",
        model="gpt-4o-mini",
        message={"role": "assistant", "content": None, "tool_calls": [call]},
        finish_reason="tool_calls",
    )
    reply = await http.post(CHAT, json=HELLO)
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"] == [call]


async def test_unknown_route_and_method_come_in_openai_shape(api: Make) -> None:
    http, _ = await api()
    reply = await http.get("/v1/nothing")
    assert reply.status_code == 404 and error_of(reply)["type"] == "not_found_error"
    reply = await http.get(CHAT)
    assert reply.status_code == 405 and error_of(reply)


async def test_models_health_and_readiness(api: Make) -> None:
    http, _ = await api(api_models="gpt-4o-mini, fake-large")
    listed = await http.get("/v1/models")
    assert [m["id"] for m in listed.json()["data"]] == ["gpt-4o-mini", "fake-large"]
    assert (await http.get("/v1/models/fake-large")).json()["id"] == "fake-large"
    assert (await http.get("/v1/models/other")).status_code == 404
    assert (await http.get("/v1/models", headers={"authorization": ""})).status_code == 401
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")  # Redis answers, but no worker is consuming
    assert ready.status_code == 503
    assert ready.json()["redis"] is True and ready.json()["workers"] is False


def test_exception_chain_is_searched_for_the_most_specific_error() -> None:
    try:
        try:
            raise UpstreamRateLimited("429s")
        except UpstreamRateLimited as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert from_exception(outer).status == 429


async def test_redis_down_is_503_with_retry_after(api: Make) -> None:
    http, stub = await api(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    reply = await http.post(CHAT, json=HELLO)
    assert reply.status_code == 503, reply.text
    assert error_of(reply)["type"] == "service_unavailable" and reply.headers["retry-after"]
    ready = await http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["redis"] is False
    assert stub.calls == []


async def test_commands_of_one_tick_share_one_pipeline(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    pipelines: list[Any] = []
    make_pipeline = client.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        pipelines.append(make_pipeline(*args, **kwargs))
        return pipelines[-1]

    client.pipeline = counted  # type: ignore[method-assign]
    batch = TickBatcher(client)
    await client.set("text", "not a number")
    results = await asyncio.gather(
        batch.run(lambda pipe: pipe.incr("n")),
        batch.run(lambda pipe: pipe.incr("text")),
        batch.run(lambda pipe: pipe.incr("n")),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], aioredis.ResponseError)  # only its own command fails
    assert len(pipelines) == 1
    assert await batch.run(lambda pipe: pipe.get("n")) == b"2"  # alone: the next tick
    assert len(pipelines) == 2
    await client.aclose()
