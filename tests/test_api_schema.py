"""schemathesis against the API's own OpenAPI document: no 5xx, no reply that breaks it.

The app runs in-process (ASGI) on a real Redis, with the stand-in producer client of
``api_stub`` (it validates with the real ``validate_request`` and answers at once), so
generated requests that pass validation are answered too. Bounded to a few seconds.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from producer import load_settings
from producer.api import create_app

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_stub import KEY_A, StubClient

EXAMPLES = 20  # per operation and generation mode: ~7 operations x 2 modes, a few seconds


@pytest.fixture
def consumer(redis_url: str) -> Iterator[None]:
    """A connection waiting in BRPOP, as a Celery worker's does, so /readyz says ready."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            client.brpop(["schema-test-queue"], 1)

    waiting = threading.Thread(target=consume)
    waiting.start()
    yield
    stop.set()
    waiting.join(10)
    client.close()


@pytest.fixture
def api_schema(redis_url: str, consumer: None) -> Any:
    config = load_settings(redis_url=redis_url, api_keys=f"{KEY_A}=tenant-a", api_models="m1,m2")
    app = create_app(config, client_factory=StubClient)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.update(headers={"Authorization": f"Bearer {KEY_A}"})
    return schema


# schemathesis's own pytest loader does not run on pytest 9 yet, so each operation's
# strategies are driven with hypothesis here. The checks are schemathesis's defaults but one:
# a schema-valid body may still get a 400, since the server enforces what OpenAPI cannot say
# (size limits, a tool message needing its call id, ...); that 400 is checked against the
# schema like every other reply.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_openapi_document(api_schema: Any, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/models", "/readyz"}
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Unsatisfiable:  # nothing to break: no body, and any string fits its parameters
            assert mode is GenerationMode.NEGATIVE, operation.label
            assert operation.label != "POST /v1/chat/completions"
