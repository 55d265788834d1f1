"""Tool calls and reasoning in a model's output, found by vLLM's own parsers.

``vllm serve`` takes ``--tool-call-parser``, ``--enable-auto-tool-choice`` (front-end
flags) and ``--reasoning-parser`` (an engine argument). A pool takes the same names in
an instance's ``engine_args``: lylm keeps the two front-end ones out of vLLM's
``AsyncEngineArgs`` and composes the parsers with vLLM's ``ParserManager``, exactly
as ``vllm serve`` does, so a model's tool calls and reasoning come out the same.
lylm writes no parser of its own: its copies would drift from vLLM's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .._exceptions import ConfigError

SERVING_ARGS = ("tool_call_parser", "enable_auto_tool_choice")
"""``vllm serve`` flags an instance's ``engine_args`` may carry that are not engine arguments."""


def split_serving_args(args: Mapping[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(engine args, serving args)``; :class:`ConfigError` names a serving arg of the wrong type."""
    engine = {k: v for k, v in args.items() if k not in SERVING_ARGS}
    serving = {k: v for k, v in args.items() if k in SERVING_ARGS}
    parser = serving.get("tool_call_parser")
    if parser is not None and (not isinstance(parser, str) or not parser):
        raise ConfigError(f"{path}.tool_call_parser", f"must be a parser name, a string (got {parser!r})")
    auto = serving.get("enable_auto_tool_choice")
    if auto is not None and not isinstance(auto, bool):
        raise ConfigError(f"{path}.enable_auto_tool_choice", f"must be true or false (got {auto!r})")
    if auto and parser is None:
        # vllm serve refuses the same: auto tool choice has nothing to parse calls with.
        raise ConfigError(f"{path}.enable_auto_tool_choice", "requires engine_args.tool_call_parser")
    return engine, serving


def check_parser_names(serving: Mapping[str, Any], reasoning_parser: Any, path: str) -> None:
    """:class:`ConfigError` for a tool or reasoning parser vLLM does not register, before
    any engine starts (``reasoning_parser`` is the engine argument's value)."""
    from vllm.parser import ParserManager

    tool_parser = serving.get("tool_call_parser")
    try:
        if tool_parser is not None:
            ParserManager.get_tool_parser(tool_parser, enable_auto_tools=True)
    except (TypeError, KeyError, ValueError) as exc:
        raise ConfigError(f"{path}.tool_call_parser", f"vLLM has no tool parser {tool_parser!r} ({exc})") from exc
    try:
        if reasoning_parser:
            ParserManager.get_reasoning_parser(reasoning_parser)
    except (TypeError, KeyError, ValueError) as exc:
        raise ConfigError(f"{path}.reasoning_parser", f"vLLM has no reasoning parser {reasoning_parser!r} ({exc})") from exc


@attrs.frozen
class OutputParsing:
    """How one model's output is parsed: vLLM's composed ``Parser`` class and what it needs.

    Built once per engine (:meth:`VLLMEngine.output_parsing`); the OpenAI adapter
    makes one parser per choice of each request from it, as ``vllm serve`` does.
    """

    parser_cls: Any
    """vLLM's ``Parser`` subclass (tool and reasoning parsers composed), or None."""
    tokenizer: Any
    model_config: Any
    enable_auto_tools: bool
    tool_call_parser: str | None
    reasoning_parser: str | None

    @property
    def parses_tools(self) -> bool:
        """Whether tool calls are extracted (a tool parser with auto tool choice enabled)."""
        return self.parser_cls is not None and self.parser_cls.tool_parser_cls is not None

    @property
    def parses_reasoning(self) -> bool:
        """Whether reasoning is separated from content."""
        return self.parser_cls is not None and self.parser_cls.reasoning_parser_cls is not None

    def parser(self, tools: Any, chat_template_kwargs: Mapping[str, Any]) -> Any:
        """A new parser for one choice of one request (parsers keep streaming state)."""
        return self.parser_cls(
            self.tokenizer,
            tools,
            model_config=self.model_config,
            chat_template_kwargs=dict(chat_template_kwargs),
        )


def build_output_parsing(
    serving: Mapping[str, Any], *, llm: Any, path: str
) -> OutputParsing:
    """Compose the parsers of a started engine (``llm``: vLLM's ``AsyncLLM``) as ``vllm serve`` does.

    Raises :class:`ConfigError` for a parser name vLLM does not know (checked before
    the engine starts too, by :func:`check_parser_names`).
    """
    from vllm.parser import ParserManager

    tool_call_parser = serving.get("tool_call_parser")
    enable_auto_tools = bool(serving.get("enable_auto_tool_choice", False))
    vllm_config = getattr(llm, "vllm_config", None)
    structured = getattr(vllm_config, "structured_outputs_config", None)
    reasoning_parser = getattr(structured, "reasoning_parser", None) or None
    model_config = llm.model_config
    try:
        parser_cls = ParserManager.get_parser(
            tool_parser_name=tool_call_parser,
            reasoning_parser_name=reasoning_parser,
            enable_auto_tools=enable_auto_tools,
            model_name=model_config.model,
        )
    except (TypeError, KeyError, ValueError) as exc:
        key = "reasoning_parser" if reasoning_parser and "reasoning" in str(exc) else "tool_call_parser"
        raise ConfigError(f"{path}.{key}", f"vLLM cannot use it: {exc}") from exc
    return OutputParsing(
        parser_cls=parser_cls,
        tokenizer=llm.get_tokenizer() if parser_cls is not None else None,
        model_config=model_config,
        enable_auto_tools=enable_auto_tools,
        tool_call_parser=tool_call_parser,
        reasoning_parser=reasoning_parser,
    )
