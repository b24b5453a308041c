"""Budgets: rules, reserving at accept time, settling on the worker, soft-limit webhooks, 429s.

Everything runs against a real redis-server; clocks are injected so a period boundary is a
line of test code, and the webhook is received by a small real HTTP server.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from conftest import fast_settings

from producer import Client, ConfigError, Request, load_settings
from producer._budget import (
    ACTIVE,
    DEFAULT_ESTIMATE_USD,
    DUE,
    RESERVATIONS,
    Budgets,
    Rule,
    parse_rules,
    period_span,
)
from producer._exceptions import BudgetExceeded
from producer.api import create_app
from producer.api.errors import from_exception
from worker.dev.procs import Proc
from worker.ledger.budgets import BudgetKeeper, Crossing, settle_budget

JUNE_30_LATE = datetime(2025, 6, 30, 23, 59, 0, tzinfo=UTC).timestamp()
JULY_1_EARLY = datetime(2025, 7, 1, 0, 0, 5, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rds(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def rules(*specs: dict[str, Any]) -> tuple[Rule, ...]:
    return parse_rules(json.dumps(list(specs)))


def pair(
    rds: redis.Redis, specs: tuple[Rule, ...], clock: Clock, **keeper: Any
) -> tuple[Budgets, BudgetKeeper]:
    """A producer's Budgets and a worker's keeper sharing one clock (the worker has no rules of
    its own unless given: the reservation carries them)."""
    return Budgets(specs, rds, clock=clock), BudgetKeeper(rds, clock=clock, **keeper)


# --- rules ---------------------------------------------------------------------------------


def test_rules_parse_from_json_and_from_a_file(tmp_path: Path) -> None:
    text = json.dumps(
        [
            {"scope": "global", "period": "month", "hard_usd": 500},
            {"scope": "tenant:acme", "period": "day", "soft_usd": 5, "hard_usd": 10.0},
            {"scope": "tag:feature=support-reply", "period": "day", "soft_usd": 1.5},
        ]
    )
    parsed = parse_rules(text)
    assert parsed[0] == Rule("global", "month", None, 500.0)
    assert parsed[1] == Rule("tenant:acme", "day", 5.0, 10.0)
    assert parsed[2].matches("anyone", {"feature": "support-reply"})
    assert not parsed[2].matches("anyone", {"feature": "faq"})
    assert parsed[1].matches("acme", {}) and not parsed[1].matches("bolt", {})
    assert not parsed[1].matches(None, {})
    path = tmp_path / "budgets.json"
    path.write_text(text)
    assert parse_rules(f"@{path}") == parsed
    assert parse_rules("") == () and parse_rules("[]") == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not valid JSON"),
        ('{"scope": "global"}', "JSON list"),
        ('[{"scope": "global", "period": "week", "hard_usd": 1}]', "rule 0: period"),
        ('[{"scope": "global", "period": "day"}]', "rule 0: set soft_usd, hard_usd"),
        ('[{"scope": "team:x", "period": "day", "hard_usd": 1}]', "rule 0: scope 'team:x'"),
        ('[{"scope": "tenant:", "period": "day", "hard_usd": 1}]', "rule 0: scope"),
        ('[{"scope": "tag:feature", "period": "day", "hard_usd": 1}]', "rule 0: scope"),
        ('[{"scope": "global", "period": "day", "hard_usd": -1}]', "rule 0: hard_usd must not"),
        ('[{"scope": "global", "period": "day", "hard_usd": "9"}]', "rule 0: hard_usd must be"),
        ('[{"scope": "global", "period": "day", "soft_usd": 5, "hard_usd": 2}]', "exceed"),
        ('[{"scope": "global", "period": "day", "hard": 2}]', "unknown field 'hard'"),
        (
            '[{"scope": "global", "period": "day", "hard_usd": 2},'
            ' {"scope": "global", "period": "day", "soft_usd": 1}]',
            "rule 1: repeats rule 0",
        ),
        ("@/nonexistent/budgets.json", "cannot read /nonexistent/budgets.json"),
    ],
)
def test_invalid_rules_name_the_variable_and_the_rule(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match="COALESCE_BUDGETS") as caught:
        parse_rules(text)
    assert problem in str(caught.value)


def test_periods_are_utc_days_and_months() -> None:
    tag, start, end = period_span("day", JUNE_30_LATE)
    assert tag == "2025-06-30" and end - start == 86_400 and end == JULY_1_EARLY - 5
    tag, start, end = period_span("month", JUNE_30_LATE)
    assert tag == "2025-06" and end == JULY_1_EARLY - 5
    december = datetime(2025, 12, 31, 12, tzinfo=UTC).timestamp()
    assert period_span("month", december)[0] == "2025-12"
    assert period_span("month", december)[2] == datetime(2026, 1, 1, tzinfo=UTC).timestamp()


# --- reserving and settling ----------------------------------------------------------------


def test_hard_limit_rejects_only_that_tenant(rds: redis.Redis) -> None:
    clock = Clock(JUNE_30_LATE - 3600)
    specs = rules(
        {"scope": "tenant:acme", "period": "day", "hard_usd": 0.01},
        {"scope": "global", "period": "day", "hard_usd": 100},
    )
    budgets, keeper = pair(rds, specs, clock)
    # Two requests in flight hold $0.001 each and cost $0.006 each: the stated overshoot bound
    # is 2 x ($0.006 - $0.001) past the limit.
    for i in range(2):
        assert budgets.reserve(f"a{i}", "acme", None) is not None
    for i in range(2):
        keeper.settle(f"a{i}", "acme", None, 0.006, "gpt-4o-mini")
    with pytest.raises(BudgetExceeded) as caught:
        budgets.reserve("a-over", "acme", None)
    error = caught.value
    assert str(error) == (
        "budget exceeded: tenant acme spent $0.0120 of its $0.0100 daily hard limit; "
        "resets at 00:00 UTC"
    )
    assert (error.scope, error.period, error.resets_at) == ("tenant:acme", "day", JULY_1_EARLY - 5)
    assert rds.hget(RESERVATIONS, "a-over") is None  # nothing held for a refused request
    other = budgets.reserve("b1", "bolt", {"feature": "x"})
    assert other is not None and [h.rule for h in other.holds] == ["global/day"]
    acme, global_ = (budgets.usage(rule) for rule in specs)
    assert acme.spent_usd == pytest.approx(0.012) and acme.reserved_usd == 0
    assert global_.reserved_usd > 0 and global_.requests == 2


def test_in_flight_reservations_count_against_the_hard_limit(rds: redis.Redis) -> None:
    clock = Clock(JUNE_30_LATE - 3600)
    budgets = Budgets(
        rules({"scope": "global", "period": "day", "hard_usd": 0.0035}), rds, clock=clock
    )
    held = [budgets.reserve(f"t{i}", None, None) for i in range(3)]  # 3 x $0.001 estimate
    assert all(held)
    with pytest.raises(BudgetExceeded, match=r"\(\+ \$0.0030 held by requests in flight\)"):
        budgets.reserve("t3", None, None)
    with pytest.raises(BudgetExceeded, match=r"all tenants together .* of the global"):
        budgets.reserve("t3", None, None)
    budgets.release(["t0"])
    assert budgets.reserve("t3", None, None) is not None


def test_a_submission_is_held_whole_or_not_at_all(rds: redis.Redis) -> None:
    clock = Clock(JUNE_30_LATE - 3600)
    specs = rules({"scope": "tenant:acme", "period": "day", "hard_usd": 0.0025})
    budgets = Budgets(specs, rds, clock=clock)
    with pytest.raises(BudgetExceeded, match=r"this request .* would pass it"):
        budgets.reserve_many([("x1", "acme", None), ("x2", "acme", None), ("x3", "acme", None)])
    assert rds.hlen(RESERVATIONS) == 0 and budgets.usage(specs[0]).reserved_usd == 0
    assert budgets.reserve_many([("y1", "bolt", None)]) == [None]  # no rule: no hold


def test_settle_moves_the_reservation_to_spent_and_learns_the_estimate(rds: redis.Redis) -> None:
    clock = Clock(JUNE_30_LATE - 3600)
    specs = rules(
        {"scope": "tenant:acme", "period": "day", "hard_usd": 50},
        {"scope": "tenant:acme", "period": "month", "hard_usd": 500},
    )
    budgets, keeper = pair(rds, specs, clock)
    first = budgets.reserve("r1", "acme", None)
    assert first is not None
    assert [h.estimate_usd for h in first.holds] == [DEFAULT_ESTIMATE_USD] * 2
    assert budgets.usage(specs[0]).reserved_usd == pytest.approx(DEFAULT_ESTIMATE_USD)
    assert keeper.settle("r1", "acme", None, 0.02, "m") == []
    for rule in specs:  # both periods, one average (same scope)
        usage = budgets.usage(rule)
        assert (usage.spent_usd, usage.reserved_usd, usage.requests) == (0.02, 0, 1)
    assert rds.hget(RESERVATIONS, "r1") is None and rds.zscore(DUE, "r1") is None
    second = budgets.reserve("r2", "acme", None)
    assert second is not None and second.holds[0].estimate_usd == pytest.approx(0.02)
    keeper.settle("r2", "acme", None, 0.0, "m")  # a cache hit costs 0 and pulls the average down
    third = budgets.reserve("r3", "acme", None)
    assert third is not None and third.holds[0].estimate_usd == pytest.approx(0.01)


def test_unpriced_requests_release_their_hold_and_are_counted_apart(
    rds: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(JUNE_30_LATE - 3600)
    specs = rules({"scope": "global", "period": "day", "hard_usd": 1})
    budgets, keeper = pair(rds, specs, clock)
    budgets.reserve("u1", None, None)
    keeper.settle("u1", None, None, None, "mystery-model")
    usage = budgets.usage(specs[0])
    assert (usage.spent_usd, usage.reserved_usd, usage.unpriced) == (0, 0, 1)
    assert "mystery-model has no price" in caplog.text


def test_a_hold_that_is_never_settled_runs_out_and_a_late_settle_still_counts(
    rds: redis.Redis,
) -> None:
    clock = Clock(JUNE_30_LATE - 7200)
    specs = rules({"scope": "tenant:acme", "period": "day", "hard_usd": 5})
    budgets = Budgets(specs, rds, hold_s=60, clock=clock)
    keeper = BudgetKeeper(rds, clock=clock)
    budgets.reserve("slow", "acme", None)
    budgets.reserve("lost", "acme", None)
    clock.now += 61
    budgets.reserve("next", "acme", None)  # every script sweeps due holds first
    usage = budgets.usage(specs[0])
    assert usage.reserved_usd == pytest.approx(DEFAULT_ESTIMATE_USD)  # only "next" is held
    keeper.settle("slow", "acme", None, 0.5, "m")  # its rules are still known; no double release
    usage = budgets.usage(specs[0])
    assert usage.spent_usd == 0.5 and usage.reserved_usd == pytest.approx(DEFAULT_ESTIMATE_USD)
    clock.now += 86_400 + 120
    budgets.release([])
    keeper.settle("next", "acme", None, 0.0, "m")
    budgets.reserve("later", "bolt", None)
    assert rds.hlen(RESERVATIONS) <= 1  # "lost" was forgotten a day after its release


def test_without_a_reservation_the_worker_settles_by_its_own_rules(rds: redis.Redis) -> None:
    clock = Clock(JUNE_30_LATE - 3600)
    specs = rules({"scope": "tag:feature=faq", "period": "day", "hard_usd": 1})
    keeper = BudgetKeeper(rds, rules=specs, clock=clock)
    keeper.settle("t-no-hold", "acme", {"feature": "faq"}, 0.25, "m")
    keeper.settle("t-other", "acme", {"feature": "chat"}, 0.25, "m")
    budgets = Budgets(specs, rds, clock=clock)
    assert budgets.usage(specs[0]).spent_usd == 0.25


def test_a_worker_without_rules_makes_no_redis_call_while_nobody_reserves(
    rds: redis.Redis,
) -> None:
    keeper = BudgetKeeper(rds)
    assert not keeper.active()
    before = int(rds.info("stats")["total_commands_processed"])
    for i in range(50):
        assert keeper.settle(f"t{i}", "acme", None, 0.1, "m") == []
    after = int(rds.info("stats")["total_commands_processed"])
    assert after - before == 1  # the INFO call itself; the marker check is cached
    rds.set(ACTIVE, 1)
    keeper._checked_at = -1e9  # as if the cache ran out
    assert keeper.active()


def test_period_keys_reset_on_the_boundary(rds: redis.Redis) -> None:
    clock = Clock(JUNE_30_LATE)
    specs = rules(
        {"scope": "tenant:acme", "period": "day", "hard_usd": 0.002},
        {"scope": "tenant:bolt", "period": "month", "hard_usd": 0.002},
    )
    budgets, keeper = pair(rds, specs, clock)
    for tenant in ("acme", "bolt"):
        budgets.reserve(f"{tenant}1", tenant, None)
        keeper.settle(f"{tenant}1", tenant, None, 0.0015, "m")
        with pytest.raises(BudgetExceeded):
            budgets.reserve(f"{tenant}2", tenant, None)
    with pytest.raises(BudgetExceeded) as caught:
        budgets.reserve("bolt3", "bolt", None)
    assert str(caught.value).endswith(
        "monthly hard limit; this request (about $0.0015) would pass it; "
        "resets at 00:00 UTC on 2025-07-01"
    )
    day_key = specs[0].key(clock.now)
    assert day_key.endswith(":2025-06-30") and specs[1].key(clock.now).endswith(":2025-06")
    ttl = rds.pttl(day_key) / 1000
    assert 60 < ttl <= 60 + 2 * 86_400  # the rest of the day plus the grace
    clock.now = JULY_1_EARLY
    assert budgets.reserve("acme3", "acme", None) is not None
    assert budgets.reserve("bolt4", "bolt", None) is not None
    assert budgets.usage(specs[0]).spent_usd == 0


# --- soft limits ---------------------------------------------------------------------------


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP server collecting the JSON bodies POSTed to it."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["content-length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_soft_limit_warns_and_calls_the_webhook_once_per_period(
    rds: redis.Redis,
    webhook: tuple[str, list[dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, received = webhook
    clock = Clock(JUNE_30_LATE - 600)
    specs = rules({"scope": "tenant:acme", "period": "day", "soft_usd": 0.01, "hard_usd": 1})
    budgets, keeper = pair(rds, specs, clock, webhook=url)
    crossed: list[Crossing] = []
    for i in range(6):
        budgets.reserve(f"s{i}", "acme", None)
        crossed += keeper.settle(f"s{i}", "acme", None, 0.004, "m")
    assert [c.rule for c in crossed] == ["tenant:acme/day"]  # the 3rd settle, once
    assert crossed[0].spent_usd == pytest.approx(0.012) and crossed[0].hard_usd == 1
    wait_for(lambda: len(received) == 1)
    body = received[0]
    assert body["event"] == "budget.soft_limit_crossed"
    assert (body["scope"], body["period"], body["period_key"]) == (
        "tenant:acme",
        "day",
        "2025-06-30",
    )
    assert body["resets_at"] == "2025-07-01T00:00:00Z" and body["soft_usd"] == 0.01
    assert "budget soft limit crossed: tenant acme spent $0.0120 of its $0.0100" in caplog.text
    clock.now = JULY_1_EARLY  # a new period: it fires again, once
    for i in range(4):
        budgets.reserve(f"n{i}", "acme", None)
        crossed += keeper.settle(f"n{i}", "acme", None, 0.004, "m")
    wait_for(lambda: len(received) == 2)
    assert received[1]["period_key"] == "2025-07-01" and len(crossed) == 2
    time.sleep(0.2)
    assert len(received) == 2


def test_settle_budget_function_uses_the_settings(
    rds: redis.Redis, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    text = json.dumps([{"scope": "global", "period": "day", "soft_usd": 0.001}])
    settings = load_settings(redis_url="redis://unused", budgets=text, budget_webhook=url)
    crossed = settle_budget(rds, "f1", None, None, 0.002, "m", settings=settings)
    assert [c.scope for c in crossed] == ["global"]
    wait_for(lambda: len(received) == 1)


# --- the producer and the API --------------------------------------------------------------


def over_budget_settings(redis_url: str, **more: Any) -> Any:
    text = json.dumps([{"scope": "tenant:acme", "period": "day", "hard_usd": 0.01}])
    return load_settings(redis_url=redis_url, budgets=text, **{**fast_settings(), **more})


def spend(rds: redis.Redis, tenant: str, usd: float) -> None:
    """Spend as a worker would have settled it today."""
    specs = rules({"scope": f"tenant:{tenant}", "period": "day", "hard_usd": 0.01})
    BudgetKeeper(rds, rules=specs).settle(f"old-{tenant}", tenant, None, usd, "m")


def test_client_refuses_before_enqueueing_and_others_are_accepted(
    redis_url: str, rds: redis.Redis
) -> None:
    spend(rds, "acme", 0.02)
    with Client(settings=over_budget_settings(redis_url)) as client:
        with pytest.raises(BudgetExceeded, match=r"tenant acme spent \$0.0200"):
            client.submit("Where is my order?", model="gpt-4o-mini", tenant="acme")
        with pytest.raises(BudgetExceeded):
            client.submit_many(
                [
                    {"prompt": "one", "model": "gpt-4o-mini", "tenant": "bolt"},
                    {"prompt": "two", "model": "gpt-4o-mini", "tenant": "acme"},
                ]
            )
        assert rds.llen("coalesce") == 0 and rds.zcard("coalesce:pending") == 0
        ticket = client.submit("Where is my order?", model="gpt-4o-mini", tenant="bolt")
        assert ticket.id and rds.llen("coalesce") == 1


def test_no_rules_means_no_budget_keys(redis_url: str, rds: redis.Redis) -> None:
    with Client(settings=load_settings(redis_url=redis_url, **fast_settings())) as client:
        client.submit("Where is my order?", model="gpt-4o-mini", tenant="acme")
    assert list(rds.scan_iter("coalesce:budget:*")) == []


def test_budget_error_is_a_429_of_its_own_type_the_sdks_do_not_retry() -> None:
    error = BudgetExceeded("budget exceeded: ...", "tenant:acme", "day", time.time() + 3600)
    reply = from_exception(error)
    assert reply.status == 429
    assert reply.body()["error"]["type"] == "budget_exceeded"
    assert reply.body()["error"]["code"] == "budget_exceeded"
    headers = reply.headers()
    assert headers["x-should-retry"] == "false"
    assert 3590 <= int(headers["retry-after"]) <= 3600


async def test_api_answers_429_budget_exceeded_through_the_openai_sdk(
    redis_url: str, rds: redis.Redis
) -> None:
    spend(rds, "acme", 0.02)
    keys = "sk-budget-acme-000001=acme,sk-budget-bolt-000002=bolt"
    settings = over_budget_settings(redis_url, api_keys=keys, api_timeout_s=0.5)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        calls: list[int] = []

        async def count(request: httpx.Request) -> None:
            calls.append(1)

        http = httpx.AsyncClient(transport=transport, event_hooks={"request": [count]})
        sdk = openai.AsyncOpenAI(
            base_url="http://api/v1", api_key="sk-budget-acme-000001", http_client=http
        )
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        assert caught.value.code == "budget_exceeded"
        assert caught.value.type == "budget_exceeded"
        assert "tenant acme spent" in caught.value.message
        assert len(calls) == 1  # x-should-retry: false, though the SDK retries 429s by default
        bolt = openai.AsyncOpenAI(
            base_url="http://api/v1", api_key="sk-budget-bolt-000002", http_client=http,
            max_retries=0,
        )  # fmt: skip
        with pytest.raises(openai.APIStatusError) as waited:  # accepted; no worker answers
            await bolt.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        assert waited.value.status_code == 504
        await http.aclose()
    assert rds.llen("coalesce") == 1


# --- end to end ----------------------------------------------------------------------------


@pytest.mark.integration
def test_end_to_end_a_tenant_over_its_hard_budget_is_refused_and_others_answered(
    redis_url: str,
    fake_llm: Callable[..., Proc],
    worker_env: Callable[..., dict[str, str]],
    workers: Callable[..., Proc],
) -> None:
    fake = fake_llm()
    text = json.dumps([{"scope": "tenant:acme", "period": "day", "hard_usd": 0.01}])
    rule = parse_rules(text)[0]
    rds = redis.Redis.from_url(redis_url)
    # As if earlier requests, each nearly free, had spent all but $0.000001 of today's budget.
    rds.hset(rule.key(time.time()), "spent", 10_000_000 - 1_000)
    rds.hset(rule.avg_key(), mapping={"avg": 1, "n": 100})
    workers(worker_env(fake.url, budgets=text))
    settings = load_settings(redis_url=redis_url, budgets=text, **fast_settings())
    with Client(settings=settings) as client:
        first = client.submit("What is the capital of France?", model="gpt-4o-mini", tenant="acme")
        answer = first.get(timeout=20)
        assert answer.cost_usd is not None and answer.cost_usd > 0.000001
        over = lambda: int(rds.hget(rule.key(time.time()), "spent") or 0) > 10_000_000  # noqa: E731
        wait_for(over, timeout=10)
        with pytest.raises(BudgetExceeded, match="tenant acme spent"):
            client.submit("What is the capital of Spain?", model="gpt-4o-mini", tenant="acme")
        other = client.submit("What is the capital of Spain?", model="gpt-4o-mini", tenant="bolt")
        assert other.get(timeout=20).text
    assert rds.hget(RESERVATIONS, first.id) is None  # settled
    rds.close()


def test_keeper_hook_settles_a_request_as_books_calls_it(rds: redis.Redis) -> None:
    clock = Clock(JUNE_30_LATE - 3600)
    specs = rules({"scope": "tag:feature=faq", "period": "day", "hard_usd": 1})
    budgets, keeper = pair(rds, specs, clock)
    request = Request(prompt="hi", model="gpt-4o-mini", tenant="acme", tags={"feature": "faq"})
    [held] = budgets.reserve_requests([("h1", request)])
    assert held is not None
    keeper.hook("h1", request, 0.125)
    usage = budgets.usage(specs[0])
    assert (usage.spent_usd, usage.reserved_usd) == (0.125, 0)
