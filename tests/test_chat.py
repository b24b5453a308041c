"""Chat-shaped requests: validation, batch eligibility, keys, the relay format, the passthrough
client and fake, and the whole path through Redis, a real worker and the fake upstream."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from conftest import FAST_ENV, fast_settings

from producer import Client, InvalidRequest, RequestFailed, load_settings, request_key
from producer import validate_request as validate
from producer._relay import RelayItem, chunk_key, decode, encode_chunk, encode_done
from worker.batching.grouping import group_key
from worker.dev.fakellm import FakeConfig, create_app, expected_answer
from worker.dev.procs import Proc, start_fake_llm, start_worker, wait_for_workers
from worker.ledger.books import Books
from worker.passthrough import answer_of, task_id_of
from worker.upstream import Upstream, UpstreamRejected
from worker.upstream.raw import ChunkAssembler, RawCompletion, chunks_from_completion

MODEL = "gpt-4o-mini"
SECRET = "PRIVATE-USER-TEXT"
SYSTEM = "You are the bicycle shop's assistant."
SETTINGS = load_settings(max_prompt_chars=200, max_system_chars=100, max_messages=4)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"messages": list(messages), "model": MODEL, **fields}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def conversation(last: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM},
        user(f"{SECRET} my chain squeaks"),
        {"role": "assistant", "content": "Oil it."},
        user(last),
    ]


def rejection(data: object) -> str:
    with pytest.raises(InvalidRequest) as info:
        validate(SETTINGS, data)
    message = str(info.value)
    assert SECRET not in message
    return message


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (chat(), "messages: must hold at least one message"),
        ({"messages": SECRET, "model": MODEL}, "messages: must be an array of messages, not str"),
        (chat(*[user(SECRET)] * 5), "messages: 5 messages, over the limit of 4"),
        (chat(user("hi"), {"content": SECRET}), "messages[1].role: is required"),
        (chat({"role": SECRET, "content": "x"}), "messages[0].role: must be one of system,"),
        (chat({"role": "user"}), "messages[0].content: is required for a user message"),
        (chat({"role": "user", "content": 3}), "messages[0].content: must be a string or an array"),
        (chat({"role": "user", "content": [SECRET]}), "messages[0].content[0]: must be an object"),
        (
            chat({"role": "user", "content": [{"type": "text", "text": 1}]}),
            "messages[0].content[0].text: must be a string, not int",
        ),
        (
            chat({"role": "system", "content": [{"type": "image_url"}]}, user("x")),
            "messages[0].content[0].type: a system message takes text parts only",
        ),
        (
            chat(user("x"), {"role": "tool", "content": SECRET}),
            "messages[1].tool_call_id: must be a string for a tool message",
        ),
        (
            chat({"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}, user("x")),
            "messages[0].tool_calls[0].function.name: must be a string",
        ),
        (
            chat({"role": "user", "content": f"{SECRET} \ud800"}),
            "messages[0].content: contains text that cannot be encoded as UTF-8",
        ),
        (chat(user("x" * 150), user("y" * 51)), "201 characters of message text, over the limit"),
        (chat({"role": "developer", "content": "s" * 101}, user("x")), "COALESCE_MAX_SYSTEM_CHARS"),
        (chat(user("x"), top_p=3), "top_p: must be between 0 and 1"),
        (chat(user("x"), temperature="hot"), "temperature: must be a number, not str"),
        (chat(user("x"), max_completion_tokens=128_001), "COALESCE_MAX_TOKENS_LIMIT"),
        (chat(user("x"), stop=[SECRET] * 5), "stop: must hold at most 4 sequences"),
        (chat(user("x"), tools=[{"type": "function"}]), "tools[0].function: must be an object"),
        (chat(user("x"), stream="yes"), "stream: must be a boolean, not str"),
        (chat(user("x"), model="a b"), "model: must be a model name without whitespace"),
        (chat(user("x"), system=SECRET), "system: not allowed with messages"),
        (chat(user("x"), prompt=SECRET), "messages: must be null with a prompt"),
        (chat(user("x"), x_new={"deep": [f"{SECRET}\udc00"]}), "x_new.deep[0]: contains text"),
        (chat(user("x"), x_new=object()), "x_new: must be JSON"),
    ],
)
def test_a_bad_chat_request_names_the_field(data: dict[str, Any], expected: str) -> None:
    assert expected in rejection(data)


def test_every_bad_message_is_named_in_one_message() -> None:
    message = rejection(chat({"role": "user"}, "x", {"role": "tool", "content": "r"}, top_p=-1))
    assert message == (
        "invalid request: messages[0].content: is required for a user message; "
        "messages[1]: must be an object, not str; "
        "messages[2].tool_call_id: must be a string for a tool message; "
        "top_p: must be between 0 and 1"
    )


def test_a_prompt_form_request_takes_only_batchable_params() -> None:
    ok = validate(SETTINGS, {"prompt": "hi", "model": MODEL, "params": {"seed": 3}})
    assert ok.params == {"seed": 3}
    message = rejection({"prompt": "hi", "model": MODEL, "params": {"tools": []}})
    assert "params: tools is not allowed with a prompt" in message


def test_a_hand_made_dump_must_keep_temperature_in_params() -> None:
    dumped = validate(SETTINGS, chat(*conversation("hi"), temperature=0.3)).model_dump()
    assert validate(SETTINGS, dumped).params["temperature"] == 0.3
    message = rejection({**dumped, "temperature": 0.9})
    assert "temperature: set it in params for a messages request" in message


# --- batch eligibility ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        chat(user("Where is my order?")),
        chat({"role": "system", "content": SYSTEM}, user("Where is my order?")),
        chat({"role": "developer", "content": SYSTEM}, user("Where is my order?")),
        chat(user("Where?"), n=1, logprobs=False, response_format={"type": "text"}),
        chat(user("Where?"), user="u-1", metadata={"a": "b"}, stream_options={"x": True}),
        chat({"role": "user", "content": [{"type": "text", "text": "Where?"}]}),
        chat(user("Where?"), top_p=0.5, seed=7, presence_penalty=0.1, frequency_penalty=0.2),
    ],
)
def test_a_single_text_question_is_batched(data: dict[str, Any]) -> None:
    request = validate(SETTINGS, data)
    assert not request.passthrough and request.messages is None
    assert request.prompt in ("Where is my order?", "Where?")


@pytest.mark.parametrize(
    "changes",
    [
        {"messages": conversation("And the brakes?")},
        {"messages": [user("a"), {"role": "system", "content": SYSTEM}]},
        {"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}]},
        {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 2}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"messages": [user("   ")]},
        {"tools": [WEATHER_TOOL]},
        {"functions": [{"name": "f"}]},
        {"n": 2},
        {"response_format": {"type": "json_object"}},
        {"logprobs": True},
        {"stop": ["\n"]},
        {"logit_bias": {"50256": -100}},
        {"max_tokens": 5, "max_completion_tokens": 6},
        {"x_future_field": 1},
    ],
)
def test_everything_else_passes_through(changes: dict[str, Any]) -> None:
    request = validate(SETTINGS, {**chat(user("Where?")), **changes})
    assert request.passthrough and request.prompt == "" and request.system is None


def test_normalising_keeps_answer_changing_params_only() -> None:
    request = validate(
        SETTINGS,
        chat(
            {"role": "developer", "content": SYSTEM},
            user("Where?"),
            temperature=0.5,
            max_completion_tokens=50,
            top_p=1,
            seed=7,
            user="u-1",
            stream=True,
        ),
    )
    assert (request.system, request.temperature, request.max_tokens) == (SYSTEM, 0.5, 50)
    assert request.params == {"seed": 7} and request.stream
    default = validate(SETTINGS, chat(user("Where?")))
    assert default.temperature == 1.0  # a chat body without one is asked at OpenAI's default


def test_passthrough_keeps_the_body_as_sent() -> None:
    messages = conversation("And the brakes?")
    fields = {"temperature": 0.2, "max_tokens": 30, "tools": None, "x_new": {"a": [1, 2.5]}}
    request = validate(SETTINGS, chat(*messages, tenant="acme", stream=True, **fields))
    assert request.body() == {**fields, "model": MODEL, "messages": messages}
    assert (request.tenant, request.stream, request.temperature, request.max_tokens) == (
        "acme",
        True,
        0.2,
        30,
    )


@pytest.mark.parametrize(
    "data",
    [
        chat(*conversation("And the brakes?"), tools=[WEATHER_TOOL], stream=True, tenant="t"),
        chat(user("Where?"), seed=3, stream=True),
        {"prompt": "Where?", "model": MODEL, "system": SYSTEM, "max_tokens": 9},
    ],
)
def test_a_dumped_request_validates_back_to_itself(data: dict[str, Any]) -> None:
    request = validate(SETTINGS, data)
    assert validate(SETTINGS, request.model_dump()) == request
    assert validate(SETTINGS, json.loads(request.model_dump_json())) == request
    assert validate(SETTINGS, request) is request


# --- keys ----------------------------------------------------------------------------------------


def key(**changes: Any) -> str:
    base = chat(*conversation("And the brakes?"), temperature=0.2, tools=[WEATHER_TOOL])
    return request_key(validate(SETTINGS, {**base, **changes}))


@pytest.mark.parametrize(
    "changes",
    [
        {"messages": conversation("And the gears?")},
        {"messages": conversation("And the brakes?")[1:]},
        {"messages": [*conversation("And the brakes?")[:2], *conversation("And the brakes?")[3:]]},
        {"temperature": 0.3},
        {"tools": [WEATHER_TOOL, {**WEATHER_TOOL, "function": {"name": "other"}}]},
        {"tool_choice": "none"},
        {"seed": 1},
        {"stop": "END"},
        {"response_format": {"type": "json_object"}},
        {"x_future_field": True},
        {"model": "gpt-4o"},
        {"tenant": "globex"},
    ],
)
def test_the_key_covers_messages_and_every_answer_changing_param(changes: dict[str, Any]) -> None:
    assert key(**changes) != key()


@pytest.mark.parametrize(
    "changes",
    [
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"user": "someone"},
        {"metadata": {"trace": "1"}},
        {"temperature": 0.2 + 0.0},
        {"seed": None},
    ],
)
def test_the_key_ignores_what_cannot_change_the_answer(changes: dict[str, Any]) -> None:
    assert key(**changes) == key()


def test_whole_numbers_share_a_key_and_batched_params_join_it() -> None:
    assert key(top_p=1) == key(top_p=1.0)
    plain = validate(SETTINGS, chat(user("Where?"), temperature=0))
    seeded = validate(SETTINGS, chat(user("Where?"), temperature=0, seed=5))
    submitted = validate(SETTINGS, {"prompt": "Where?", "model": MODEL})
    assert request_key(plain) == request_key(submitted)  # same question, same key
    assert request_key(seeded) != request_key(plain)


def test_group_key_separates_params_but_not_labels() -> None:
    def group(**fields: Any) -> object:
        return group_key(validate(SETTINGS, chat(user("Where?"), **fields)))

    assert group(top_p=0.5) != group(top_p=0.6) != group()
    assert group(seed=1, user="a") == group(seed=1, user="b", metadata={"m": "x"})
    assert group(top_p=1) == group()


# --- the relay format ----------------------------------------------------------------------------


def test_relay_items_round_trip() -> None:
    chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "héllo"}}]}
    assert decode(encode_chunk(3, chunk)) == RelayItem(seq=3, chunk=chunk)
    assert decode(encode_done(4).encode()) == RelayItem(seq=4, done=True)
    assert chunk_key("t-1") == "coalesce:chunks:t-1"
    assert task_id_of("abc-123:workerid:7") == "abc-123"
    for bad in ("nope", "[]", '{"seq": "1"}', '{"seq": 1}'):
        with pytest.raises(ValueError):
            decode(bad)


# --- the passthrough client against the fake, in process -----------------------------------------


def upstream(**knobs: Any) -> Upstream:
    transport = httpx.ASGITransport(app=create_app(FakeConfig(**knobs)))
    return Upstream("http://fake/v1", transport=transport, timeout_s=5)


async def test_a_tool_call_streams_and_assembles_like_the_plain_reply() -> None:
    body = {"model": MODEL, "messages": conversation("Weather in Oslo?"), "tools": [WEATHER_TOOL]}
    chunks: list[dict[str, Any]] = []
    async with upstream(latency_per_token_ms=0.1) as client:
        plain = await client.complete_raw(body, deadline=time.monotonic() + 5)
        streamed = await client.stream_raw(
            body, deadline=time.monotonic() + 5, on_chunk=chunks.append
        )
    call = plain.message["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Weather in Oslo?"}'}
    assert plain.finish_reason == streamed.finish_reason == "tool_calls"
    assert plain.message["content"] is None and plain.text == ""
    assert streamed.message["tool_calls"] == plain.message["tool_calls"]
    assert len(chunks) > 3 and chunks[-1]["usage"]["completion_tokens"] == plain.completion_tokens


async def test_a_conversation_is_answered_from_its_last_turn_and_after_a_tool_result() -> None:
    after_tool = [
        *conversation("Weather in Oslo?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "rainy"},
    ]
    async with upstream(stream_mode="ignore") as client:
        reply = await client.complete_raw(
            {"model": MODEL, "messages": after_tool, "tools": [WEATHER_TOOL]},
            deadline=time.monotonic() + 5,
        )
        chunks: list[dict[str, Any]] = []
        ignored = await client.stream_raw(
            {"model": MODEL, "messages": conversation("Hi?")},
            deadline=time.monotonic() + 5,
            on_chunk=chunks.append,
        )
    assert reply.text == expected_answer(MODEL, SYSTEM, "Weather in Oslo?")
    assert reply.finish_reason == "stop" and "tool_calls" not in reply.message
    assert ignored.text == expected_answer(MODEL, SYSTEM, "Hi?")  # a server that ignored stream
    assert chunks[0]["choices"][0]["delta"]["content"] == ignored.text


async def test_a_server_that_refuses_streams_still_streams_a_passthrough() -> None:
    body = {"model": MODEL, "messages": conversation("Refused stream?")}
    chunks: list[dict[str, Any]] = []
    async with upstream(stream_mode="reject") as client:
        reply = await client.stream_raw(body, deadline=time.monotonic() + 5, on_chunk=chunks.append)
        assert client.calls == 2  # the refused stream, then one plain call
    assert reply.text == expected_answer(MODEL, SYSTEM, "Refused stream?")
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:1]] == [reply.text]
    assert chunks[-1]["usage"]["completion_tokens"] == reply.completion_tokens


async def test_a_rejected_passthrough_raises_with_the_providers_reason() -> None:
    async with upstream(reject_word="forbidden") as client:
        with pytest.raises(UpstreamRejected, match="safety system"):
            await client.complete_raw(
                {"model": MODEL, "messages": [user("forbidden words")]},
                deadline=time.monotonic() + 5,
            )


def test_chunks_assemble_content_refusal_and_parallel_tool_calls() -> None:
    assembler = ChunkAssembler(MODEL)
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": "Hel"},
        {
            "content": "lo",
            "tool_calls": [
                {"index": 0, "id": "a", "function": {"name": "f", "arguments": '{"x"'}},
                {"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}},
            ],
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
    ]
    for delta in deltas:
        assert assembler.feed(
            "", json.dumps({"id": "x", "choices": [{"index": 0, "delta": delta}]})
        )
    finish = {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    assembler.feed("", json.dumps(finish))
    assembler.feed("", json.dumps({"id": "x", "choices": [], "usage": {"prompt_tokens": 5}}))
    assert assembler.feed("", "[DONE]") is None and assembler.complete
    done = assembler.completion()
    assert done.text == "Hello" and done.prompt_tokens == 5
    calls = done.message["tool_calls"]
    assert [c["function"] for c in calls] == [
        {"name": "f", "arguments": '{"x": 1}'},
        {"name": "g", "arguments": ""},
    ]
    again = ChunkAssembler(MODEL)
    for chunk in chunks_from_completion(done.body):
        again.feed("", json.dumps(chunk))
    assert again.completion().message == done.message


def test_an_answer_without_usage_is_counted_and_priced() -> None:
    request = validate(SETTINGS, chat(*conversation("Brakes?")))
    body = {"choices": [{"message": {"role": "assistant", "content": "Check the pads."}}]}
    raw = RawCompletion("Check the pads.", 0, 0, "stop", MODEL, body=body)
    answer = answer_of(Books(load_settings(ledger=False), redis.Redis()), request, raw)
    assert answer.source == "passthrough" and answer.message == body["choices"][0]["message"]
    assert answer.prompt_tokens > 10 and answer.completion_tokens == 4 and answer.cost_usd > 0


# --- end to end: Redis, one worker process, the fake upstream ------------------------------------


@dataclass
class Stack:
    url: str
    fake: Proc
    client: Client

    def fake_get(self, path: str) -> Any:
        return httpx.get(self.fake.url.removesuffix("/v1") + path, timeout=5).json()

    def configure(self, **knobs: Any) -> None:
        base = self.fake.url.removesuffix("/v1")
        httpx.post(base + "/config", json=knobs, timeout=5).raise_for_status()
        httpx.post(base + "/stats/reset", timeout=5).raise_for_status()


@pytest.fixture(scope="module")
def stack(redis_server: Proc) -> Iterator[Stack]:
    """One worker for the module's tests; each test uses its own questions."""
    redis.Redis.from_url(redis_server.url).flushall()
    fake = start_fake_llm()
    env = {**FAST_ENV, "COALESCE_REDIS_URL": redis_server.url, "COALESCE_UPSTREAM_URL": fake.url}
    worker = start_worker(env, name="chat")
    try:
        wait_for_workers(redis_server.url, 1, timeout=30)
    except TimeoutError:
        pytest.fail(f"worker did not start:\n{worker.log_tail()}")
    client = Client(settings=load_settings(redis_url=redis_server.url, **fast_settings()))
    yield Stack(redis_server.url, fake, client)
    client.close()
    worker.stop()
    fake.stop()


