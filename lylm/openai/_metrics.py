"""Prometheus metrics for one pool, per model and engine, in the app's own registry.

Counters that the pool's books already hold (requests by outcome, tokens, in
flight, health) are read from the books at scrape time, so they can never drift
from what balancers see; latencies are observed per request through the pool's
observer hook. Nothing is registered in prometheus_client's global registry, so
two apps (or vLLM's own metrics) in one process never clash.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._instance import STATES
from .._pool import EnginePool
from .._request import RequestRecord

LABELS = ["model", "engine"]

# Seconds; from a tiny CPU model's milliseconds up to a long generation on a big one.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _BooksCollector(Collector):
    def __init__(self, pool: EnginePool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "lylm_requests", "Requests that ended, by outcome.", labels=[*LABELS, "outcome"]
        )
        prompt = CounterMetricFamily("lylm_prompt_tokens", "Prompt tokens prefilled.", labels=LABELS)
        generated = CounterMetricFamily("lylm_generated_tokens", "Tokens generated.", labels=LABELS)
        in_flight = GaugeMetricFamily("lylm_in_flight_requests", "Requests in flight.", labels=LABELS)
        in_flight_tokens = GaugeMetricFamily(
            "lylm_in_flight_tokens",
            "Prompt tokens not yet prefilled plus decode budget not yet used.",
            labels=LABELS,
        )
        healthy = GaugeMetricFamily("lylm_engine_healthy", "1 if the engine takes requests.", labels=LABELS)
        weight = GaugeMetricFamily("lylm_engine_weight", "The engine's configured weight.", labels=LABELS)
        running = GaugeMetricFamily("lylm_engine_running", "Requests the engine's scheduler runs.", labels=LABELS)
        waiting = GaugeMetricFamily("lylm_engine_waiting", "Requests queued in the engine.", labels=LABELS)
        kv = GaugeMetricFamily("lylm_engine_kv_cache_usage", "Fraction of KV cache in use.", labels=LABELS)
        state = GaugeMetricFamily(
            "lylm_engine_state",
            "1 for the engine's current state (starting, healthy, draining, dead, restarting), else 0.",
            labels=[*LABELS, "state"],
        )
        restarts = CounterMetricFamily(
            "lylm_engine_restarts", "Times a failed engine was replaced by a new one.", labels=LABELS
        )
        queries = CounterMetricFamily(
            "lylm_engine_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=LABELS
        )
        hits = CounterMetricFamily(
            "lylm_engine_prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=LABELS
        )
        info = GaugeMetricFamily(
            "lylm_engine_info",
            "1 per engine; core: local or remote, attaches_at: where a remote engine core attaches.",
            labels=[*LABELS, "core", "attaches_at"],
        )
        for instance in self._pool.instances():
            s = instance.stats()
            labels = [s.model, str(instance.index)]
            outcomes = (("completed", s.completed), ("failed", s.failed), ("aborted", s.aborted), ("bounced", s.bounced))
            for outcome, count in outcomes:
                requests.add_metric([*labels, outcome], count)
            prompt.add_metric(labels, s.prompt_tokens)
            generated.add_metric(labels, s.generated_tokens)
            in_flight.add_metric(labels, s.in_flight_requests)
            in_flight_tokens.add_metric(labels, s.in_flight_tokens)
            healthy.add_metric(labels, 1 if s.healthy else 0)
            weight.add_metric(labels, instance.weight)
            running.add_metric(labels, s.running)
            waiting.add_metric(labels, s.waiting)
            kv.add_metric(labels, s.kv_cache_usage)
            for name in STATES:
                if name != "stopped":  # stopped instances have left the pool
                    state.add_metric([*labels, name], 1 if s.state == name else 0)
            restarts.add_metric(labels, s.restarts)
            queries.add_metric(labels, s.prefix_cache_queries)
            hits.add_metric(labels, s.prefix_cache_hits)
            info.add_metric([*labels, "local" if s.remote is None else "remote", s.remote or ""], 1)
        yield from (requests, prompt, generated, in_flight, in_flight_tokens)
        yield from (healthy, weight, running, waiting, kv, state, restarts, queries, hits, info)


class _ShadowCollector(Collector):
    """Shadow balancers' counts (``EnginePool.add_shadow``), read at scrape time."""

    def __init__(self, pool: EnginePool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "shadow"]
        decisions = CounterMetricFamily(
            "lylm_shadow_decisions", "Requests a shadow balancer was asked about.", labels=labels
        )
        agreements = CounterMetricFamily(
            "lylm_shadow_agreements", "Requests where it chose as the active balancer did.", labels=labels
        )
        errors = CounterMetricFamily(
            "lylm_shadow_errors", "Requests where it raised or chose a non-candidate.", labels=labels
        )
        choices = CounterMetricFamily(
            "lylm_shadow_choices", "What it would have chosen, by engine.", labels=[*labels, "engine"]
        )
        for r in self._pool.shadow_report():
            decisions.add_metric([r.model, r.name], r.decisions)
            agreements.add_metric([r.model, r.name], r.agreements)
            errors.add_metric([r.model, r.name], r.errors)
            for index, count in sorted(r.chosen.items()):
                choices.add_metric([r.model, r.name, str(index)], count)
        yield from (decisions, agreements, errors, choices)


