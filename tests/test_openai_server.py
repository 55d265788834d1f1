"""`lylm serve` with its embedded default (2 real CPU engines, weights 1:2),
driven over HTTP on 127.0.0.1 by the official openai client; every test runs against
a one-process server and a server of two front-end workers over the same engines."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import psutil
import pytest

from _server import ServerProcess, metric

pytestmark = pytest.mark.engines

MODEL = "lylm-tiny-demo"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lylm-cache")


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def server(cache: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    proc = ServerProcess("--body-timeout", "2", env={"LYLM_CACHE_DIR": str(cache)}, log=log, workers=request.param)
    try:
        proc.wait_ready(timeout=240)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(server: ServerProcess, cache: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(cache / "tiny-model"))


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_honours_max_tokens_and_counts_usage_exactly(client: openai.OpenAI, tokenizer: Any) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=7, extra_body={"ignore_eos": True}
    )
    (choice,) = r.choices
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert r.usage is not None
    expected_prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.usage.prompt_tokens == len(expected_prompt)
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == len(expected_prompt) + 7
    assert len(tokenizer.encode(choice.message.content, add_special_tokens=False)) <= 7 + 2


def test_chat_stream_matches_the_non_streamed_answer(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, seed=1)
    whole = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    middle = [c.choices[0].delta.content for c in chunks[1:] if c.choices and not c.choices[0].finish_reason]
    assert all(middle), middle  # no empty deltas (tokens ending mid-character wait for the rest)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]


def test_n_two_gives_two_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=5, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage is not None and r.usage.completion_tokens == 10
    streamed = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=5, stream=True))
    done = {c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason}
    assert done == {0, 1}


def test_stop_strings_end_the_output(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, prompt="The pool serves", max_tokens=24, temperature=0)
    full = client.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    assert cut.model_extra is not None and cut.model_extra["stop_reason"] == stop  # vLLM's field: which stop


def test_completions_accept_strings_lists_and_token_ids(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["one", "two"], n=2, max_tokens=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage is not None and r.usage.completion_tokens == 12
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.prompt_tokens == 4
    chunks = list(client.completions.create(model=MODEL, prompt="stream me", max_tokens=4, stream=True, logprobs=2, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert len(tokens) == 4


def test_chat_logprobs_have_openais_shape(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_json_schema_output_parses_and_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "yn", "schema": schema}},
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        ({"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, 400, "temperature", "temperature"),
        ({"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
        ({"model": MODEL, "messages": "hi"}, 400, "messages", "messages"),
        ({"model": MODEL, "messages": MESSAGES, "tools": []}, 400, "tools", "tools"),
        ({"model": "gpt-4o", "messages": MESSAGES}, 404, "model", MODEL),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x " * 2000}]}, 400, "messages", "context length"),
        ({"messages": MESSAGES}, 400, "model", "model"),
    ],
)
def test_bad_requests_get_openai_errors(server: ServerProcess, body: dict[str, Any], status: int, param: str, fragment: str) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert fragment in error["message"]


def test_openai_client_raises_the_matching_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert f"'{MODEL}'" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", logprobs=99)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]"])
def test_malformed_bodies_get_400(server: ServerProcess, raw: bytes) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_abandoned_stream_is_aborted_and_released(server: ServerProcess) -> None:
    before = sum(v for k, v in metric(server.url, "lylm_requests_total").items() if 'outcome="aborted"' in k)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert sum(metric(server.url, "lylm_in_flight_requests").values()) == 1
    # The client is gone: the engine aborts and the books are clear (in well under a
    # second; the bound catches "never", not a loaded CI machine).
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        in_flight = sum(metric(server.url, "lylm_in_flight_requests").values())
        aborted = sum(v for k, v in metric(server.url, "lylm_requests_total").items() if 'outcome="aborted"' in k)
        if in_flight == 0 and aborted == before + 1:
            break
        time.sleep(0.05)
    assert (in_flight, aborted) == (0, before + 1)
    assert sum(metric(server.url, "lylm_in_flight_tokens").values()) == 0


def test_request_heads_are_bounded_in_every_worker(server: ServerProcess) -> None:
    # The server's protocol is bounded (issue 15, items 4 and 10), in each worker process.
    for _ in range(4):  # new connections: whichever worker takes each
        r = httpx.get(f"{server.url}/health", headers={"x-big": "a" * 100_000}, timeout=30)
        assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{")
        response = b""
        while chunk := sock.recv(65536):  # until the server closes
            response += chunk
    assert response.startswith(b"HTTP/1.1 408 "), response


def test_the_demo_engines_run_in_float32(server: ServerProcess) -> None:
    # Issue 15, item 12: bfloat16 died with SIGILL in vLLM's CPU attention on some CPUs.
    configs = [line for line in server.log_path.read_text(errors="replace").splitlines() if "dtype=torch." in line]
    assert configs and all("dtype=torch.float32" in line for line in configs), configs[:2]


def test_metrics_and_health_cover_both_engines(server: ServerProcess) -> None:
    health = httpx.get(f"{server.url}/health").json()
    engines = health["models"][MODEL]["engines"]
    assert [(e["engine"], e["weight"], e["healthy"]) for e in engines] == [(0, 1.0, True), (1, 2.0, True)]
    weights = metric(server.url, "lylm_engine_weight")
    assert weights == {'{engine="0",model="lylm-tiny-demo"}': 1.0, '{engine="1",model="lylm-tiny-demo"}': 2.0}
    completed = metric(server.url, "lylm_requests_total")
    assert all(completed[f'{{engine="{e}",model="{MODEL}",outcome="completed"}}'] > 0 for e in (0, 1))
    assert metric(server.url, "lylm_time_to_first_token_seconds_count")


def test_every_worker_serves_and_one_scrape_counts_them_all(server: ServerProcess) -> None:
    before = sum(metric(server.url, "lylm_requests_total").values())
    sent = 0
    # Connections go to whichever worker accepts first; concurrent ones reach both.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        threads = [
            threading.Thread(
                target=lambda i=i: httpx.post(
                    f"{server.url}/v1/completions",
                    json={"model": MODEL, "prompt": f"spread {i}", "max_tokens": 20, "ignore_eos": True},
                    timeout=60,
                ).raise_for_status()
            )
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        sent += len(threads)
        per_worker = metric(server.url, "lylm_worker_requests_total")
        if server.workers == 1 or (len(per_worker) == 2 and all(v > 0 for v in per_worker.values())):
            break
    if server.workers == 1:
        assert per_worker == {}  # one process: no worker metrics
    else:
        assert sorted(per_worker) == ['{worker="0"}', '{worker="1"}'] and min(per_worker.values()) > 0, per_worker
    # One scrape, from whichever worker answers it, has every worker's requests.
    after = sum(metric(server.url, "lylm_requests_total").values())
    assert after - before == sent


def _engine_cores(server: ServerProcess) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                found.append(p)
    return found


def _ejected(server: ServerProcess, within: float) -> tuple[int | None, float]:
    """The engine /health first lists as unhealthy within ``within`` s, and when (from now)."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        engines = httpx.get(f"{server.url}/health").json()["models"][MODEL]["engines"]
        dead = [e for e in engines if not e["healthy"]]
        if dead:
            return dead[0]["engine"], time.monotonic() - start
        time.sleep(0.02)
    return None, time.monotonic() - start


