"""The producer side: validation messages, submitting through a Redis outage, waiting across one.

Outage tests run their own redis-server (append-only, so a restart keeps its data) and stop and
start it for real; the session's shared server is never restarted.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, states

from producer import (
    Answer,
    BrokerUnavailable,
    Client,
    InvalidRequest,
    Request,
    RequestFailed,
    RequestTimeout,
    Settings,
    UpstreamStatusError,
    _pending,
    build_request,
    load_settings,
    validate_request,
)
from producer._celeryconf import celery_config
from producer._client import classify, describe, redact_url
from worker.dev.procs import spawn, start_redis, wait_until

SECRET = "PRIVATE-USER-TEXT"  # every prompt and system here carries it; no message may
MODEL = "gpt-4o-mini"
BASE: dict[str, Any] = {
    "prompt": f"{SECRET} where is my order?",
    "model": MODEL,
    "system": f"{SECRET} you are the support assistant.",
    "temperature": 0.2,
    "max_tokens": 200,
    "tenant": "acme",
}
ANSWER = Answer(text="It ships tomorrow.", source="single", model=MODEL)


@pytest.fixture
def settings() -> Settings:
    return load_settings(max_prompt_chars=60, max_system_chars=80)


def rejection(settings: Settings, data: object) -> str:
    with pytest.raises(InvalidRequest) as info:
        validate_request(settings, data)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith("invalid request: ")
    assert SECRET not in message and "error(s)" not in message
    return message


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"prompt": ""}, "prompt: must not be empty"),
        ({"prompt": " \n\t "}, "prompt: must not be empty"),
        ({"prompt": 3}, "prompt: must be a string, not int"),
        ({"prompt": None}, "prompt: must be a string, not None"),
        ({"prompt": SECRET * 4}, "prompt: 68 characters, over the limit of 60"),
        ({"system": SECRET * 5}, "system: 85 characters, over the limit of 80"),
        ({"system": [SECRET]}, "system: must be a string or null, not list"),
        ({"model": ""}, "model: must not be empty"),
        ({"model": "gpt 4o"}, "model: must be a model name without whitespace"),
        ({"model": "m" * 201}, "model: 201 characters, over the limit of 200"),
        ({"model": None}, "model: must be a string, not None"),
        ({"temperature": "hot"}, "temperature: must be a number, not str"),
        ({"temperature": True}, "temperature: must be a number, not bool"),
        ({"temperature": None}, "temperature: must be a number, not None"),
        ({"temperature": float("nan")}, "temperature: must be a finite number"),
        ({"temperature": 2.5}, "temperature: must be between 0 and 2"),
        ({"temperature": -0.1}, "temperature: must be between 0 and 2"),
        ({"max_tokens": 0}, "max_tokens: must be at least 1"),
        ({"max_tokens": 128_001}, "max_tokens: must be at most 128000 (COALESCE_MAX_TOKENS_LIMIT)"),
        ({"max_tokens": 1.5}, "max_tokens: must be an integer or null, not float"),
        ({"max_tokens": "3"}, "max_tokens: must be an integer or null, not str"),
        ({"tenant": 7}, "tenant: must be a string or null, not int"),
        ({"tenant": "t" * 201}, "tenant: 201 characters, over the limit of 200"),
        ({"top_q": 1}, "top_q: unknown field, not permitted (known fields: prompt, model,"),
    ],
)
def test_each_bad_field_is_named_with_its_problem(
    settings: Settings, changes: dict[str, Any], expected: str
) -> None:
    assert expected in rejection(settings, {**BASE, **changes})


def test_size_limits_name_their_settings(settings: Settings) -> None:
    validate_request(settings, {**BASE, "prompt": "p" * 60, "system": "s" * 80})  # at the limits
    message = rejection(settings, {**BASE, "prompt": "p" * 61, "system": "s" * 81})
    assert "prompt: 61 characters, over the limit of 60 (COALESCE_MAX_PROMPT_CHARS)" in message
    assert "system: 81 characters, over the limit of 80 (COALESCE_MAX_SYSTEM_CHARS)" in message


def test_every_bad_field_is_named_in_one_message(settings: Settings) -> None:
    data = {
        "prompt": "",
        "model": "a b",
        "system": 1,
        "temperature": "warm",
        "max_tokens": -1,
        "tenant": [],
        "top_q": 1,
        "stream": "yes",
    }
    assert rejection(settings, data) == (
        "invalid request: prompt: must not be empty; "
        "model: must be a model name without whitespace; "
        "system: must be a string or null, not int; "
        "temperature: must be a number, not str; "
        "max_tokens: must be at least 1; "
        "tenant: must be a string or null, not list; "
        "stream: must be a boolean, not str; "
        "top_q: unknown field, not permitted (known fields: prompt, model, system, "
        "temperature, max_tokens, tenant, messages, params, stream, cache, tags)"
    )


def test_missing_fields_are_named(settings: Settings) -> None:
    assert rejection(settings, {}) == ("invalid request: prompt: is required; model: is required")


@pytest.mark.parametrize("field", list(Request.model_fields))
def test_every_request_field_is_checked(settings: Settings, field: str) -> None:
    assert f"{field}: must be" in rejection(settings, {**BASE, field: [SECRET]})


@pytest.mark.parametrize(
    ("data", "kind"), [([BASE], "list"), (SECRET, "str"), (None, "None"), (3, "int")]
)
def test_a_payload_that_is_not_an_object_is_rejected(
    settings: Settings, data: object, kind: str
) -> None:
    assert rejection(settings, data) == f"invalid request: request must be an object, not {kind}"


@pytest.mark.parametrize("field", ["prompt", "system", "model", "tenant"])
def test_lone_surrogates_are_rejected_with_their_index(settings: Settings, field: str) -> None:
    value = "hello\ud800world" if field in ("model", "tenant") else f"hello\udfff {SECRET}"
    assert (
        f"{field}: contains text that cannot be encoded as UTF-8 (lone surrogate at index 5)"
        in (rejection(settings, {**BASE, field: value}))
    )


def test_nul_bytes_are_fine(settings: Settings) -> None:
    request = validate_request(settings, {**BASE, "prompt": "a\x00b", "system": "\x00"})
    assert request.prompt == "a\x00b"


def test_unknown_field_names_are_shown_safely(settings: Settings) -> None:
    message = rejection(settings, {**BASE, "x" * 100: 1, 3: 4, "bad\ud800": 5})
    assert "'" + "x" * 40 + "'..." in message
    assert "<int field name>" in message and "'bad\\ud800'" in message
    message.encode("utf-8")  # the message itself is always loggable


def test_a_ready_request_is_checked_again(settings: Settings) -> None:
    # The model cannot know the configured limits or reject surrogates; the validator does.
    assert "COALESCE_MAX_PROMPT_CHARS" in rejection(
        settings, Request(**{**BASE, "prompt": "y" * 61})
    )
    unchecked = Request.model_construct(**{**BASE, "tenant": "\ud800"})  # skips the model's checks
    assert "tenant: contains text that cannot" in rejection(settings, unchecked)
    ok = Request(**BASE)
    assert validate_request(settings, ok) is ok


def test_valid_input_and_the_old_name(settings: Settings) -> None:
    assert build_request is validate_request
    assert validate_request(settings, BASE) == Request(**BASE)
    minimal = validate_request(settings, {"prompt": "Hi", "model": MODEL, "temperature": 1})
    assert (minimal.system, minimal.temperature, minimal.max_tokens) == (None, 1.0, None)


def test_new_settings_have_defaults_and_read_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = load_settings()
    assert (defaults.max_system_chars, defaults.submit_retry_s) == (100_000, 5.0)
    monkeypatch.setenv("COALESCE_MAX_SYSTEM_CHARS", "10")
    monkeypatch.setenv("COALESCE_SUBMIT_RETRY_S", "0.5")
    assert (load_settings().max_system_chars, load_settings().submit_retry_s) == (10, 0.5)


def test_submit_many_names_the_bad_item_and_enqueues_nothing(
    client: Client, redis_url: str
) -> None:
    with pytest.raises(InvalidRequest, match=r"^item 1: invalid request: request must be an obj"):
        client.submit_many([BASE, [BASE]])  # type: ignore[list-item]
    assert redis.Redis.from_url(redis_url).llen(client.settings.queue) == 0


# --- messages about Redis ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6400/0", "redis://127.0.0.1:6400/0"),
        ("redis://:hunter22@h:1/0", "redis://:***@h:1/0"),
        ("redis://app:hunter22@h:1/0", "redis://app:***@h:1/0"),
        ("rediss://hunter22@h:1/0", "rediss://***@h:1/0"),
        ("redis://h:1/0?password=hunter22&db=1", "redis://h:1/0?password=***&db=1"),
        ("unix://:hunter22@/tmp/r.sock?db=2", "unix://:***@/tmp/r.sock?db=2"),
    ],
)
def test_redis_urls_are_shown_without_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_connection_problems_are_found_behind_celerys_wrappers() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    try:
        try:
            raise redis.ConnectionError("Error 111 connecting to h:1. Connection refused.") from (
                refused
            )
        except redis.ConnectionError as exc:
            raise RuntimeError("Retry limit exceeded") from exc
    except RuntimeError as wrapped:
        found = classify(wrapped)
    assert found is not None and found[0] is True
    assert describe(found[1], "redis://h:1/0") == "ConnectionError: Connection refused"
    auth = redis.AuthenticationError("invalid username-password pair")
    assert classify(auth) == (False, auth)  # waiting does not fix a wrong password
    assert classify(redis.BusyLoadingError("loading"))[0] is True  # type: ignore[index]
    assert classify(ValueError("unrelated")) is None


# --- outages: a private redis-server that is stopped and started again -------------------------


class RestartableRedis:
    """A private append-only redis-server that can be stopped and started on the same port."""

    def __init__(self) -> None:
        self.proc = start_redis(appendonly=True)
        self.url = self.proc.url
        self._argv = [str(arg) for arg in self.proc.popen.args]  # type: ignore[union-attr]
        self._cleanup = list(self.proc.cleanup)

    def stop(self) -> None:
        """SIGTERM keeps the data dir (and flushes the AOF); ``Proc.stop`` would delete it."""
        if self.proc.popen.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.popen.wait(10)

    def start(self) -> None:
        self.proc = spawn(self._argv, log_name="redis")
        self._cleanup += self.proc.cleanup
        client = redis.Redis.from_url(self.url)
        wait_until(client.ping, timeout=10, what="restarted redis-server")
        client.close()

    def start_after(self, delay_s: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(delay_s), self.start()))
        thread.start()
        return thread

    def close(self) -> None:
        self.stop()
        self.proc.cleanup = self._cleanup
        self.proc.stop()

    def queued_ids(self, queue: str) -> list[str]:
        client = redis.Redis.from_url(self.url)
        try:
            return [json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)]
        finally:
            client.close()


@pytest.fixture
def own_redis() -> Iterator[RestartableRedis]:
    server = RestartableRedis()
    yield server
    if server.proc.popen.poll() is None:
        # Tickets unsubscribe when collected; let that happen while the server still answers.
        gc.collect()
    server.close()


def outage_client(url: str, retry_s: float = 1.0) -> Client:
    return Client(settings=load_settings(redis_url=url, submit_retry_s=retry_s))


def store(url: str, task_id: str, result: object, state: str) -> None:
    """Write a result the way a worker does, through Celery's result backend."""
    app = Celery("test-worker", set_as_current=False)
    app.conf.update(celery_config(load_settings(redis_url=url)))
    try:
        app.backend.store_result(task_id, result, state)
    finally:
        app.close()


