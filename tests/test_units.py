"""Unit tests for the pure parts: request keys, validation, settings, pricing and grouping."""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import SecretStr

import producer
from producer import ConfigError, InvalidRequest, Request, build_request, load_settings
from producer import request_key as key_of
from worker.batching.grouping import group_key
from worker.pricing import split_prompt, split_total

MODEL = "gpt-4o-mini"
BASE: dict[str, Any] = {
    "prompt": "Where is my order 1234?",
    "model": MODEL,
    "system": "You are the shop's support assistant.",
    "temperature": 0.2,
    "max_tokens": 200,
    "tenant": "acme",
}


def req(**changes: Any) -> Request:
    return Request(**{**BASE, **changes})


# --- request_key -----------------------------------------------------------------------------


def test_key_equal_for_identical_requests() -> None:
    assert key_of(req()) == key_of(req())


def test_key_equal_for_nfc_and_nfd_forms() -> None:
    text = "Café crème, naïve Zoë?"
    nfc, nfd = unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text)
    assert nfc != nfd
    assert key_of(req(prompt=nfc)) == key_of(req(prompt=nfd))
    assert key_of(req(system=nfc)) == key_of(req(system=nfd))


def test_key_ignores_surrounding_whitespace() -> None:
    assert key_of(req(prompt="  Where is my order 1234?\n\t")) == key_of(req())
    assert key_of(req(system="\nYou are the shop's support assistant.  ")) == key_of(req())


def test_key_system_none_equals_empty() -> None:
    assert key_of(req(system=None)) == key_of(req(system=""))


def test_key_temperature_int_equals_float() -> None:
    assert key_of(req(temperature=0)) == key_of(req(temperature=0.0))
    assert key_of(req(temperature=1)) == key_of(req(temperature=1.0))


def test_key_negative_zero_temperature_equals_zero() -> None:
    assert key_of(req(temperature=-0.0)) == key_of(req(temperature=0.0))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tenant", "globex"),
        ("tenant", None),
        ("model", "gpt-4o"),
        ("system", "You are a pirate."),
        ("system", None),
        ("prompt", "Where is my order 1235?"),
        ("temperature", 0.3),
        ("max_tokens", 201),
        ("max_tokens", None),
    ],
)
def test_key_differs_when_a_field_differs(field: str, value: object) -> None:
    assert key_of(req(**{field: value})) != key_of(req())


def _norm(value: str | None) -> str:
    return unicodedata.normalize("NFC", value or "").strip()


MODEL_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._:/", min_size=1, max_size=20)
PROMPTS = st.text(min_size=1, max_size=40).filter(lambda s: bool(s.strip()))
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "prompt": PROMPTS,
    "model": MODEL_NAMES,
    "system": st.none() | st.text(max_size=40),
    "temperature": st.floats(min_value=0.0, max_value=2.0) | st.integers(0, 2),
    "max_tokens": st.none() | st.integers(1, 1_000_000),
    "tenant": st.none() | st.text(max_size=20),
}


def _same_for_key(field: str, a: Any, b: Any) -> bool:
    """Whether two values of ``field`` are meant to share a key (the documented equivalences)."""
    if field in ("prompt", "system"):
        return _norm(a) == _norm(b)
    if field == "tenant":
        return (a or "") == (b or "")
    if field == "temperature":
        return float(a) == float(b)
    return bool(a == b)


@given(data=st.data(), field=st.sampled_from(sorted(FIELD_VALUES)))
def test_key_property_one_field_difference_never_shares_key(
    data: st.DataObject, field: str
) -> None:
    base = {name: data.draw(strategy, label=name) for name, strategy in FIELD_VALUES.items()}
    other = data.draw(FIELD_VALUES[field], label=f"other {field}")
    assume(not _same_for_key(field, base[field], other))
    assert key_of(Request(**base)) != key_of(Request(**{**base, field: other}))


@given(text=PROMPTS)
def test_key_property_normalisation_form_never_matters(text: str) -> None:
    nfd = unicodedata.normalize("NFD", text)
    assume(nfd.strip())
    assert key_of(req(prompt=nfd)) == key_of(req(prompt=unicodedata.normalize("NFC", text)))


# --- build_request / Request ------------------------------------------------------------------