@pytest.mark.integration
def test_a_conversation_and_a_tool_request_end_to_end(stack: Stack) -> None:
    stack.configure(latency_ms=0)
    multi = stack.client.chat(conversation("How often should I oil it?"), model=MODEL)
    tools = stack.client.chat(
        conversation("Weather in Bergen?"), model=MODEL, tools=[WEATHER_TOOL], tenant="acme"
    )
    answer, called = multi.get(timeout=30), tools.get(timeout=30)
    assert answer.text == expected_answer(MODEL, SYSTEM, "How often should I oil it?")
    assert (answer.source, answer.finish_reason, answer.message["role"]) == (
        "passthrough",
        "stop",
        "assistant",
    )
    assert answer.prompt_tokens > 20 and answer.completion_tokens > 0 and answer.cost_usd > 0
    function = called.message["tool_calls"][0]["function"]
    assert function == {"name": "get_weather", "arguments": '{"city": "Weather in Bergen?"}'}
    assert (called.text, called.finish_reason) == ("", "tool_calls")


@pytest.mark.integration
def test_the_body_reaches_the_upstream_unchanged(stack: Stack) -> None:
    stack.configure(latency_ms=0)
    messages = conversation("Is this body intact?")
    params = {"temperature": 0.3, "seed": 7, "stop": ["\n\n"], "x_future": {"a": [1, None]}}
    stack.client.chat(messages, model=MODEL, tenant="acme", **params).get(timeout=30)
    assert stack.fake_get("/debug/last")["body"] == {**params, "model": MODEL, "messages": messages}