def wait_in_thread(ticket: Any, timeout: float) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["value"] = ticket.get(timeout=timeout)
        except Exception as exc:
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)  # the wait is subscribed and blocked before Redis goes away
    return thread, outcome


def test_submit_during_an_outage_raises_broker_unavailable(own_redis: RestartableRedis) -> None:
    url = own_redis.url.replace("redis://", "redis://:hunter22@")
    own_redis.stop()
    with outage_client(url, retry_s=1.0) as client:
        for submit in (
            lambda: client.submit(BASE["prompt"], model=MODEL),
            lambda: client.submit_many([BASE, BASE]),
        ):
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable) as info:
                submit()
            elapsed = time.monotonic() - started
            assert 0.9 <= elapsed < 2.0
            message = str(info.value)
            assert message.startswith(f"Redis at {redact_url(url)} unavailable for 1.")
            assert message.endswith("s (ConnectionError: Connection refused)")
            assert "hunter22" not in message and SECRET not in message
            assert info.value.__cause__ is None and info.value.__suppress_context__


def test_submit_waits_out_a_restart_and_enqueues_once(own_redis: RestartableRedis) -> None:
    own_redis.stop()
    restart = own_redis.start_after(0.5)
    with outage_client(own_redis.url, retry_s=5.0) as client:
        started = time.monotonic()
        ticket = client.submit(BASE["prompt"], model=MODEL)
        elapsed = time.monotonic() - started
        restart.join()
        assert 0.4 <= elapsed < 3.0
        assert own_redis.queued_ids(client.settings.queue) == [ticket.id]
        pending = redis.Redis.from_url(own_redis.url).zrange(_pending.PENDING, 0, -1)
        assert pending == [ticket.id.encode()]
        store(own_redis.url, ticket.id, ANSWER.model_dump(), states.SUCCESS)
        assert ticket.get(timeout=5) == ANSWER


