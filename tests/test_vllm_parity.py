"""lylm's OpenAI server against ``vllm serve``, request by request (issue 14's differential test).

Both serve the same tiny model with the same engine arguments (dummy weights from the
same seed, so the same weights; a generation config that makes sampling greedy) and
the same tool-call parser flags. Every request below goes to both; the status codes
must match, errors must be OpenAI-shaped on both, and successful responses must have
the same structure (the keys at every level, and the types of their values) apart
from the differences lylm keeps on purpose (:data:`KEPT_DIFFERENCES`, listed in the
README). Greedy requests must also produce the same text, tool calls and token counts.

Run as a script to print every difference instead of asserting:
``python tests/test_vllm_parity.py``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from _helpers import WEATHER_TOOL, greedy_tiny_model
from _server import ServerProcess, uvicorn_thread
from lylm import EnginePool, PoolConfig
from lylm.openai import create_app
from lylm.testing import TINY_MODEL_ENGINE_ARGS

pytestmark = pytest.mark.engines

MODEL = "tiny"
SERVING = {"tool_call_parser": "hermes", "enable_auto_tool_choice": True}

WEATHER = WEATHER_TOOL
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]},
    {"role": "tool", "tool_call_id": "call-1", "content": "Sunny, 21 C"},
]  # fmt: skip
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}

# Keys lylm leaves out or adds on purpose, by the path where they differ (a list index is "*").
# "-" : vLLM has it, lylm does not; "+" : lylm has it, vLLM does not.
KEPT_DIFFERENCES = {
    # vLLM's extensions for its own features lylm does not offer (prompt/return token ids
    # and text, KV and encoder-cache transfer, routed experts, per-request metrics).
    "-choices.*.token_ids", "-choices.*.prompt_token_ids", "-choices.*.prompt_logprobs",
    "-prompt_logprobs", "-prompt_token_ids", "-prompt_text", "-kv_transfer_params", "-ec_transfer_params",
    "-metrics", "-choices.*.routed_experts",
    # Usage: lylm reports prefix-cache hits as cached_tokens (vLLM: null unless
    # --enable-prompt-tokens-details) and gives every usage object the same keys; in a
    # stream, OpenAI's "usage": null on every chunk when include_usage is set.
    "+usage.prompt_tokens_details", "+usage.completion_tokens_details", "-usage.completion_tokens_details",
    "+usage",
    # Fields of OpenAI's message that vLLM fills with null and no client reads from it.
    "-choices.*.message.annotations", "-choices.*.message.audio", "-choices.*.message.function_call",
    # lylm sets no system_fingerprint (null; vLLM stamps it on a stream's last chunk).
    "-system_fingerprint",
    # Responses: vLLM's extensions (its sampling echoes, raw messages, per-turn counts).
    "-presence_penalty", "-frequency_penalty", "-input_messages", "-output_messages",
    "-usage.output_tokens_details.tool_output_tokens", "-usage.output_tokens_details.output_tokens_per_turn",
    "-usage.output_tokens_details.tool_output_tokens_per_turn", "-usage.input_tokens_details.cache_write_tokens",
    "-usage.input_tokens_details.input_tokens_per_turn", "-usage.input_tokens_details.cached_tokens_per_turn",
    "-response.presence_penalty", "-response.frequency_penalty", "-response.kv_transfer_params",
    "-response.ec_transfer_params", "-response.input_messages",
    "-response.output_messages", "-response.usage.output_tokens_details.tool_output_tokens",
    "-response.usage.output_tokens_details.output_tokens_per_turn",
    "-response.usage.output_tokens_details.tool_output_tokens_per_turn",
    "-response.usage.input_tokens_details.cache_write_tokens",
    "-response.usage.input_tokens_details.input_tokens_per_turn",
    "-response.usage.input_tokens_details.cached_tokens_per_turn",
    # vLLM 0.26 only: its streamed output items carry a "summary" (not analysed further).
    "-item.summary",
    # The legacy permission objects of a model listing; lylm's version beside vLLM's.
    "-data.*.permission", "+lylm_version",
}  # fmt: skip


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys at every level and leaf types (null kept apart)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two shapes differ: "-path" (only vLLM has it), "+path" (only lylm), "~path" (types)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = [f"-{path}{k}" for k in theirs if k not in ours] + [f"+{path}{k}" for k in ours if k not in theirs]
        for key in ours.keys() & theirs.keys():
            out += differences(ours[key], theirs[key], f"{path}{key}.")
        return out
    if isinstance(ours, list) and isinstance(theirs, list):
        if ours and theirs:
            return differences(ours[0], theirs[0], f"{path}*.")
        return []  # an empty list says nothing about its items
    # null on one side and a value on the other: both are "may be null" in OpenAI's schema
    if ours != theirs and "null" not in (ours, theirs):
        return [f"~{path.rstrip('.')}: lylm {ours}, vllm {theirs}"]
    return []


def request_cases() -> list[tuple[str, str, dict[str, Any], bool]]:
    """(name, path, body, greedy: outputs must match exactly)."""
    chat, text = "/v1/chat/completions", "/v1/completions"
    m = {"model": MODEL}
    return [
        ("chat", chat, {**m, "messages": ASK, "max_tokens": 8}, True),
        ("chat stream", chat, {**m, "messages": ASK, "max_tokens": 8, "stream": True,
                               "stream_options": {"include_usage": True}}, True),
        ("chat continuous usage", chat, {**m, "messages": ASK, "max_tokens": 4, "stream": True,
                                         "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, True),
        ("chat n=2", chat, {**m, "messages": ASK, "max_tokens": 4, "n": 2, "temperature": 0.8, "seed": 3}, False),
        ("chat stop", chat, {**m, "messages": ASK, "max_tokens": 12, "stop": ["e", "a"]}, True),
        ("chat logprobs", chat, {**m, "messages": ASK, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}, True),
        ("chat json schema", chat, {**m, "messages": ASK, "max_tokens": 40, "response_format": {
            "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}, True),
        ("chat logit_bias", chat, {**m, "messages": ASK, "max_tokens": 4, "logit_bias": {"40": 100}}, True),
        ("chat both max", chat, {**m, "messages": ASK, "max_tokens": 9, "max_completion_tokens": 3}, True),
        ("tools auto", chat, {**m, "messages": ASK, "max_tokens": 8, "tools": [WEATHER]}, True),
        ("tools none", chat, {**m, "messages": ASK, "max_tokens": 8, "tools": [WEATHER], "tool_choice": "none"}, True),
        ("tools named", chat, {**m, "messages": ASK, "max_tokens": 200, "tools": [WEATHER], "logit_bias": "BLANK",
                               "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, True),
        ("tools named stream", chat, {**m, "messages": ASK, "max_tokens": 200, "tools": [WEATHER], "stream": True,
                                      "logit_bias": "BLANK",
                                      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, True),
        ("tools required", chat, {**m, "messages": ASK, "max_tokens": 200, "tools": [WEATHER], "logit_bias": "BLANK",
                                  "tool_choice": "required", "parallel_tool_calls": False}, True),
        ("tools history", chat, {**m, "messages": HISTORY, "max_tokens": 8, "tools": [WEATHER]}, True),
        ("completion", text, {**m, "prompt": "Once upon a time", "max_tokens": 8}, True),
        ("completion default max_tokens", text, {**m, "prompt": "Once upon a time"}, True),
        ("completion stream", text, {**m, "prompt": "Once upon a time", "max_tokens": 8, "stream": True,
                                     "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, True),
        ("completion token ids", text, {**m, "prompt": [40, 41, 42, 43], "max_tokens": 6}, True),
        ("completion several", text, {**m, "prompt": ["One", "Two"], "max_tokens": 4}, True),
        ("completion logprobs", text, {**m, "prompt": "Once", "max_tokens": 4, "logprobs": 2}, True),
        ("completion echo", text, {**m, "prompt": "Once upon", "max_tokens": 4, "echo": True}, True),
        ("completion echo logprobs", text, {**m, "prompt": "Once upon", "max_tokens": 4, "echo": True,
                                            "logprobs": 1}, True),
        ("completion echo stream", text, {**m, "prompt": "Once upon", "max_tokens": 4, "echo": True,
                                          "stream": True}, True),
        ("completion n=2", text, {**m, "prompt": "Once", "max_tokens": 4, "n": 2, "temperature": 0.9, "seed": 5}, False),
        ("responses", "/v1/responses", {**m, "input": "Hello there", "max_output_tokens": 6}, True),
        ("responses messages", "/v1/responses", {**m, "instructions": "Be brief", "max_output_tokens": 6,
                                                 "temperature": 0.5, "seed": 4, "metadata": {"a": "b"}, "input": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "again"}]}]}, True),
        ("responses json", "/v1/responses", {**m, "input": "x", "max_output_tokens": 30, "text": {"format": {
            "type": "json_schema", "name": "a", "schema": SCHEMA}}}, True),
        ("responses stream", "/v1/responses", {**m, "input": "Hello there", "max_output_tokens": 5, "stream": True}, True),
        ("bad: responses no input", "/v1/responses", {**m, "input": []}, False),
        ("bad: responses previous", "/v1/responses", {**m, "input": "x", "previous_response_id": "resp_1"}, False),
        ("tokenize", "/tokenize", {**m, "prompt": "Hello world"}, True),
        ("tokenize chat", "/tokenize", {**m, "messages": ASK}, True),
        ("tokenize chat with tools", "/tokenize", {**m, "messages": HISTORY, "tools": [WEATHER]}, True),
        ("tokenize no generation prompt", "/tokenize", {**m, "messages": ASK, "add_generation_prompt": False}, True),
        ("detokenize", "/detokenize", {**m, "tokens": [40, 41, 42, 300]}, True),
        # refused by both
        ("bad: no messages", chat, {**m}, False),
        ("bad: unknown model", chat, {"model": "nope", "messages": ASK}, False),
        ("bad: n=0", chat, {**m, "messages": ASK, "n": 0}, False),
        ("bad: temperature", chat, {**m, "messages": ASK, "temperature": -1}, False),
        ("bad: too long", chat, {**m, "messages": ASK, "max_tokens": 5000}, False),
        ("bad: tool not declared", chat, {**m, "messages": ASK, "tools": [WEATHER],
                                          "tool_choice": {"type": "function", "function": {"name": "other"}}}, False),
        ("bad: empty tools", chat, {**m, "messages": ASK, "tools": []}, False),
        ("bad: tool_choice without tools", chat, {**m, "messages": ASK, "tool_choice": "required"}, False),
        ("bad: too long chat prompt", chat, {**m, "messages": [{"role": "user", "content": "word " * 1100}]}, False),
        ("bad: no prompt", text, {**m, "max_tokens": 3}, False),
        ("bad: too long prompt", text, {**m, "prompt": "word " * 1100, "max_tokens": 3}, False),
        ("completion logprobs 6", text, {**m, "prompt": "x", "max_tokens": 3, "logprobs": 6}, True),
        ("bad: logprobs 21", text, {**m, "prompt": "x", "logprobs": 21}, False),
    ]  # fmt: skip


def send(client: httpx.Client, url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    if body.get("stream"):
        with client.stream("POST", url + path, json=body) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, response.json()
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        return 200, [json.loads(line) for line in lines if line != "[DONE]"]
    response = client.post(url + path, json=body)
    return response.status_code, response.json()


def outputs(body: Any) -> Any:
    """What greedy decoding fixes: texts, tool calls (without their random ids), finish
    reasons and token counts; for a stream, the same joined over its chunks."""
    if isinstance(body, list) and body and str(body[0].get("type", "")).startswith("response."):
        # a Responses stream: its events in order, the text, the final status and usage
        done = body[-1]["response"]
        usage = done["usage"]
        text = "".join(e["delta"] for e in body if e["type"] == "response.output_text.delta")
        types = [e["type"] for i, e in enumerate(body) if i == 0 or e["type"] != body[i - 1]["type"]]
        return types, text, done["status"], (usage["input_tokens"], usage["output_tokens"])
    if isinstance(body, dict) and body.get("object") == "response":
        texts = [[c.get("text") for c in item.get("content") or ()] for item in body["output"]]
        usage = body["usage"]
        return texts, body["status"], body["incomplete_details"], (usage["input_tokens"], usage["output_tokens"])
    if isinstance(body, list):  # a stream's chunks
        joined: dict[int, dict[str, str]] = {}
        usage = None
        for chunk in body:
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                slot = joined.setdefault(c["index"], {"text": "", "args": "", "finish": ""})
                delta = c.get("delta", {})
                slot["text"] += c.get("text") or delta.get("content") or ""
                for call in delta.get("tool_calls") or ():
                    slot["args"] += (call.get("function") or {}).get("arguments") or ""
                slot["finish"] = c.get("finish_reason") or slot["finish"]
        return joined, usage and (usage["prompt_tokens"], usage["completion_tokens"])
    if "choices" not in body:  # /tokenize, /detokenize: all of it is deterministic
        return body
    choices = []
    for c in body["choices"]:
        message = c.get("message") or {}
        calls = [(t["function"]["name"], json.loads(t["function"]["arguments"])) for t in message.get("tool_calls") or ()]
        choices.append((c.get("text"), message.get("content"), calls, c["finish_reason"]))
    return choices, (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])


def failed_stream(reply: tuple[int, Any]) -> bool:
    """A 200 stream that carried only an error event."""
    chunks = reply[1]
    return reply[0] == 200 and isinstance(chunks, list) and len(chunks) == 1 and "error" in chunks[0]


def kinds(chunks: list[Any]) -> dict[str, Any]:
    """The first chunk of each kind in a stream."""
    first: dict[str, Any] = {}
    for chunk in chunks:
        if "type" in chunk:
            kind = chunk["type"]
        elif not chunk.get("choices"):
            kind = "usage"
        else:
            c = chunk["choices"][0]
            delta = c.get("delta") or {}
            marks = [("role", "role" in delta), ("tool_calls", bool(delta.get("tool_calls"))),
                     ("content", bool(c.get("text") or delta.get("content"))), ("finish", bool(c.get("finish_reason")))]
            kind = "+".join(k for k, present in marks if present) or "empty"
        first.setdefault(kind, chunk)
    return first


def compare(name: str, ours: tuple[int, Any], theirs: tuple[int, Any], greedy: bool) -> list[str]:
    problems = []
    if ours[0] != theirs[0]:
        if ours[0] >= 500 and failed_stream(theirs):
            # Both failed in the engine; lylm waits for the first output before answering,
            # so its status says so, where vLLM's stream carries an error event.
            return []
        return [f"{name}: status lylm {ours[0]}, vllm {theirs[0]}: {ours[1]} / {theirs[1]}"]
    if ours[0] != 200:
        for side, body in (("lylm", ours[1]), ("vllm", theirs[1])):
            error = body.get("error") if isinstance(body, dict) else None
            if not isinstance(error, dict) or not isinstance(error.get("message"), str) or "type" not in error:
                problems.append(f"{name}: {side}'s error is not OpenAI-shaped: {body}")
        return problems
    if isinstance(ours[1], list):
        # A stream: how its chunks are cut depends on timing, so compare the first chunk of
        # each kind (role, content, tool call, finish, usage; a Responses event's type).
        mine, yours = kinds(ours[1]), kinds(theirs[1])
        problems += [f"{name}: only lylm sends {k!r} chunks" for k in mine.keys() - yours.keys()]
        # lylm sends nothing for a token that adds no text (half a UTF-8 character) and
        # asks for no logprobs; vLLM sends an empty chunk.
        problems += [f"{name}: only vllm sends {k!r} chunks" for k in yours.keys() - mine.keys() - {"empty"}]
        pairs = [(mine[k], yours[k]) for k in mine.keys() & yours.keys()]
    else:
        pairs = [(ours[1], theirs[1])]
    seen = set()
    for a, b in pairs:
        for d in differences(shape(a), shape(b)):
            generic = ".".join("*" if p.isdigit() else p for p in d.split("."))
            if generic not in KEPT_DIFFERENCES and generic not in seen:
                seen.add(generic)
                problems.append(f"{name}: {generic}")
    if greedy and outputs(ours[1]) != outputs(theirs[1]):
        problems.append(f"{name}: outputs differ: lylm {outputs(ours[1])} / vllm {outputs(theirs[1])}")
    return problems


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, dict[str, int]]]:
    yield from _servers(tmp_path_factory.mktemp("parity"), SERVING)


def _servers(workdir: Path, extra: dict[str, Any] | None = None) -> Iterator[tuple[str, str, dict[str, int]]]:
    """lylm and vLLM's server over the same greedy tiny model, engine args plus ``extra``."""
    model = greedy_tiny_model(workdir, workdir)
    args = {"model": str(model), **TINY_MODEL_ENGINE_ARGS, **(extra or {})}
    flags = []
    for key, value in args.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    vllm = ServerProcess(
        "--model", str(model), "--served-model-name", MODEL, "--host", "127.0.0.1", "--disable-log-stats", *flags,
        module="vllm.entrypoints.openai.api_server", log=workdir / "vllm.log",
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    blank = {str(i): -100 for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()}
    try:
        pool = EnginePool(PoolConfig.from_dict({"models": {MODEL: [{"engine_args": args}]}}))
        with uvicorn_thread(create_app(pool)) as lylm_url:
            vllm.wait_ready(300)
            yield lylm_url, vllm.url, blank
    finally:
        vllm.stop()


def run_cases(lylm_url: str, vllm_url: str, blank: dict[str, int]) -> list[str]:
    problems = []
    with httpx.Client(timeout=120) as client:
        for name, path, body, greedy in request_cases():
            if body.get("logit_bias") == "BLANK":
                # random weights would pad a forced call's JSON with whitespace forever
                body = {**body, "logit_bias": blank}
            ours, theirs = send(client, lylm_url, path, body), send(client, vllm_url, path, body)
            problems += compare(name, ours, theirs, greedy)
        for path in ("/v1/models", "/version"):
            a, b = client.get(lylm_url + path), client.get(vllm_url + path)
            problems += compare(f"GET {path}", (a.status_code, a.json()), (b.status_code, b.json()), False)
    return problems


def test_lylm_answers_as_vllm_serve_does(servers: tuple[str, str, dict[str, int]]) -> None:
    problems = run_cases(*servers)
    assert not problems, "\n".join(problems)


def test_the_openai_client_reads_lylms_responses(servers: tuple[str, str, dict[str, int]]) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{servers[0]}/v1", api_key="unused", max_retries=0, timeout=60)
    whole = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=6)
    assert whole.status == "incomplete" and whole.incomplete_details is not None  # random weights: no EOS in 6
    assert whole.output_text and whole.usage is not None and whole.usage.output_tokens == 6
    events = list(client.responses.create(model=MODEL, input="Hello there", max_output_tokens=6, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.completed" and events[-1].response.output_text == deltas == whole.output_text


EMBED = {"runner": "pooling", "convert": "embed"}


def embedding_cases() -> list[tuple[str, str, dict[str, Any], bool]]:
    m = {"model": MODEL}
    return [
        ("embed", "/v1/embeddings", {**m, "input": "Once upon a time"}, True),
        ("embed several", "/v1/embeddings", {**m, "input": ["One", "Two words", "Three more words"]}, True),
        ("embed token ids", "/v1/embeddings", {**m, "input": [[40, 41, 42], [43, 44]]}, True),
        ("embed base64", "/v1/embeddings", {**m, "input": "Once", "encoding_format": "base64"}, True),
        ("bad: embed dimensions", "/v1/embeddings", {**m, "input": "Once", "dimensions": 8}, False),
        ("bad: embed no input", "/v1/embeddings", {**m}, False),
        ("bad: embed too long", "/v1/embeddings", {**m, "input": "word " * 1100}, False),
    ]


def vector(embedding: Any) -> list[float]:
    """An embedding as floats, from a list or from base64 (float32, this machine's order)."""
    if isinstance(embedding, str):
        import array
        import base64

        return list(array.array("f", base64.b64decode(embedding)))
    return [float(x) for x in embedding]


def cosine(x: list[float], y: list[float]) -> float:
    dot = sum(p * q for p, q in zip(x, y))
    norm = (sum(p * p for p in x) * sum(q * q for q in y)) ** 0.5
    return dot / norm if norm else float(x == y)


def run_embedding_cases(lylm_url: str, vllm_url: str) -> list[str]:
    problems = []
    with httpx.Client(timeout=120) as client:
        for name, path, body, greedy in embedding_cases():
            ours, theirs = send(client, lylm_url, path, body), send(client, vllm_url, path, body)
            problems += compare(name, ours, theirs, False)
            if greedy and ours[0] == theirs[0] == 200:
                # The same weights (dummy, from the same seed): the same vectors, up to the
                # rounding of batches cut differently (bf16 on a GPU): cosine >= 0.999.
                a = [vector(d["embedding"]) for d in ours[1]["data"]]
                b = [vector(d["embedding"]) for d in theirs[1]["data"]]
                same = len(a) == len(b) and all(len(x) == len(y) and cosine(x, y) >= 0.999 for x, y in zip(a, b))
                counts = [(r[1]["usage"]["prompt_tokens"], r[1]["usage"]["total_tokens"]) for r in (ours, theirs)]
                if not same or counts[0] != counts[1]:
                    problems.append(
                        f"{name}: embeddings or usage differ: {str(a)[:120]} {ours[1]['usage']} / "
                        f"{str(b)[:120]} {theirs[1]['usage']}"
                    )
    return problems


@pytest.fixture(scope="module")
def embedding_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, dict[str, int]]]:
    yield from _servers(tmp_path_factory.mktemp("parity-embed"), EMBED)


