"""POST /tokenize and /detokenize, as ``vllm serve`` answers them (vLLM's own endpoints).

``/tokenize`` takes a completions-style ``prompt`` or chat ``messages`` (rendered with
the model's chat template, declared ``tools`` included) and returns the token ids the
model would see; ``/detokenize`` turns token ids back into text. Both use the pool's
rendering, so the ids are exactly those a request would be served with.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from .._pool import EnginePool
from ._dispatch import check_model, to_openai_error
from ._errors import bad_request
from ._fields import _body, _bool, _model, _required, _str
from ._json import json_response
from ._protocol import _messages, _token_ids
from ._tool_calls import template_tools
from ._tool_fields import _template_kwargs, _tools

_TEXT_KEYS = frozenset({"model", "prompt", "add_special_tokens", "return_token_strs"})
_CHAT_KEYS = frozenset(
    {"model", "messages", "add_generation_prompt", "continue_final_message", "tools", "chat_template_kwargs",
     "return_token_strs"}
)  # fmt: skip


async def tokenize(pool: EnginePool, body: Any) -> Response:
    """``{"count", "max_model_len", "tokens", "token_strs"}`` for a prompt or a conversation."""
    chat = isinstance(body, dict) and "messages" in body
    obj = _body(body, _CHAT_KEYS if chat else _TEXT_KEYS)
    model = _model(obj)
    if _bool(obj.get("return_token_strs"), "return_token_strs"):
        raise bad_request("'return_token_strs' is not supported by lylm", param="return_token_strs")
    kwargs: dict[str, Any] = {}
    if chat:
        prompt: Any = _messages(obj.get("messages"))
        tools = _tools(obj.get("tools"))
        kwargs = dict(_template_kwargs(obj.get("chat_template_kwargs")))
        add = _bool(obj.get("add_generation_prompt"), "add_generation_prompt")
        cont = _bool(obj.get("continue_final_message"), "continue_final_message") or False
        if add and cont:
            message = "'add_generation_prompt' and 'continue_final_message' cannot both be true"
            raise bad_request(message, param="continue_final_message")
        kwargs.update(add_generation_prompt=not cont if add is None else add, continue_final_message=cont)
        if tools is not None:
            kwargs["tools"] = template_tools(tools)
    else:
        prompt = _str(_required(obj, "prompt", "prompt"), "prompt")
        if _bool(obj.get("add_special_tokens"), "add_special_tokens") is False:
            raise bad_request("'add_special_tokens': false is not supported by lylm", param="add_special_tokens")
    check_model(pool, model)
    try:
        rendered = await pool.render(model, prompt, chat_template_kwargs=kwargs or None)
        context = pool.max_model_len(model)
    except Exception as exc:
        raise to_openai_error(exc) from exc
    tokens = list(rendered.token_ids)
    return json_response({"count": len(tokens), "max_model_len": context, "tokens": tokens, "token_strs": None})


async def detokenize(pool: EnginePool, body: Any) -> Response:
    """``{"prompt": text}`` for a list of token ids."""
    obj = _body(body, frozenset({"model", "tokens"}))
    model = _model(obj)
    tokens = _required(obj, "tokens", "tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad_request("'tokens' must be a list of token ids", param="tokens")
    ids = _token_ids(tokens, "tokens") if tokens else []
    check_model(pool, model)
    try:
        text = await pool.decode(model, ids)
    except Exception as exc:
        raise to_openai_error(exc) from exc
    return json_response({"prompt": text})
