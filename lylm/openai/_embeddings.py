"""POST /v1/embeddings: the embeddings of a model group of pooling engines.

A model served with vLLM's pooling runner (``"runner": "pooling"`` in its engine args,
with ``"convert": "embed"`` for a causal LM) is balanced like any other: each input
is one request on the instance its balancer picks, all inputs dispatched at once. The
engine parameters are vLLM's ``PoolingParams`` (task ``embed``), as ``vllm serve``
builds them; the response is OpenAI's list of embeddings, shaped as vLLM's.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import attrs
from starlette.responses import Response

from .._pool import EnginePool
from ._dispatch import check_model, dispatch, final_output
from ._fields import _body, _int, _invalid, _model, _str
from ._json import json_response
from ._protocol import ContextOf, _prompts

MAX_INPUTS = 2048
"""The most inputs one request may carry (OpenAI's limit)."""

_KEYS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
_FORMATS = ("float", "base64")


@attrs.frozen
class EmbeddingRequest:
    """A validated ``/v1/embeddings`` body."""

    model: str
    inputs: list[str | list[int]]
    encoding_format: str
    dimensions: int | None
    user: str | None


def parse_embedding_request(body: Any, context: ContextOf | None = None) -> EmbeddingRequest:
    """Validate a decoded embeddings body; a 400 :class:`OpenAIError` names what is wrong
    (``context``: as for :func:`parse_completion_request`)."""
    obj = _body(body, _KEYS)
    model = _model(obj)
    fmt = obj.get("encoding_format") or "float"
    if fmt not in _FORMATS:
        raise _invalid("encoding_format", "'float' or 'base64'", fmt)
    return EmbeddingRequest(
        model=model,
        inputs=_prompts(obj.get("input"), "input", MAX_INPUTS, max_tokens=context(model) if context else None),
        encoding_format=fmt,
        dimensions=_int(obj.get("dimensions"), "dimensions", 1),
        user=_str(obj.get("user"), "user"),
    )


async def embeddings(pool: EnginePool, request: EmbeddingRequest) -> Response:
    """Embed every input; one response with them in input order."""
    import numpy as np  # vLLM's dependency, as is the endpoint
    from vllm import PoolingParams

    check_model(pool, request.model)
    request_id = f"embd-{uuid.uuid4().hex}"
    prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in request.inputs]
    params = PoolingParams(task="embed", dimensions=request.dimensions)
    started = await dispatch(
        pool, request.model, prompts, params, request_id=request_id, session_key=request.user, param="input"
    )
    data = []
    prompt_tokens = 0
    for index, s in enumerate(started):
        final = await final_output(s)
        prompt_tokens += len(final.prompt_token_ids or ())
        pooled = final.outputs.data
        # float32, written with float32's shortest digits (orjson), as vLLM writes them
        vector = pooled.float().cpu().numpy() if hasattr(pooled, "numpy") else np.asarray(pooled, dtype=np.float32)
        embedding: Any = vector
        if request.encoding_format == "base64":
            # float32 in the machine's byte order: what OpenAI's client decodes (as vLLM)
            embedding = base64.b64encode(vector.astype(np.float32).tobytes()).decode()
        data.append({"index": index, "object": "embedding", "embedding": embedding})
    return json_response(
        {
            "id": request_id,
            "object": "list",
            "created": int(time.time()),
            "model": request.model,
            "data": data,
            # as vLLM's: no output tokens, no prompt details
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
        }
    )