class _KVCollector(Collector):
    """Predicted against reported cached tokens, for balancers routing by KV events
    (``EnginePool.kv_agreement``), read at scrape time."""

    def __init__(self, pool: EnginePool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        predictions = CounterMetricFamily(
            "lylm_kv_predictions",
            "Requests routed by KV events, by how the cached tokens predicted for the chosen engine compared "
            "with what it reported (exact, over, under; none: no event stream, the table's guess).",
            labels=[*LABELS, "result"],
        )
        predicted = CounterMetricFamily(
            "lylm_kv_predicted_tokens", "Cached prompt tokens predicted, over predicted requests.", labels=LABELS
        )
        reported = CounterMetricFamily(
            "lylm_kv_reported_tokens", "Cached prompt tokens the engine reported, over predicted requests.",
            labels=LABELS,
        )
        blocks = GaugeMetricFamily(
            "lylm_kv_index_blocks", "KV-cache blocks the pool's index holds for the engine, from its events.",
            labels=LABELS,
        )
        replays = CounterMetricFamily(
            "lylm_kv_event_replays", "Gaps in the engine's KV events asked again from its buffer.", labels=LABELS
        )
        for a in self._pool.kv_agreement():
            labels = [a.model, str(a.index)]
            if a.blocks is not None:
                blocks.add_metric(labels, a.blocks)
                replays.add_metric(labels, a.replays)
            for result, count in (("exact", a.exact), ("over", a.over), ("under", a.under), ("none", a.unpredicted)):
                predictions.add_metric([*labels, result], count)
            predicted.add_metric(labels, a.predicted_tokens)
            reported.add_metric(labels, a.reported_tokens)
        yield from (predictions, predicted, reported, blocks, replays)


class PoolMetrics:
    """The Prometheus metrics of one pool and the HTTP adapter in front of it."""

    def __init__(self, pool: EnginePool, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(_BooksCollector(pool))
        self.registry.register(_ShadowCollector(pool))
        self.registry.register(_KVCollector(pool))
        self._ttft = Histogram(
            "lylm_time_to_first_token_seconds",
            "From dispatch to an engine until its first token.",
            LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._latency = Histogram(
            "lylm_request_latency_seconds",
            "From dispatch to an engine until the request ended.",
            LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_responses = Counter(
            "lylm_http_responses",
            "HTTP responses by route and status (errors before dispatch included).",
            ["route", "status"],
            registry=self.registry,
        )
        pool.add_observer(self.observe)

    def observe(self, record: RequestRecord) -> None:
        """Record one finished request's latencies."""
        labels = (record.request.model, str(record.instance.index))
        if record.time_to_first_token is not None:
            self._ttft.labels(*labels).observe(record.time_to_first_token)
        if record.outcome == "completed":
            self._latency.labels(*labels).observe(record.latency)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