def test_a_killed_engine_core_is_ejected_restarted_and_serves_again(server: ServerProcess) -> None:
    cores = _engine_cores(server)
    assert len(cores) == 2, [p.name() for p in cores]
    cores[0].kill()
    # Ejected within 2 s; meanwhile requests go to the other engine.
    ejected, _ = _ejected(server, within=2.0)
    assert ejected is not None, "the engine was not taken out of balancing within 2 s"
    for i in range(4):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": f"meanwhile {i}", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
    # Restarted (and, with workers, attached to by every worker) within two minutes.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        engines = httpx.get(f"{server.url}/health").json()["models"][MODEL]["engines"]
        if engines[ejected]["healthy"] and engines[ejected]["restarts"] == 1:
            break
        time.sleep(0.5)
    assert engines[ejected]["healthy"] and engines[ejected]["restarts"] == 1, engines
    key = f'{{engine="{ejected}",model="{MODEL}",outcome="completed"}}'
    before = metric(server.url, "lylm_requests_total")
    for i in range(30):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": f"after {i}", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
    after = metric(server.url, "lylm_requests_total")
    assert after[key] > before.get(key, 0), "the restarted engine served nothing"
    failed = [k for k in after if 'outcome="failed"' in k]
    assert all(after[k] == before.get(k, 0) for k in failed)