@pytest.mark.integration
def test_identical_passthrough_requests_are_asked_once(stack: Stack) -> None:
    stack.configure(latency_ms=300)
    messages = conversation("Asked by eight callers at once?")
    barrier = threading.Barrier(8)
    tickets: list[Any] = []

    def send() -> None:
        barrier.wait(5)
        tickets.append(stack.client.chat(messages, model=MODEL, seed=1, user=f"u{len(tickets)}"))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    answers = [ticket.get(timeout=30) for ticket in tickets]
    assert {a.text for a in answers} == {expected_answer(MODEL, SYSTEM, messages[-1]["content"])}
    assert sorted(a.source for a in answers) == ["dedup"] * 7 + ["passthrough"]
    assert stack.fake_get("/stats")["calls"] == 1


@pytest.mark.integration
def test_a_stream_is_relayed_in_order_and_matches_the_answer(stack: Stack) -> None:
    stack.configure(latency_ms=50, latency_per_token_ms=2)
    listener = redis.Redis.from_url(stack.url).pubsub()
    listener.psubscribe("coalesce:chunks:*")
    listener.get_message(timeout=1)  # the subscription's confirmation
    ticket = stack.client.chat(conversation("Stream me an answer?"), model=MODEL, stream=True)
    answer = ticket.get(timeout=30)
    stored = [
        decode(raw) for raw in redis.Redis.from_url(stack.url).lrange(chunk_key(ticket.id), 0, -1)
    ]
    published = []
    while (message := listener.get_message(timeout=1)) is not None:
        published.append(decode(message["data"]))
    listener.close()
    assert [item.seq for item in stored] == list(range(len(stored))) and stored[-1].done
    assert published == stored
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in (item.chunk for item in stored if item.chunk)
        if c["choices"]
    )
    assert text == answer.text == expected_answer(MODEL, SYSTEM, "Stream me an answer?")
    assert len(stored) > 5 and answer.source == "passthrough" and answer.completion_tokens > 0
    assert stored[-2].chunk is not None and stored[-2].chunk["usage"]["completion_tokens"] > 0


