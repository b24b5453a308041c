"""The exact cache: keys, TTL rules and per-request controls, unit by unit and through real
processes (Redis, a Celery worker, the fake upstream over HTTP), plus the operator's controls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import redis
from starlette.datastructures import Headers

from producer import CacheControl, Client, InvalidRequest, load_settings, request_key
from producer import validate_request as validate
from producer._keys import DEDUP_PREFIX, EXACT_PREFIX
from producer.api.controls import controls
from producer.api.errors import ApiError
from worker.cache.caches import served
from worker.cache.policy import about_present, plan
from worker.dev.fakellm import expected_answer

SETTINGS = load_settings()
MODEL = "gpt-4o-mini"
DAY = 86_400


def request(**fields):
    return validate(SETTINGS, {"model": MODEL, **fields})


def plan_of(settings=SETTINGS, **fields):
    req = request(**fields)
    return plan(req, request_key(req), settings)


# --- unit: keys, TTL rules, controls --------------------------------------------------------


def test_exact_key_changes_with_everything_that_changes_the_answer():
    base = {"prompt": "How do I true a wheel?", "system": "Be brief."}
    key = plan_of(**base).exact_key
    variants = [
        {**base, "model": "gpt-4o"},
        {**base, "system": "Be thorough."},
        {**base, "max_tokens": 50},
        {**base, "params": {"seed": 3}},
        {**base, "tenant": "acme"},
        {**base, "cache": {"namespace": "faq"}},
        {**base, "prompt": "How do I true a wheel? "[:-2]},
    ]
    keys = {plan_of(**v).exact_key for v in variants}
    assert key not in keys and len(keys) == len(variants)
    assert plan_of(**base).exact_key == key  # and is stable
    assert "wheel" not in key and key.startswith(EXACT_PREFIX)


def test_semantic_scope_holds_the_conversation_but_not_the_last_turn():
    def chat(*turns: str, **fields):
        roles = ["user", "assistant"] * len(turns)
        messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]
        return plan_of(messages=messages, temperature=0, **fields)

    first = chat("Tell me about Lisbon.", "Lisbon is ...", "What about its trams?")
    same_history = chat("Tell me about Lisbon.", "Lisbon is ...", "And the trams there?")
    other_history = chat("Tell me about Porto.", "Porto is ...", "What about its trams?")
    assert first.scope == same_history.scope and first.text == "What about its trams?"
    assert first.scope != other_history.scope
    assert first.scope != chat("What about its trams?").scope
    ends_with_assistant = chat("Hi", "Hello!")
    assert ends_with_assistant.scope is None


@pytest.mark.parametrize(
    ("prompt", "present"),
    [
        ("What is the weather today?", True),
        ("Who is the current prime minister of Japan?", True),
        ("What's the latest iPhone?", True),
        ("What happened this week in tech?", True),
        ("Which is the best laptop right now?", True),
        ("How do I boil an egg?", False),
        ("What is the capital of Portugal?", False),
        ("Explain the knowledge of nowness in art", False),
    ],
)
def test_prompts_about_the_present_are_recognised(prompt, present):
    assert about_present(prompt) is present


def test_ttl_rules():
    assert plan_of(prompt="What is the weather today?").ttl_s == SETTINGS.cache_present_ttl_s
    assert plan_of(prompt="How do I boil an egg?").ttl_s == SETTINGS.cache_ttl_s == 7 * DAY
    assert SETTINGS.cache_present_ttl_s == 3600 and SETTINGS.cache_max_ttl_s == 14 * DAY
    own = plan_of(prompt="What is the weather today?", cache={"ttl": 5 * DAY})
    assert own.ttl_s == 5 * DAY  # the request's own ttl wins over the rule ...
    capped = plan_of(prompt="How do I boil an egg?", cache={"ttl": 60 * DAY})
    assert capped.ttl_s == 14 * DAY  # ... but never the hard cap
    custom = load_settings(cache_ttl_s=500, cache_present_ttl_s=50, cache_max_ttl_s=400)
    assert plan_of(custom, prompt="How do I boil an egg?").ttl_s == 400
    assert plan_of(custom, prompt="Any news today?").ttl_s == 50


def test_controls_and_sampling_rules():
    plain = plan_of(prompt="q")
    assert plain.read and plain.store and not plain.keep_dedup  # the cache serves repeats
    assert not plan_of(prompt="q", cache="no_cache").read
    assert plan_of(prompt="q", cache="no_cache").store
    assert not plan_of(prompt="q", cache="no_store").store
    assert plan_of(prompt="q", cache="no_store").read
    for uncached in (
        plan_of(prompt="q", cache="sensitive"),
        plan_of(prompt="q", temperature=0.7),
        plan_of(prompt="q", cache={"namespace": "x", "sensitive": True}),
    ):
        assert not (uncached.read or uncached.store or uncached.keep_dedup or uncached.exact_key)
    opted = plan_of(prompt="q", temperature=0.7, cache="sampled")
    assert opted.read and opted.store
    off = plan_of(load_settings(cache=False), prompt="q")
    assert not (off.read or off.store) and off.keep_dedup  # dedup as before


def test_cache_option_forms_and_errors():
    assert request(prompt="q", cache="no_cache, no_store").cache == CacheControl(
        no_cache=True, no_store=True
    )
    assert request(prompt="q", cache=CacheControl(ttl=9)).cache == CacheControl(ttl=9)
    chat = request(messages=[{"role": "user", "content": "q"}], cache={"namespace": "faq"})
    assert chat.cache == CacheControl(namespace="faq")
    assert validate(SETTINGS, chat.model_dump()) == chat  # what the worker sees again
    for bad, words in [
        ("no-cache", "cache: must be one or more of"),
        ({"ttl": 0}, "cache: ttl:"),
        ({"namspace": "x"}, "cache: namspace: unknown field"),
        ({"no_store": "yes"}, "cache: no_store:"),
        (3, "cache: must be an object or a string"),
    ]:
        with pytest.raises(InvalidRequest, match=words):
            request(prompt="q", cache=bad)


def test_http_cache_controls():
    fields = {"coalesce": {"cache": {"ttl": 60}}, "temperature": 0}
    headers = Headers(
        {
            "x-coalesce-cache": "no_store",
            "x-coalesce-cache-namespace": "faq",
            "x-coalesce-cache-ttl": "30",
            "cache-control": "no-cache",
        }
    )
    control, _ = controls(headers, fields)
    assert control == {"no_store": True, "namespace": "faq", "ttl": 60, "no_cache": True}
    assert "coalesce" not in fields  # never forwarded upstream
    sensitive = controls(Headers({}), {"coalesce": {"cache": "sensitive"}})
    assert sensitive == ({"sensitive": True}, None)
    assert controls(Headers({}), {}) == (None, None)
    for bad in ({"x-coalesce-cache": "forever"}, {"x-coalesce-cache-ttl": "soon"}):
        with pytest.raises(ApiError):
            controls(Headers(bad), {})
    with pytest.raises(ApiError):
        controls(Headers({}), {"coalesce": {"budget": 1}})
    tags_fields = {"coalesce": {"tags": {"user": "u42"}}}
    tagged = controls(Headers({"x-coalesce-tags": "feature=faq, user=u1"}), tags_fields)
    assert tagged == (None, {"feature": "faq", "user": "u42"})
    with pytest.raises(ApiError, match="x-coalesce-tags"):
        controls(Headers({"x-coalesce-tags": "feature"}), {})


def test_a_hit_costs_nothing():
    from producer import Answer

    original = Answer(text="t", source="batched", model=MODEL, batch_id="b", batch_size=8,
                      prompt_tokens=10, completion_tokens=5, cost_usd=0.01)  # fmt: skip
    hit = served(original, "semantic", 0.93)
    assert (hit.source, hit.similarity, hit.cost_usd, hit.prompt_tokens) == ("semantic", 0.93, 0, 0)
    assert hit.text == "t" and hit.batch_id is None


# --- through real processes -----------------------------------------------------------------

pytest_integration = pytest.mark.integration


def fake_stats(fake) -> dict:
    return httpx.get(fake.url.removesuffix("/v1") + "/stats", timeout=5).json()


def calls(fake) -> int:
    return int(fake_stats(fake)["calls"])


def ask(client: Client, prompt: str, **fields):
    return client.submit(prompt, model=fields.pop("model", MODEL), **fields).get(timeout=30)


@pytest.fixture
def rig(fake_llm, worker_env, workers, client, redis_url):
    fake = fake_llm(reject_word="forbidden")
    workers(worker_env(fake.url, window_ms=20))
    return fake, client, redis.Redis.from_url(redis_url)


@pytest_integration
def test_repeats_are_served_from_the_cache_and_any_change_misses(rig):
    fake, client, _ = rig
    question = "How tight should a bike chain be?"
    first = ask(client, question)
    assert first.source in ("single", "batched") and calls(fake) == 1
    again = ask(client, question)
    assert (again.source, again.text, again.cost_usd) == ("cache", first.text, 0.0)
    assert calls(fake) == 1
    changes = [
        {"model": "gpt-4o"},
        {"system": "Answer like a pirate."},
        {"max_tokens": 40},
        {"tenant": "acme"},
        {"cache": {"namespace": "faq"}},
    ]
    for n, change in enumerate(changes, start=2):
        answer = ask(client, question, **change)
        assert answer.source != "cache", change
        assert calls(fake) == n, change
        expected = expected_answer(change.get("model", MODEL), change.get("system"), question)
        assert answer.text and expected.startswith(answer.text)  # max_tokens may cut it
    # A batch-eligible chat with a different parameter, and a conversation with another past.
    body = [{"role": "user", "content": question}]
    assert client.chat(body, model=MODEL, temperature=0).get(timeout=30).source == "cache"
    assert client.chat(body, model=MODEL, temperature=0, seed=7).get(timeout=30).source != "cache"
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    talk = client.chat([*history, *body], model=MODEL, temperature=0).get(timeout=30)
    assert talk.source == "passthrough"
    other = [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hello!"}]
    assert (
        client.chat([*other, *body], model=MODEL, temperature=0).get(timeout=30).source != "cache"
    )
    repeat = client.chat([*history, *body], model=MODEL, temperature=0).get(timeout=30)
    assert (repeat.source, repeat.text) == ("cache", talk.text)


@pytest_integration
def test_ttl_rules_reach_redis(fake_llm, worker_env, workers, client, redis_url):
    fake = fake_llm()
    env = worker_env(
        fake.url, window_ms=20, cache_ttl_s=5000, cache_present_ttl_s=100, cache_max_ttl_s=8000
    )
    workers(env)
    settings = load_settings(
        redis_url=redis_url, cache_ttl_s=5000, cache_present_ttl_s=100, cache_max_ttl_s=8000
    )
    r = redis.Redis.from_url(redis_url)
    cases = [
        ("How do I patch an inner tube?", {}, 5000),
        ("Which bike shops are open today?", {}, 100),
        ("How do I fit mudguards?", {"cache": {"ttl": 40}}, 40),
        ("How do I wax a chain?", {"cache": {"ttl": 90_000}}, 8000),
    ]
    for prompt, extra, ttl in cases:
        ask(client, prompt, **extra)
        req = request(prompt=prompt, **extra)
        key = plan(req, request_key(req), settings).exact_key
        left_s = r.pttl(key) / 1000
        assert ttl - 10 <= left_s <= ttl, (prompt, left_s)


@pytest_integration
def test_per_request_controls(rig):
    fake, client, r = rig
    q = "What size spanner fits a pedal?"
    first = ask(client, q)
    n = calls(fake)
    fresh = ask(client, q, cache="no_cache")  # asks again even though an answer is cached
    assert fresh.source != "cache" and calls(fake) == n + 1
    assert ask(client, q).source == "cache"

    ask(client, "How do I index gears?", cache="no_store")
    n = calls(fake)
    assert ask(client, "How do I index gears?").source != "cache" and calls(fake) == n + 1

    before = set(r.scan_iter(f"{EXACT_PREFIX}*")) | set(r.scan_iter(f"{DEDUP_PREFIX}*:answer"))
    secret = ask(client, "My card number is 4111 1111 1111 1111; is it valid?", cache="sensitive")
    after = set(r.scan_iter(f"{EXACT_PREFIX}*")) | set(r.scan_iter(f"{DEDUP_PREFIX}*:answer"))
    assert secret.source != "cache" and after == before  # nothing of it was kept anywhere
    n = calls(fake)
    again = ask(client, "My card number is 4111 1111 1111 1111; is it valid?", cache="sensitive")
    assert again.source != "cache" and calls(fake) == n + 1

    n = calls(fake)
    warm = [ask(client, "Name a colour.", temperature=0.8) for _ in range(2)]
    assert [a.source for a in warm].count("cache") == 0 and calls(fake) == n + 2
    ask(client, "Name a shape.", temperature=0.8, cache="sampled")
    assert ask(client, "Name a shape.", temperature=0.8, cache="sampled").source == "cache"

    assert ask(client, q, cache={"namespace": "faq"}).source != "cache"
    assert ask(client, q, cache={"namespace": "faq"}).source == "cache"
    assert first.text == ask(client, q).text

    # A failure is never cached: the same request is asked again.
    for _ in range(2):
        with pytest.raises(Exception, match="rejected"):
            ask(client, "Tell me the forbidden word.")
    assert fake_stats(fake)["rejected"] == 2


@pytest_integration
def test_stats_and_clear(rig, redis_url):
    _, client, _ = rig
    for namespace in ("faq", "support"):
        for q in ("How do I oil a chain?", "How do I adjust brakes?"):
            ask(client, q, cache={"namespace": namespace})
            assert ask(client, q, cache={"namespace": namespace}).source == "cache"
    stats = _settled_stats(client, hits=4)
    assert (stats.exact_entries, stats.exact_hits, stats.exact_misses) == (4, 4, 4)
    assert stats.hit_rate == 0.5 and stats.saved_usd > 0
    assert client.cache_stats(namespace="faq").exact_entries == 2
    assert client.clear_cache(namespace="faq") == 2
    assert ask(client, "How do I oil a chain?", cache={"namespace": "faq"}).source != "cache"
    assert ask(client, "How do I oil a chain?", cache={"namespace": "support"}).source == "cache"
    assert client.clear_cache(tenant="someone-else") == 0

    env = {**os.environ, "COALESCE_REDIS_URL": redis_url}
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "cache", "stats", "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    shown = json.loads(out.stdout)
    assert shown["exact_entries"] == 3 and shown["exact_hits"] >= 4
    cleared = subprocess.run(
        [sys.executable, "-m", "worker.cli", "cache", "clear"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "removed" in cleared.stdout
    assert client.cache_stats().exact_entries == 0
    assert ask(client, "How do I adjust brakes?", cache={"namespace": "support"}).source != "cache"


def _settled_stats(client: Client, *, hits: int):
    """The stats once the workers' counters (sent once a second) show ``hits``."""
    deadline = time.monotonic() + 10
    while True:
        stats = client.cache_stats()
        if stats.exact_hits >= hits or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


