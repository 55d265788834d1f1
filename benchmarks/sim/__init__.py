"""A discrete-event simulator of a lylm pool, driven by lylm's real balancers.

    flock /tmp/lylm-bench.lock .venv/bin/python -m benchmarks.sim.calibrate --out benchmarks/results/sim
    .venv/bin/python -m benchmarks.sim.scenarios --out benchmarks/results/sim
    flock /tmp/lylm-bench.lock .venv/bin/python -m benchmarks.sim.real --out benchmarks/results/sim

Modules: ``model`` (the calibrated step-time model), ``kvcache`` (paged KV cache with
prefix caching and LRU eviction), ``engine`` (one simulated engine: continuous
batching), ``sim`` (the event loop that dispatches through real ``lylm.Instance``
books and real balancers), ``workloads`` (arrival and prompt generators),
``scenarios`` (the four scenarios, tables, plots), ``calibrate`` (fit the step-time
model on a real CPU engine), ``real`` (the same arrivals through a real EnginePool).
Results and findings: benchmarks/results/sim/README.md.
"""
