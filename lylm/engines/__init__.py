"""The engine side: how lylm runs vLLM.

One launcher (:mod:`._launcher`) starts every local engine core, pinned to its GPUs;
the engines over it (:mod:`._local`) own their core, attach to one launched for
several front-end workers (:mod:`._cores`), or attach to a core on another host
(:mod:`._remote`). Beside them: placement and start order (:mod:`._placement`), the
watchdog that stops engine processes a dead server left behind (:mod:`._watchdog`),
every private vLLM name lylm relies on (:mod:`._internals`), engine statistics
(:mod:`._stats`), vLLM's output parsers (:mod:`._parsing`), the remote host's side
(:mod:`._core_host`, :mod:`._ray`) and the ``vllm`` command (:mod:`._cli`).

Nothing here imports vLLM at module level: it loads when an engine starts.
"""
