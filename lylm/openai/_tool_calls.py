"""Tools and reasoning in chat completions, through vLLM's own parsers, shaped as ``vllm serve`` shapes them.

A chat request that declares ``tools``, or is sent to a model with a reasoning parser,
gets a :class:`ChatParsing`: vLLM's ``ChatCompletionRequest`` built from the validated
body (what vLLM's parsers read), the parser's adjustments to it (a JSON schema for
``tool_choice: "required"`` or a named function, special tokens kept for tool-call
markers), and one vLLM parser per choice that turns output into ``content``,
``reasoning`` and ``tool_calls``. The rules for ``finish_reason`` and
``parallel_tool_calls`` follow vLLM's chat server. vLLM is imported lazily.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ._errors import bad_request
from ._protocol import ChatRequest

_CONFIG_HINT = "engine_args.enable_auto_tool_choice and engine_args.tool_call_parser"


@attrs.frozen
class ChatParsing:
    """How one chat request's output is parsed (see the module docstring)."""

    parsing: Any  # lylm.engines._parsing.OutputParsing
    vllm_request: Any  # vLLM's ChatCompletionRequest, adjusted by the parser
    chat_template_kwargs: Mapping[str, Any]
    sampling: Mapping[str, Any]
    named_function: str | None

    def parser(self) -> Any:
        """A parser for one choice (vLLM's parsers keep per-stream state); None when the
        model has none (declared tools are then only shown to the model)."""
        return _new_parser(self.parsing, self.vllm_request)

    def message(self, parser: Any, output: Any, prompt_token_ids: Sequence[int] | None) -> tuple[dict[str, Any], str]:
        """A finished choice's message and finish reason, as vLLM's chat server builds them."""
        request = self.vllm_request
        if parser is None:
            plain = {"role": "assistant", "content": output.text, "refusal": None, "reasoning": None}
            return plain, output.finish_reason or "stop"
        if prompt_token_ids is not None and hasattr(parser, "set_prompt_token_ids"):
            parser.set_prompt_token_ids(prompt_token_ids)
        reasoning, content, calls = parser.parse(
            output.text,
            request,
            enable_auto_tools=self.parsing.enable_auto_tools,
            model_output_token_ids=list(output.token_ids),
        )
        if not request.include_reasoning:
            reasoning = None
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        forced = self.named_function is not None or request.tool_choice == "required"
        tool_calls = [_tool_call(c) for c in calls or ()]
        if forced:
            message["content"] = content or ""
        elif not (request.tools and request.tool_choice in ("auto", None) and self.parsing.parses_tools):
            tool_calls = []  # parsed but not asked for (tool_choice "none"): plain content
        if tool_calls:
            if request.parallel_tool_calls is False:
                tool_calls = tool_calls[:1]
            message["tool_calls"] = tool_calls
        message["reasoning"] = reasoning
        finish = output.finish_reason or "stop"
        # OpenAI's rule, kept by vLLM: "tool_calls" for auto or required calls, "stop" for a named one.
        auto_called = bool(tool_calls) and not forced
        if auto_called or (request.tool_choice == "required" and finish == "stop"):
            finish = "tool_calls"
        return message, finish

    def delta(self, parser: Any, output: Any, prompt_token_ids: Sequence[int] | None) -> dict[str, Any] | None:
        """One streamed output's delta (None: nothing to send yet), as vLLM streams it."""
        request = self.vllm_request
        if parser is None:
            return {"content": output.text} if output.text else None
        message = parser.parse_delta(
            output.text,
            list(output.token_ids),
            request,
            list(prompt_token_ids) if prompt_token_ids is not None else None,
            finished=output.finish_reason is not None,
        )
        if message is None:
            return None
        delta: dict[str, Any] = message.model_dump(mode="json", exclude_unset=True)
        if request.parallel_tool_calls is False and delta.get("tool_calls"):
            delta["tool_calls"] = [c for c in delta["tool_calls"] if c.get("index") == 0]
        return delta

    def stream_finish_reason(self, reason: str, tools_streamed: bool) -> str:
        """A streamed choice's finish reason: "tool_calls" once a call was streamed (not a named one)."""
        if tools_streamed and self.named_function is None and reason == "stop":
            return "tool_calls"
        return reason


