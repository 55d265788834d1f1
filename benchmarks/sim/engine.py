"""One simulated engine: vLLM-style continuous batching over a paged KV cache.

Each step the scheduler (as vLLM v1's, FCFS) gives every running request its next
piece of work (one decode token, or the next prefill chunk) and then admits waiting
requests in arrival order while there is token budget (``max_num_batched_tokens``),
a sequence slot (``max_num_seqs``) and KV cache. Step time comes from the
calibrated :class:`~benchmarks.sim.model.StepModel`.

Simplifications (documented in the results README):

- admission reserves KV blocks for the whole request (prompt + output), so a
  running request never runs out of cache and nothing is ever preempted; a request
  that does not fit waits at the head of the queue (no skipping, like vLLM's FCFS);
- prefix-cache hits are counted at admission, over full 16-token blocks, and at least
  the last prompt token is always recomputed (vLLM needs its logits);
- a prompt block becomes reusable when the step that computes it ends;
- a finished prefill samples the first token in the same step, as vLLM does.

:class:`SimEngine` is a real :class:`lylm.Engine` subclass so that real
:class:`lylm.Instance` objects can wrap it; the pool-facing methods are unused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lylm import Engine
from lylm._engine import EngineStep, RenderedPrompt
from lylm._books import Tally
from lylm._instance import Instance
from lylm._request import RequestInfo

from .kvcache import BLOCK_SIZE, KVCache
from .model import StepModel


@dataclass(frozen=True)
class EngineConfig:
    """One simulated instance: its speed factor and vLLM's scheduler limits."""

    speed: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int = 131072  # the tiny model's 64 MiB at 512 bytes a token
    prefix_caching: bool = True


@dataclass(eq=False)
class SimRequest:
    """One request's life in the simulator (times in simulated seconds)."""

    info: RequestInfo
    arrival: float
    output_tokens: int
    hashes: tuple[int, ...]
    instance: Instance | None = None
    computed: int = 0  # prompt tokens in the KV cache (hits included)
    generated: int = 0
    cached_tokens: int = 0
    first_token: float | None = None
    finished: float | None = None
    # The pool's own running account of this request (lylm's books, not a copy).
    tally: Tally | None = None
    # KV blocks held: named (prefix-cache) ones in prefix order, and private ones.
    named: list[int] = field(default_factory=list)
    private: int = 0
    registered: int = 0  # leading prompt blocks already named or skipped

    @property
    def prompt_len(self) -> int:
        return self.info.prompt_tokens


