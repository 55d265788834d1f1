"""The pieces every request body is checked with: the body object, its keys, the model,
and scalars, each failing with a 400 that names the field and says what was expected.

Shared by the request parsers of every endpoint (``_protocol``, ``_tool_fields``,
``_responses``, ``_embeddings``, ``_tokenize``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ._errors import OpenAIError, bad_request

# The engine's msgpack transport carries 64-bit integers only: a bigger one would
# fail deep in the engine client instead of here, as a 400.
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _body(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    _check_keys(body, allowed, "")
    return body


def _check_keys(obj: dict[Any, Any], allowed: frozenset[str], prefix: str) -> None:
    # Refuse what we cannot honour rather than drop it: a client asking for tools or
    # logit_bias must learn that it did not get them.
    for key in obj:
        if key not in allowed:
            param = prefix + _clip(str(key))
            raise bad_request(
                f"Unsupported parameter: '{param}'. lylm does not support it.",
                param=param,
                code="unsupported_parameter",
            )


def _model(obj: dict[str, Any]) -> str:
    model = _required(obj, "model", "model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "a non-empty string", model)
    return model


def _is_int(value: Any) -> bool:
    # JSON true/false decode to bools, which Python counts as ints; OpenAI does not.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list_of_ints(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(t) for t in value)


def _object(value: Any, param: str, keys: set[str] | None = None) -> dict[str, Any]:
    """``value`` as an object; with ``keys``, one holding no other keys."""
    if not isinstance(value, dict):
        raise _invalid(param, "an object", value)
    if keys is not None:
        _check_keys(value, frozenset(keys), f"{param}.")
    return value


def _required(obj: dict[str, Any], key: str, param: str) -> Any:
    # null counts as absent, for required fields as for optional ones.
    value = obj.get(key)
    if value is None:
        raise _missing(param)
    return value


def _bool(value: Any, param: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _invalid(param, "a boolean", value)


def _str(value: Any, param: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _invalid(param, "a string", value)


def _int(
    value: Any, param: str, low: int, high: int = _INT64_MAX, *, expect: str | None = None
) -> int | None:
    if value is None:
        return None
    if _is_int(value) and low <= value <= high:
        return int(value)
    if expect is None:
        bounds = f"of at least {low}" if high == _INT64_MAX else f"between {low} and {high}"
        expect = f"an integer {bounds}"
    raise _invalid(param, expect, value)


def _number(value: Any, param: str, low: float, high: float, low_open: bool) -> float | None:
    if value is None:
        return None
    # Compare before converting: float() of a huge int overflows.
    if (_is_int(value) or (isinstance(value, float) and math.isfinite(value))) and (
        (low < value if low_open else low <= value) and value <= high
    ):
        return float(value)
    bounds = f"between {low:g} and {high:g}"
    if low_open:
        bounds = f"greater than {low:g} and at most {high:g}"
    raise _invalid(param, f"a number {bounds}", value)


def _invalid(param: str, expect: str, value: Any) -> OpenAIError:
    return bad_request(f"'{param}' must be {expect} (got {_show(value)})", param=param)


def _missing(param: str) -> OpenAIError:
    message = f"Missing required parameter: '{param}'."
    return bad_request(message, param=param, code="missing_required_parameter")


def _one_of(options: tuple[str, ...]) -> str:
    return "one of " + ", ".join(f"'{o}'" for o in options)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    """A short JSON rendering of a rejected value, for error messages."""
    if isinstance(value, str):
        value = _clip(value, 200)  # rather than dump a huge string only to cut it
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # not JSON, or an int too long to print
        text = f"<{type(value).__name__}>"
    return _clip(text)