def test_embeddings_as_vllm_serve_answers_them(embedding_servers: tuple[str, str, dict[str, int]]) -> None:
    problems = run_embedding_cases(*embedding_servers[:2])
    assert not problems, "\n".join(problems)
    # Chat with an embedding model: vLLM has no such route for it (404, {"detail": ...});
    # lylm answers an OpenAI-shaped 400 saying why.
    r = httpx.post(f"{embedding_servers[0]}/v1/chat/completions", json={"model": MODEL, "messages": ASK}, timeout=60)
    assert r.status_code == 400 and "generation" in r.json()["error"]["message"], r.text


def test_a_prompt_too_long_has_one_code_on_both_endpoints(servers: tuple[str, str, dict[str, int]]) -> None:
    lylm_url = servers[0]
    long = "word " * 1100  # more tokens than the context of 1,024
    chat = httpx.post(
        f"{lylm_url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": long}]}, timeout=60
    )
    text = httpx.post(f"{lylm_url}/v1/completions", json={"model": MODEL, "prompt": long}, timeout=60)
    for response, param in ((chat, "messages"), (text, "prompt")):
        assert response.status_code == 400, response.text
        assert (response.json()["error"]["code"], response.json()["error"]["param"]) == ("context_length_exceeded", param)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "generate").mkdir()
        gen = _servers(Path(tmp) / "generate", SERVING)
        found = run_cases(*next(gen))
        gen.close()
        (Path(tmp) / "embed").mkdir()
        gen = _servers(Path(tmp) / "embed", EMBED)
        found += run_embedding_cases(*next(gen)[:2])
        gen.close()
        print("\n".join(found) or "no differences")
    sys.exit(1 if found else 0)