class SimEngine(Engine):
    """Scheduler state and timing of one simulated engine."""

    def __init__(self, config: EngineConfig, model: StepModel) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.cache = KVCache(config.kv_cache_tokens // BLOCK_SIZE)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.batch: list[tuple[SimRequest, int]] = []
        self.busy_time = 0.0
        self.steps = 0
        self.served = 0
        self.output_tokens = 0
        self.batched_tokens = 0  # prompt tokens computed (cache hits excluded) plus decode tokens

    # -- simulation ----------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a step is in progress."""
        return bool(self.batch)

    def add(self, request: SimRequest) -> None:
        """Queue a dispatched request."""
        blocks = -(-(request.prompt_len + request.output_tokens) // BLOCK_SIZE)
        if blocks > self.cache.num_blocks:
            raise ValueError(f"{request.info.request_id} needs {blocks} KV blocks, the cache has {self.cache.num_blocks}")
        self.waiting.append(request)
        self._signal()

    def start_step(self) -> float | None:
        """Schedule the next batch; return its duration, or None when there is no work."""
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[SimRequest, int]] = []
        tokens = decode_seqs = context = 0
        for r in self.running:
            if budget <= 0:
                break
            if r.computed < r.prompt_len:
                n = min(r.prompt_len - r.computed, budget)
            else:
                n = 1
                decode_seqs += 1
                context += r.prompt_len + r.generated
            batch.append((r, n))
            budget -= n
            tokens += n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            r = self.waiting[0]
            if not self._admit(r):
                break  # FCFS: the head waits for cache; nobody overtakes it
            self.waiting.popleft()
            self.running.append(r)
            n = min(r.prompt_len - r.computed, budget)
            batch.append((r, n))
            budget -= n
            tokens += n
        self._signal()
        if not batch:
            return None
        self.batch = batch
        self.steps += 1
        self.batched_tokens += tokens
        duration = self.model.step_time(tokens, decode_seqs, context, self.config.speed)
        self.busy_time += duration
        return duration

    def _admit(self, r: SimRequest) -> bool:
        """Reserve KV blocks for ``r`` (reusing cached prefix blocks); False if they don't fit."""
        hits = 0
        if self.config.prefix_caching:
            # At least the last prompt token is recomputed: its logits give the first token.
            hits = min(self.cache.lookup(r.hashes), (r.prompt_len - 1) // BLOCK_SIZE)
        hit_hashes = r.hashes[:hits]
        need = -(-(r.prompt_len + r.output_tokens) // BLOCK_SIZE) - hits
        if self.cache.available(hit_hashes) < need:
            return False
        self.cache.allocate(hit_hashes, need)
        if self.config.prefix_caching:
            # What vLLM's scheduler reports at admission (PrefixCacheStats): prompt
            # tokens looked up, and those found cached.
            self.signals.prefix_cache_queries += r.prompt_len
            self.signals.prefix_cache_hits += hits * BLOCK_SIZE
        r.named = list(hit_hashes)
        r.private = need
        r.registered = hits
        r.computed = r.cached_tokens = hits * BLOCK_SIZE
        return True

    def finish_step(self, now: float) -> list[tuple[SimRequest, int]]:
        """End the step at ``now``; return (request, new tokens) for each request that produced output."""
        produced: list[tuple[SimRequest, int]] = []
        done: list[SimRequest] = []
        for r, n in self.batch:
            if r.computed < r.prompt_len:
                r.computed += n
                self._name_blocks(r)
                if r.computed < r.prompt_len:
                    continue  # a middle prefill chunk: vLLM emits nothing
                r.first_token = now
            r.generated += 1
            produced.append((r, 1))
            if r.generated >= r.output_tokens:
                r.finished = now
                done.append(r)
        for r in done:
            self.running.remove(r)
            self.cache.release(r.named, r.private)
            self.served += 1
            self.output_tokens += r.generated
        self.batch = []
        self._signal()
        return produced

    def _name_blocks(self, r: SimRequest) -> None:
        """Enter the prompt blocks this step completed into the prefix cache."""
        if not self.config.prefix_caching:
            return
        full = min(r.computed // BLOCK_SIZE, len(r.hashes))
        for h in r.hashes[r.registered : full]:
            if self.cache.register(h):
                r.named.append(h)
                r.private -= 1
        r.registered = max(r.registered, full)

    def _signal(self) -> None:
        # Live signals, as VLLMEngine reports them, for balancers that read them.
        self.signals.running = len(self.running)
        self.signals.waiting = len(self.waiting)
        self.signals.kv_cache_usage = self.cache.usage

    # -- the Engine interface (the simulator drives the methods above instead) --

    async def start(self) -> None:
        """Nothing to start."""

    @property
    def healthy(self) -> bool:
        """Always healthy."""
        return True

    @property
    def max_model_len(self) -> int:
        """The KV cache bounds requests, not a context length."""
        return self.config.kv_cache_tokens

    def default_sampling_params(self) -> Any:
        """Unused."""
        return None

    async def render_text(self, text: str) -> RenderedPrompt:
        """Unused: simulated prompts are token ids already."""
        raise NotImplementedError

    async def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, chat_template_kwargs: Mapping[str, Any] | None = None
    ) -> RenderedPrompt:
        """Unused."""
        raise NotImplementedError

    def generate(self, request_id: str, prompt: RenderedPrompt, sampling_params: Any) -> AsyncGenerator[EngineStep, None]:
        """Unused: the simulator's event loop drives the engine."""
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        """Unused."""

    def num_unfinished_requests(self) -> int:
        """Requests queued or running."""
        return len(self.waiting) + len(self.running)

    async def shutdown(self) -> None:
        """Nothing to stop."""
