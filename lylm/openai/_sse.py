"""Server-Sent Events framing and the pieces every OpenAI response shares."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def event(payload: Any) -> bytes:
    """One SSE event carrying ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict[str, Any]:
    """OpenAI's usage object, with vLLM's prefix-cache hits as cached prompt tokens."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens or 0},
        "completion_tokens_details": None,  # as vLLM: reasoning token counts are not reported
    }


def running_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """vLLM's ``continuous_usage_stats``: the counts so far on every chunk (for that choice)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk(head: Mapping[str, Any], choices: list[dict[str, Any]], *, include_usage: bool, **extra: Any) -> bytes:
    """One streamed chunk: ``head`` (id, object, created, model) plus ``choices``.

    With ``stream_options.include_usage`` OpenAI puts ``"usage": null`` on every
    chunk and the totals on a last chunk without choices (pass ``usage=``).
    """
    payload = {**head, "choices": choices}
    if include_usage:
        payload["usage"] = None
    payload.update(extra)
    return event(payload)
