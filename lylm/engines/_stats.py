"""A vLLM stat logger that feeds one engine's live signals, and keeps vLLM's
Prometheus logger out of the process.

Unless a Prometheus logger is supplied, every AsyncLLM adds vLLM's own, whose
constructor unregisters every ``vllm:`` metric from the global registry: with
several engines in one process the last one would own them all, each labelled
``engine="0"``. vLLM skips its own when a supplied factory is a subclass of its
``PrometheusStatLogger``, so this logger is one, but one that touches no registry:
the pool exports its own per-engine metrics instead.
"""

from __future__ import annotations

from typing import Any

from .._engine import EngineSignals
from ._internals import stat_logger_base


def stat_logger_factory(signals: EngineSignals) -> type[Any] | None:
    """A logger class recording into ``signals``, or None if this vLLM lacks the hook."""
    base: Any = stat_logger_base()  # vLLM's PrometheusStatLogger
    if base is None:  # pragma: no cover - depends on the installed vLLM
        return None

    class LylmStatLogger(base):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_indexes: Any = None) -> None:
            # Deliberately not calling super().__init__: that is what clears the
            # global registry and registers vLLM's process-wide metrics.
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            signals.running = scheduler_stats.num_running_reqs
            signals.waiting = scheduler_stats.num_waiting_reqs
            signals.kv_cache_usage = scheduler_stats.kv_cache_usage
            prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
            if prefix is not None:
                signals.prefix_cache_queries += prefix.queries
                signals.prefix_cache_hits += prefix.hits

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return LylmStatLogger