def prepare(request: ChatRequest, parsing: Any) -> ChatParsing | None:
    """The request's :class:`ChatParsing`, or None when its output is plain content.

    Raises a 400 :class:`OpenAIError` for a ``tool_choice`` the model is not
    configured to honour (as ``vllm serve`` refuses it without its parser flags).
    """
    parses_tools = parsing is not None and parsing.parses_tools
    parses_reasoning = parsing is not None and parsing.parses_reasoning
    choice = request.tool_choice
    if request.tools is not None and choice is None:
        choice = "auto"  # OpenAI's default when tools are declared
    if choice not in (None, "none") and not parses_tools:
        what = f'tool_choice "{choice}"' if isinstance(choice, str) else "a named tool_choice"
        hint = f"set {_CONFIG_HINT} for model '{request.model}' (vllm serve: --enable-auto-tool-choice --tool-call-parser)"
        if choice == "auto":
            hint += ', or send tool_choice "none"'
        raise bad_request(f"{what} needs a tool-call parser: {hint}", param="tool_choice")
    if not (request.tools or parses_reasoning):
        return None
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    if (named is not None or choice == "required") and "structured_outputs" in request.sampling:
        message = "'response_format' cannot be combined with tool_choice \"required\" or a named function"
        raise bad_request(message, param="response_format")
    vllm_request = _vllm_request(request)
    parser = _new_parser(parsing, vllm_request)
    # vllm serve adjusts the request unless tools are declared and not to be called.
    adjust = parses_reasoning or vllm_request.tool_choice != "none" or getattr(parser, "always_adjust_request", False)
    if parser is not None and adjust:
        try:
            vllm_request = parser.adjust_request(vllm_request)
        except Exception as exc:
            if not _is_validation_error(exc):
                raise
            raise bad_request(str(exc), param=getattr(exc, "parameter", None)) from exc
    sampling: dict[str, Any] = {}
    structured = getattr(vllm_request, "structured_outputs", None)
    if structured is not None and "structured_outputs" not in request.sampling:
        sampling["structured_outputs"] = structured  # the schema of the forced call(s)
    if getattr(vllm_request, "skip_special_tokens", True) is False:
        sampling["skip_special_tokens"] = False  # tool-call markers are special tokens in some models
    template_kwargs = dict(request.chat_template_kwargs)
    if vllm_request.tools:
        template_kwargs["tools"] = [tool.model_dump() for tool in vllm_request.tools]
    return ChatParsing(parsing, vllm_request, template_kwargs, sampling, named)


def template_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Declared tools as vLLM hands them to a chat template (its own model, dumped), so
    that a prompt renders token for token as with ``vllm serve``."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam

    try:
        return [ChatCompletionToolsParam(**tool).model_dump() for tool in tools]
    except Exception as exc:
        if not _is_validation_error(exc):
            raise
        raise bad_request(_first_error(exc), param="tools") from exc


def _new_parser(parsing: Any, vllm_request: Any) -> Any:
    """One vLLM parser for ``vllm_request`` (None when the model has no parser)."""
    if parsing is None or parsing.parser_cls is None:
        return None
    kwargs = {"add_generation_prompt": True, "continue_final_message": False}
    kwargs.update(vllm_request.chat_template_kwargs or {})
    return parsing.parser(vllm_request.tools, kwargs)


def _vllm_request(request: ChatRequest) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    fields: dict[str, Any] = {
        "model": request.model,
        "messages": request.messages,
        "n": request.n,
        "stream": request.stream,
        "include_reasoning": request.include_reasoning,
    }
    optional = {
        "tools": request.tools,
        "tool_choice": request.tool_choice,
        "parallel_tool_calls": request.parallel_tool_calls,
        "chat_template_kwargs": dict(request.chat_template_kwargs) or None,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    try:
        return ChatCompletionRequest(**fields)
    except Exception as exc:
        if not _is_validation_error(exc):
            raise
        raise bad_request(_first_error(exc), param=getattr(exc, "parameter", None)) from exc


def _is_validation_error(exc: Exception) -> bool:
    # pydantic's ValidationError is a ValueError; vLLM's VLLMValidationError is not (0.32+).
    return isinstance(exc, (ValueError, TypeError)) or type(exc).__name__ == "VLLMValidationError"


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            return str(first.get("msg", exc))
        except Exception:  # not pydantic's shape
            pass
    return str(exc)


def _tool_call(call: Any) -> dict[str, Any]:
    """One parsed call (vLLM's ``FunctionCall``) in OpenAI's ``tool_calls`` shape."""
    call_id = getattr(call, "id", None) or f"chatcmpl-tool-{uuid.uuid4().hex}"
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}

