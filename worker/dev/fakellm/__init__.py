"""A fake OpenAI-compatible chat completions server for tests, the demo and benchmarks.

It answers deterministically (see :func:`expected_answer`), so a test can check that every answer
reached the caller that asked for it, and it misbehaves on demand -- latency per call and per
token, noisy or incomplete batched replies in many layouts, 500s, malformed bodies, 429s from a
rate or a concurrency limit, a bounded queue, content-filter rejections, streams honoured,
ignored or refused -- so the worker's recovery paths run against real HTTP rather than mocks.
Knobs (:class:`FakeConfig`) can be changed live through ``POST /config``.

Conversations are answered from their last user message (so ``expected_answer(model, system,
last user message)`` holds for them too). A request with ``tools`` whose last message is the
user's gets one deterministic tool call (the tool ``tool_choice`` names, else the first, with
``{<its first parameter>: <the last user message>}`` as arguments, finish_reason
``tool_calls``), streamed as tool-call deltas when asked to stream; after a tool result it
answers in text. ``GET /debug/last`` (and ``/debug/bodies``, the last 50) return the chat
bodies as received, so tests can check what reached the provider. Prompt caching is simulated
as OpenAI bills it (``promptcache``): a repeated start of 1,024+ tokens reports
``usage.prompt_tokens_details.cached_tokens``, and ``/stats`` totals cached tokens too.

Modules: ``config`` (knobs), ``answers`` (deterministic answers, batch splitting, tokens),
``replies`` (reply layouts), ``protocol`` (OpenAI wire format), ``state`` (limits and
counters), ``promptcache`` (provider prompt caching), ``app`` (routes and timing).

It never logs prompt contents or request headers: uvicorn's access log is off in :func:`serve`
and the app itself logs nothing.
"""

from __future__ import annotations

from worker.tokens import count_tokens

from .answers import expected_answer, group_system, prompt_tokens, split_batch, token_pieces
from .app import MODEL_IDS, create_app, serve
from .config import LAYOUTS, ONE_LINE_LAYOUTS, STREAM_MODES, FakeConfig

__all__ = [
    "LAYOUTS",
    "MODEL_IDS",
    "ONE_LINE_LAYOUTS",
    "STREAM_MODES",
    "FakeConfig",
    "count_tokens",
    "create_app",
    "expected_answer",
    "group_system",
    "prompt_tokens",
    "serve",
    "split_batch",
    "token_pieces",
]