class OutageAfterFirstSend(Client):
    """Stops Redis right after its first task is enqueued: a real outage mid-``submit_many``."""

    def __init__(self, server: RestartableRedis, restart_after_s: float | None, **kw: Any) -> None:
        super().__init__(settings=load_settings(redis_url=server.url, **kw))
        self.server, self.restart_after_s, self.sends = server, restart_after_s, 0
        self.restarted: threading.Thread | None = None

    def _publish(self, task_id: str, payload: dict[str, Any]) -> Any:
        self.sends += 1
        result = super()._publish(task_id, payload)
        if self.sends == 1:
            self.server.stop()
            if self.restart_after_s is not None:
                self.restarted = self.server.start_after(self.restart_after_s)
        return result


def test_submit_many_resumes_after_a_restart_without_duplicates(
    own_redis: RestartableRedis,
) -> None:
    jobs = [{**BASE, "prompt": f"{SECRET} question {n}"} for n in range(4)]
    with OutageAfterFirstSend(own_redis, 0.5, submit_retry_s=5.0) as client:
        tickets = client.submit_many(jobs)
        assert client.restarted is not None
        client.restarted.join()
        ids = [ticket.id for ticket in tickets]
        assert len(set(ids)) == 4
        assert sorted(own_redis.queued_ids(client.settings.queue)) == sorted(ids)
        assert client.sends > 4  # the second send failed at least once and was retried
        thread, outcome = wait_in_thread(tickets[1], timeout=5)
        store(own_redis.url, tickets[1].id, ANSWER.model_dump(), states.SUCCESS)
        written = time.monotonic()
        thread.join(10)
        assert outcome.get("value") == ANSWER, outcome
        assert time.monotonic() - written < 0.5  # its retried send subscribed to its result