def test_a_killed_engine_worker_process_is_ejected_as_fast_with_workers_as_without(server: ServerProcess) -> None:
    # Issue 26: vLLM's worker process (the engine core's child) killed: 0.1-0.4 s to leave
    # /health's healthy engines with one process, 4.4 s with two workers.
    children = [c for core in _engine_cores(server) for c in core.children(recursive=True)]
    assert children, [p.name() for p in _engine_cores(server)]
    before = {e["engine"]: e["restarts"] for e in httpx.get(f"{server.url}/health").json()["models"][MODEL]["engines"]}
    children[0].kill()
    ejected, took = _ejected(server, within=3.0)
    assert ejected is not None and took < 1.0, f"ejected after {took:.2f} s"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        engines = httpx.get(f"{server.url}/health").json()["models"][MODEL]["engines"]
        if all(e["healthy"] for e in engines) and engines[ejected]["restarts"] == before[ejected] + 1:
            break
        time.sleep(0.5)
    assert all(e["healthy"] for e in engines) and engines[ejected]["restarts"] == before[ejected] + 1, engines
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "back", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text


def test_sigterm_under_load_drains_and_leaves_no_engine_process(server: ServerProcess) -> None:
    # Last in this module: it stops the shared server.
    children = {p.pid: " ".join(p.cmdline()) for p in psutil.Process(server.proc.pid).children(recursive=True)}
    assert sum("resource_tracker" not in cmd for cmd in children.values()) >= 4  # 2 x (core + worker)
    lock = threading.Lock()
    counts = {"sent": 0, "completed": 0, "rejected_503": 0, "refused": 0}
    problems: list[str] = []

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def client(i: int) -> None:
        # Steady load: one request after another until the server turns us away.
        while True:
            count("sent")
            body = {"model": MODEL, "prompt": f"drain {i}", "max_tokens": 100, "ignore_eos": True, "stream": i % 2 == 0}
            try:
                with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                    raw = r.read()
                    if r.status_code == 503 and json.loads(raw)["error"]["code"] == "shutting_down":
                        count("rejected_503")
                        return
                    if r.status_code != 200:
                        problems.append(f"{r.status_code}: {raw[:200]!r}")
                        return
                    done = raw.rstrip().endswith(b"data: [DONE]") if i % 2 == 0 else b'"length"' in raw
                    if not done or b'"error"' in raw:
                        problems.append(f"incomplete: {raw[-200:]!r}")
                        return
                    count("completed")
            except httpx.ConnectError:  # the server stopped listening: refused before any work
                count("refused")
                return
            except httpx.HTTPError as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # steady state
    # uvicorn re-raises the signal once it has shut down cleanly, as a Unix program should.
    assert server.stop(timeout=90) == -signal.SIGTERM, server.tail()
    for t in threads:
        t.join(30)
    print(f"\nSIGTERM under load: {counts}")
    # Every request either finished whole or was turned away; none broke midway.
    assert problems == [], problems[:3]
    assert counts["completed"] + counts["rejected_503"] + counts["refused"] == counts["sent"]
    assert counts["completed"] > 0 and counts["rejected_503"] > 0, counts
    assert "draining: " in server.tail(200)

    def alive() -> dict[int, str]:
        found = {}
        for pid, cmd in children.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    found[pid] = cmd
        return found

    # Engines are stopped before the server exits; multiprocessing's resource
    # tracker leaves by itself once it sees its parent gone.
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive() == {}
