"""vLLM's per-token logprobs in OpenAI's two shapes (chat and completions)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# vLLM reports -inf for impossible tokens; JSON has no infinity, and OpenAI's own
# floor is this value.
_FLOOR = -9999.0


def _lp(value: float) -> float:
    return max(value, _FLOOR)


def _top(position: Mapping[int, Any], k: int) -> list[tuple[str, float]]:
    ranked = sorted(position.values(), key=lambda lp: (lp.rank is None, lp.rank or 0, -lp.logprob))
    return [(lp.decoded_token or "", _lp(lp.logprob)) for lp in ranked[:k]]


def _chosen(token_id: int, position: Mapping[int, Any]) -> tuple[str, float]:
    lp = position.get(token_id)
    if lp is None:  # not expected from vLLM, but never worth a 500
        return "", _FLOOR
    return lp.decoded_token or "", _lp(lp.logprob)


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Iterable[Mapping[int, Any]], top: int
) -> list[dict[str, Any]]:
    """The ``content`` list of a chat choice's ``logprobs``."""
    content = []
    for token_id, position in zip(token_ids, logprobs):
        text, value = _chosen(token_id, position)
        content.append(
            {
                "token": text,
                "logprob": value,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in _top(position, top)
                ],
            }
        )
    return content


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Iterable[Mapping[int, Any] | None],
    top: int,
    offset: int,
    unscored: str = "",
) -> dict[str, Any]:
    """A completions choice's ``logprobs`` object; ``offset`` is the text offset of the first token.

    A position without logprobs (an echoed prompt's first token: nothing precedes it)
    gets ``unscored`` as its text and nulls, as in vLLM.
    """
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, position in zip(token_ids, logprobs):
        if position is None:
            text, value, best = unscored, None, None
        else:
            (text, value), best = _chosen(token_id, position), dict(_top(position, top))
        tokens.append(text)
        values.append(value)
        tops.append(best)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