def test_submit_many_giving_up_says_what_was_enqueued(own_redis: RestartableRedis) -> None:
    jobs = [{**BASE, "prompt": f"{SECRET} question {n}"} for n in range(3)]
    with OutageAfterFirstSend(own_redis, None, submit_retry_s=0.5) as client:
        with pytest.raises(BrokerUnavailable, match=r"unavailable for 0\.5 s") as info:
            client.submit_many(jobs)
        own_redis.start()
        assert len(info.value.enqueued) == 1
        assert own_redis.queued_ids(client.settings.queue) == list(info.value.enqueued)


@pytest.mark.parametrize(("down_s", "settle_s"), [(0.5, 0.0), (2.0, 1.2)])
def test_get_survives_a_restart(
    own_redis: RestartableRedis, down_s: float, settle_s: float
) -> None:
    with outage_client(own_redis.url) as client:
        ticket = client.submit(BASE["prompt"], model=MODEL)
        thread, outcome = wait_in_thread(ticket, timeout=15)
        own_redis.stop()
        time.sleep(down_s)
        own_redis.start()
        time.sleep(settle_s)  # the wait is back on its subscription by then
        store(own_redis.url, ticket.id, ANSWER.model_dump(), states.SUCCESS)
        written = time.monotonic()
        thread.join(20)
        assert outcome.get("value") == ANSWER, outcome
        # Noticed promptly: by a read (at most 0.5 s apart) straight after the restart, and by
        # the renewed subscription (not the 1 s re-read) once the wait has settled again.
        assert time.monotonic() - written < (1.0 if settle_s == 0 else 0.5)


