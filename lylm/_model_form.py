"""``lylm serve MODEL [vLLM's engine flags]``: the config one command line makes.

The common case, one model on one host, without a JSON file, as ``vllm serve MODEL
--tensor-parallel-size 2`` is written. lylm's own flags say how many instances and where
(``--gpus``, ``--instances``, ``--balancer``); every other flag is read by vLLM's own
argument parser (``AsyncEngineArgs.add_cli_args``), exactly as ``vllm serve`` reads it, and
becomes the instances' ``engine_args``: only the flags given, so the config equals the
file a user would write. ``--print-config`` shows it, as a starting point for a file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any, NoReturn

from ._exceptions import ConfigError


class _OneLineParser(argparse.ArgumentParser):
    """vLLM's parser prints its whole usage (hundreds of flags) with an error: one line instead."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError("lylm serve MODEL", message)


def engine_args_from_flags(model: str, flags: Sequence[str]) -> dict[str, Any]:
    """The engine args ``vllm serve MODEL FLAGS`` would give its engine: the flags given, typed
    by vLLM's parser (defaults are vLLM's own and stay out). Raises :class:`ConfigError` for a
    flag vLLM does not know or a value it refuses."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(_OneLineParser, FlexibleArgumentParser):  # type: ignore[misc]
        pass

    parser = Parser(prog="lylm serve MODEL", add_help=False)
    AsyncEngineArgs.add_cli_args(parser)
    actions = [a for a in parser._actions if a.dest not in ("help", "model")]
    for action in actions:  # only what was given: vLLM's defaults stay vLLM's
        action.default = argparse.SUPPRESS
    namespace = parser.parse_args(list(flags))
    given = vars(namespace)
    engine_args: dict[str, Any] = {"model": model}
    for action in actions:
        if action.dest not in given:
            continue
        value = given[action.dest]
        try:
            json.dumps(value)
        except TypeError:  # a config object (--compilation-config '{...}'): its JSON as given
            value = _raw_json(action, flags)
        engine_args[action.dest] = value
    return engine_args


def _raw_json(action: argparse.Action, flags: Sequence[str]) -> Any:
    for i, flag in enumerate(flags):
        name, _, inline = flag.partition("=")
        if name in action.option_strings:
            text = inline if inline else (flags[i + 1] if i + 1 < len(flags) else "")
            try:
                return json.loads(text)
            except ValueError:
                break
    raise ConfigError(
        f"lylm serve MODEL {action.option_strings[0]}",
        "give it as JSON here, or write a config file (--print-config makes one to start from)",
    )


def model_config(
    model: str,
    flags: Sequence[str],
    *,
    gpus: str | None = None,
    instances: int | None = None,
    balancer: str | None = None,
) -> dict[str, Any]:
    """The config of ``lylm serve MODEL FLAGS``: one model group, served under vLLM's
    ``--served-model-name`` (else MODEL), with one instance per GPU (or per group of
    ``tensor_parallel_size x pipeline_parallel_size`` GPUs) of ``gpus`` ("0,1,2,3"), or
    ``instances`` instances (on GPUs 0, 1, ... where vLLM finds GPUs), or one."""
    engine_args = engine_args_from_flags(model, flags)
    names = engine_args.pop("served_model_name", None)
    name = (names[0] if isinstance(names, list) and names else names) or model
    width = int(engine_args.get("tensor_parallel_size", 1)) * int(engine_args.get("pipeline_parallel_size", 1))
    groups: list[list[int]]
    if gpus is not None and instances is not None:
        raise ConfigError("--instances", "give --gpus or --instances, not both")
    if gpus is not None:
        try:
            ids = [int(part) for part in gpus.split(",") if part.strip()]
        except ValueError:
            raise ConfigError("--gpus", f"expected GPU indices such as 0,1,2,3 (got {gpus!r})") from None
        if not ids or len(ids) % width:
            raise ConfigError(
                "--gpus", f"{len(ids)} GPU(s) do not split into instances of {width} (tensor x pipeline parallel)"
            )
        groups = [ids[i : i + width] for i in range(0, len(ids), width)]
    elif instances is not None:
        if instances < 1:
            raise ConfigError("--instances", f"must be at least 1 (got {instances})")
        groups = [list(range(i * width, (i + 1) * width)) for i in range(instances)] if _has_gpus() else [[]] * instances
    else:
        groups = [[]]
    members = [
        {"devices": {"gpu_ids": group}, "engine_args": engine_args} if group else {"engine_args": engine_args}
        for group in groups
    ]
    group_config: dict[str, Any] = {"instances": members}
    if balancer is not None:
        group_config["balancer"] = balancer
    return {"models": {str(name): group_config}}


def _has_gpus() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())