@pytest_integration
def test_semantic_cache_shared_by_two_worker_processes(
    fake_llm, worker_env, workers, client, redis_url
):
    fake = fake_llm()
    env = worker_env(fake.url, window_ms=20, semantic_cache="true")
    first_worker = workers(env, name="w1")
    question = "How do I reset the password of my account?"
    first = ask(client, question)
    assert first.source in ("single", "batched") and calls(fake) == 1

    # A process started later loads the shared entries from Redis ...
    first_worker.stop()
    workers(env, name="w2")
    workers(env, name="w3")
    time.sleep(1.0)  # both load the log in the background, within milliseconds here
    for paraphrase in (
        "how do I reset the password of my account",
        "How do I reset the password of my account ?!",
    ):
        hit = ask(client, paraphrase)
        assert (hit.source, hit.text, hit.cost_usd) == ("semantic", first.text, 0.0)
        assert hit.similarity is not None and hit.similarity >= load_settings().semantic_threshold
    assert calls(fake) == 1

    # ... and an answer either of them stores is served by both (six lookups spread over two).
    second = ask(client, "Can I change the delivery address of an order?")
    assert second.source != "semantic"
    hits = [ask(client, "can i change the delivery address of an order").source for _ in range(6)]
    assert hits == ["semantic"] * 6

    # The guards: another order number, amount or date never hits.
    ask(client, "Please cancel order 732201349959 today.")
    n = calls(fake)
    for other in (
        "Please cancel order 113542617735902 today.",
        "Please cancel order 732201349959 tomorrow.",
        "Please don't cancel order 732201349959 today.",
    ):
        assert ask(client, other).source not in ("semantic", "cache")
    assert calls(fake) == n + 3
    stats = client.cache_stats()
    assert stats.semantic_entries >= 5