def test_get_reports_a_stored_failure_written_after_a_restart(own_redis: RestartableRedis) -> None:
    with outage_client(own_redis.url) as client:
        ticket = client.submit(BASE["prompt"], model=MODEL)
        thread, outcome = wait_in_thread(ticket, timeout=15)
        own_redis.stop()
        time.sleep(1.0)
        own_redis.start()
        failure = UpstreamStatusError("upstream returned 500 after 5 attempts", 500)
        store(own_redis.url, ticket.id, failure, states.FAILURE)
        thread.join(20)
        error = outcome.get("error")
        assert isinstance(error, RequestFailed) and not isinstance(error, RequestTimeout)
        reason = "UpstreamStatusError: upstream returned 500 after 5 attempts"
        assert str(error) == f"request {ticket.id} failed: {reason}"


def test_get_times_out_cleanly_while_redis_is_down(own_redis: RestartableRedis) -> None:
    with outage_client(own_redis.url) as client:
        ticket = client.submit(BASE["prompt"], model=MODEL)
        thread, outcome = wait_in_thread(ticket, timeout=2.0)
        own_redis.stop()
        thread.join(10)
        error = outcome.get("error")
        assert isinstance(error, RequestTimeout), outcome
        assert 1.9 <= float(outcome["elapsed"]) < 3.0  # type: ignore[arg-type]
        assert f"within 2.0 s (Redis at {own_redis.url} unavailable: ConnectionError" in str(error)
        with pytest.raises(BrokerUnavailable, match="Connection refused"):
            ticket.ready()


def test_get_without_an_outage(client: Client, redis_url: str) -> None:
    ticket = client.submit(BASE["prompt"], model=MODEL)
    with pytest.raises(RequestTimeout, match=r"within 0.3 s$"):
        ticket.get(timeout=0.3)
    assert not ticket.ready()
    store(redis_url, ticket.id, ANSWER.model_dump(), states.SUCCESS)
    started = time.monotonic()
    assert ticket.get(timeout=5) == ANSWER
    assert time.monotonic() - started < 0.5
    assert client.ticket(ticket.id).get(timeout=5) == ANSWER


def test_sending_subscribes_nothing(client: Client, redis_url: str) -> None:
    """Celery subscribes every sent task's result channel for ``AsyncResult.get``; clients
    here wait through their own listener, so that subscription (a command per send, and a
    socket filling with results nobody reads) is off."""
    r = redis.Redis.from_url(redis_url)

    def subscribes() -> int:
        return int(r.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0))

    before = subscribes()
    client.submit_many({"prompt": f"{BASE['prompt']} {n}", "model": MODEL} for n in range(5))
    assert subscribes() == before
    r.close()
