"""An Answer written the way OpenAI writes it: a chat completion, or a stream of chunks."""

from __future__ import annotations

import json
import time
from typing import Any

from .._models import Answer

SOURCE_HEADER = "x-coalesce-source"
BATCH_HEADER = "x-coalesce-batch-size"
COST_HEADER = "x-coalesce-cost-usd"
ID_HEADER = "x-request-id"
SIMILARITY_HEADER = "x-coalesce-similarity"


def completion_id(task_id: str) -> str:
    return f"chatcmpl-{task_id}"


def message_of(answer: Answer) -> dict[str, Any]:
    """The assistant message: the upstream's own for passthrough, else the batched text."""
    message = answer.message
    if message:
        return {"role": "assistant", **message}
    return {"role": "assistant", "content": answer.text}


def usage_of(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def completion(answer: Answer, task_id: str) -> dict[str, Any]:
    """A ``chat.completion`` object with ``usage`` for one answer."""
    return {
        "id": completion_id(task_id),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "choices": [
            {
                "index": 0,
                "message": message_of(answer),
                "finish_reason": answer.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": usage_of(answer),
    }


def headers(answer: Answer, task_id: str) -> dict[str, str]:
    out = {
        SOURCE_HEADER: answer.source,
        BATCH_HEADER: str(answer.batch_size),
        COST_HEADER: f"{answer.cost_usd:.8f}",
        ID_HEADER: task_id,
    }
    if answer.similarity is not None:
        out[SIMILARITY_HEADER] = f"{answer.similarity:.4f}"
    return out


def chunk(task_id: str, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": completion_id(task_id),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def answer_chunks(answer: Answer, task_id: str) -> list[dict[str, Any]]:
    """A whole answer as the chunks a stream of it would have had: role, content, finish."""
    message = message_of(answer)
    body: dict[str, Any] = {}
    if message.get("content"):
        body["content"] = message["content"]
    if message.get("tool_calls"):
        body["tool_calls"] = [
            {"index": index, **call} for index, call in enumerate(message["tool_calls"])
        ]
    finish = answer.finish_reason or "stop"
    return [
        chunk(task_id, answer.model, {"role": "assistant", "content": ""}, None),
        *([chunk(task_id, answer.model, body, None)] if body else []),
        chunk(task_id, answer.model, {}, finish),
    ]


def usage_chunk(answer: Answer, task_id: str) -> dict[str, Any]:
    """The last chunk ``stream_options.include_usage`` asks for: no choices, only usage."""
    return {**chunk(task_id, answer.model, {}, None), "choices": [], "usage": usage_of(answer)}


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