@pytest.fixture
def settings() -> producer.Settings:
    return load_settings(max_prompt_chars=50)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "  \n\t "}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": "3"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": ""}, "model"),
        ({"model": "gpt 4"}, "model"),
        ({"tenant": 7}, "tenant"),
        ({"top_q": 1}, "top_q"),
    ],
)
def test_build_request_rejects_bad_input(
    settings: producer.Settings, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        build_request(settings, {**BASE, **changes})
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_unknown_field_is_forbidden(settings: producer.Settings) -> None:
    with pytest.raises(InvalidRequest, match=r"top_q.*(extra|not permitted)"):
        build_request(settings, {**BASE, "top_q": 1})


def test_prompt_over_limit_names_the_setting(settings: producer.Settings) -> None:
    build_request(settings, {**BASE, "prompt": "x" * 50})  # exactly at the limit is fine
    with pytest.raises(InvalidRequest, match="COALESCE_MAX_PROMPT_CHARS") as info:
        build_request(settings, {**BASE, "prompt": "x" * 51})
    assert "prompt" in str(info.value) and isinstance(info.value, ValueError)


def test_build_request_checks_size_of_a_ready_request(settings: producer.Settings) -> None:
    with pytest.raises(InvalidRequest, match="COALESCE_MAX_PROMPT_CHARS"):
        build_request(settings, req(prompt="y" * 51))


def test_build_request_accepts_valid_input(settings: producer.Settings) -> None:
    request = build_request(settings, BASE)
    assert request == Request(**BASE)
    minimal = build_request(settings, {"prompt": "Hi there", "model": MODEL})
    assert (minimal.system, minimal.temperature, minimal.max_tokens, minimal.tenant) == (
        None,
        0.0,
        None,
        None,
    )


# --- settings ---------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.startswith(("COALESCE_", "OPENAI_")):
            monkeypatch.delenv(name)
    yield monkeypatch


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COALESCE_WINDOW_MS", "abc"),
        ("COALESCE_MAX_BATCH", "0"),
        ("COALESCE_MAX_BATCH", "257"),
        ("COALESCE_REDIS_URL", "http://x"),
        ("COALESCE_UPSTREAM_URL", "ftp://x"),
        ("COALESCE_LEDGER_RAW_TTL_S", "10"),
        ("COALESCE_REQUEST_TIMEOUT_S", "-1"),
        ("COALESCE_LOG_PROMPTS", "maybe"),
    ],
)
def test_bad_setting_raises_config_error_naming_it(
    clean_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_several_bad_settings_are_all_named(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("COALESCE_WINDOW_MS", "abc")
    clean_env.setenv("COALESCE_REDIS_URL", "http://x")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "COALESCE_WINDOW_MS" in str(info.value) and "COALESCE_REDIS_URL" in str(info.value)


def test_bad_openai_base_url_is_named_as_set(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPENAI_BASE_URL", "ftp://x")
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        load_settings()


def test_openai_variables_used_when_coalesce_ones_absent(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPENAI_BASE_URL", "http://openai.example/v1/")
    clean_env.setenv("OPENAI_API_KEY", "sk-openai-1")
    s = load_settings()
    assert s.upstream_url == "http://openai.example/v1"
    assert s.upstream_api_key is not None
    assert s.upstream_api_key.get_secret_value() == "sk-openai-1"


def test_coalesce_variables_win_over_openai_ones(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPENAI_BASE_URL", "http://openai.example/v1")
    clean_env.setenv("OPENAI_API_KEY", "sk-openai-1")
    clean_env.setenv("COALESCE_UPSTREAM_URL", "http://coalesce.example/v1")
    clean_env.setenv("COALESCE_UPSTREAM_API_KEY", "sk-coalesce-2")
    s = load_settings()
    assert s.upstream_url == "http://coalesce.example/v1"
    assert s.upstream_api_key is not None
    assert s.upstream_api_key.get_secret_value() == "sk-coalesce-2"


def test_api_key_is_secret_everywhere_it_is_shown(clean_env: pytest.MonkeyPatch) -> None:
    secret = "sk-SENTINEL-do-not-leak-42"
    clean_env.setenv("OPENAI_API_KEY", secret)
    s = load_settings()
    assert isinstance(s.upstream_api_key, SecretStr)
    assert s.upstream_api_key.get_secret_value() == secret
    assert secret not in repr(s) and secret not in str(s)
    assert secret not in s.model_dump_json()
    clean_env.setenv("COALESCE_WINDOW_MS", "abc")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert secret not in str(info.value)


def test_defaults_are_valid_for_a_worker(clean_env: pytest.MonkeyPatch) -> None:
    load_settings().check_worker()
    load_settings(max_batch=16, worker_concurrency=32).check_worker()


@pytest.mark.parametrize(("visibility", "request_timeout"), [(75.0, 75.0), (60.0, 75.0)])
def test_check_worker_visibility_must_exceed_request_timeout(
    clean_env: pytest.MonkeyPatch, visibility: float, request_timeout: float
) -> None:
    s = load_settings(visibility_timeout_s=visibility, request_timeout_s=request_timeout)
    with pytest.raises(ConfigError, match="COALESCE_VISIBILITY_TIMEOUT_S"):
        s.check_worker()


def test_check_worker_concurrency_must_be_twice_max_batch(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings(max_batch=16, worker_concurrency=31)
    with pytest.raises(ConfigError, match="COALESCE_WORKER_CONCURRENCY"):
        s.check_worker()


# --- pricing ----------------------------------------------------------------------------------


@given(
    total=st.integers(0, 10**12),
    weights=st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=40),
)
def test_split_total_sums_exactly_and_is_proportional(total: int, weights: list[float]) -> None:
    parts = split_total(total, weights)
    assert len(parts) == len(weights)
    assert sum(parts) == total
    assert all(part >= 0 for part in parts)
    weight_sum = sum(weights)
    if weight_sum > 0:
        for part, weight in zip(parts, weights, strict=True):
            assert abs(part - total * weight / weight_sum) < 1 + 1e-6
    else:
        assert max(parts) - min(parts) <= 1


def test_split_total_examples() -> None:
    assert split_total(10, [1, 1]) == [5, 5]
    assert split_total(10, [1, 1, 1]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert split_total(7, [0, 1]) == [0, 7]
    assert split_total(5, []) == []


@given(
    shared=st.integers(0, 5_000),
    questions=st.lists(st.integers(0, 2_000), min_size=1, max_size=20),
)
def test_split_prompt_charges_shared_part_evenly(shared: int, questions: list[int]) -> None:
    total = shared + sum(questions)
    parts = split_prompt(total, questions)
    assert sum(parts) == total
    extra = [part - own for part, own in zip(parts, questions, strict=True)]
    assert max(extra) - min(extra) <= 1
    assert all(abs(e - shared / len(questions)) < 1 for e in extra)


def test_split_prompt_example() -> None:
    # 30 shared tokens over three questions of 10, 20 and 40 tokens.
    assert split_prompt(100, [10, 20, 40]) == [20, 30, 50]


# --- grouping ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tenant", "globex"),
        ("tenant", None),
        ("model", "gpt-4o"),
        ("system", "You are a pirate."),
        ("system", None),
        ("temperature", 0.7),
        ("max_tokens", 50),
        ("max_tokens", None),
    ],
)
def test_group_key_differs_when_call_parameters_differ(field: str, value: object) -> None:
    assert group_key(req(**{field: value})) != group_key(req())


def test_group_key_equal_for_different_questions() -> None:
    assert group_key(req(prompt="Why is the sky blue?")) == group_key(req())
    assert group_key(req(temperature=0, system=None)) == group_key(req(temperature=0.0, system=""))


def test_token_counts_are_remembered_within_bounds() -> None:
    """Repeated texts (a shared system prompt) are counted once; huge texts are not kept."""
    import tiktoken

    from worker import tokens

    encoding = tiktoken.get_encoding(tokens.ENCODING)
    short, huge = "What is the capital of France? " * 10, "word " * 20_000
    for text in (short, short, huge, huge):
        assert tokens.count_tokens(text) == len(encoding.encode(text, disallowed_special=()))
    info = tokens._count_memo.cache_info()
    assert info.hits >= 1 and info.maxsize == tokens._MEMO_ENTRIES
    assert len(huge) > tokens._MEMO_MAX_CHARS  # counted directly, never stored


# -- task events, sent in batches (worker.consumer) ---------------------------------------------


class _StubHub:
    """Records what the consumer asks of Celery's event loop."""

    def __init__(self) -> None:
        self.soon: list[Any] = []
        self.later: list[tuple[float, Any]] = []

    def call_soon(self, callback: Any) -> None:
        self.soon.append(callback)

    def call_later(self, delay: float, callback: Any) -> None:
        self.later.append((delay, callback))


def _events_consumer() -> tuple[Any, _StubHub, list[int]]:
    from types import SimpleNamespace

    from worker.consumer import BatchedEventsConsumer

    consumer: Any = BatchedEventsConsumer.__new__(BatchedEventsConsumer)
    hub, flushes = _StubHub(), []
    consumer.hub = hub
    consumer.event_dispatcher = SimpleNamespace(buffer_limit=24)
    consumer._flush_events = lambda: flushes.append(1)
    return consumer, hub, flushes


def test_task_events_go_out_once_per_flush_interval_not_per_event() -> None:
    from worker.consumer import EVENT_BUFFER_LIMIT, EVENT_FLUSH_S

    consumer, hub, flushes = _events_consumer()
    for _ in range(100):  # a hundred events from task threads: one wake-up of the loop
        consumer.on_send_event_buffered()
    assert len(hub.soon) == 1 and not flushes
    hub.soon.pop()()  # on the loop: one timer, and the buffer may grow meanwhile
    assert [delay for delay, _ in hub.later] == [EVENT_FLUSH_S]
    assert consumer.event_dispatcher.buffer_limit == EVENT_BUFFER_LIMIT
    hub.later.pop()[1]()
    assert flushes == [1]
    consumer.on_send_event_buffered()  # the next event arms the next flush
    assert len(hub.soon) == 1


def test_a_flush_lost_with_the_loops_timers_is_asked_for_again() -> None:
    from worker.consumer import EVENT_FLUSH_LOST_S

    consumer, hub, _ = _events_consumer()
    consumer.on_send_event_buffered()
    hub.soon.clear()  # a reconnect cleared the loop's callbacks and timers
    consumer._armed_at -= EVENT_FLUSH_LOST_S + 0.1
    consumer.on_send_event_buffered()
    assert len(hub.soon) == 1