@pytest.mark.integration
def test_batch_eligible_chats_are_batched_by_their_params(stack: Stack) -> None:
    stack.configure(latency_ms=0)
    jobs = [(f"Which tyre fits wheel {n}?", 0.5 if n % 2 else 0.9) for n in range(8)]
    tickets = [
        stack.client.chat(
            [{"role": "system", "content": SYSTEM}, user(q)], model=MODEL, top_p=top_p, user="u"
        )
        for q, top_p in jobs
    ]
    answers = [ticket.get(timeout=30) for ticket in tickets]
    for (question, _), answer in zip(jobs, answers, strict=True):
        assert answer.text == expected_answer(MODEL, SYSTEM, question)
        assert answer.source == "batched" and answer.message is None
    by_batch: dict[str | None, set[float]] = {}
    for (_, top_p), answer in zip(jobs, answers, strict=True):
        by_batch.setdefault(answer.batch_id, set()).add(top_p)
    assert len(by_batch) == 2 and all(len(p) == 1 for p in by_batch.values())
    # ... and each batched call carries its group's top_p (the last calls the fake received).
    sent = stack.fake_get("/debug/bodies")["bodies"][-2:]
    assert sorted(body.get("top_p", 0) for body in sent) == [0.5, 0.9]


@pytest.mark.integration
def test_a_rejected_passthrough_fails_alone(stack: Stack) -> None:
    stack.configure(latency_ms=100, reject_word="forbidden")
    bad = stack.client.chat(conversation("Tell me forbidden things?"), model=MODEL)
    good = stack.client.chat(conversation("Tell me allowed things?"), model=MODEL)
    with pytest.raises(RequestFailed, match=r"rejected the request \(400 content_filter\)"):
        bad.get(timeout=30)
    assert good.get(timeout=30).text == expected_answer(MODEL, SYSTEM, "Tell me allowed things?")
    stack.configure(reject_word="")
