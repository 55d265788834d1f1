"""Where engines run: the device variable set around one engine's spawn, and one
start lock per GPU.

Several engines on one multi-GPU host need two things (seen on 4 x H200, vLLM 0.26):

- **Pinning at spawn.** vLLM's ``device_ids`` engine argument moves an engine to its
  GPU inside the process, but the kernels it then loads from vLLM's torch.compile
  cache were built for device 0 and fail on any other GPU. vLLM pins its own
  data-parallel ranks by starting each engine process with the platform's
  device-control variable (``CUDA_VISIBLE_DEVICES`` on NVIDIA) naming its GPUs, so
  the engine sees them as devices 0..N-1; lylm does the same. The variable belongs
  to the whole process, so it is set only while one engine process is spawned,
  under a process-wide lock, and restored at once (:func:`spawn_environment`).
- **Start order.** vLLM sizes an engine's KV cache from the GPU memory free while
  it profiles, so engines that share a GPU must start one after another; engines
  on disjoint GPUs may start side by side (:class:`StartLocks`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence

import anyio
import anyio.lowlevel
import attrs

from .._exceptions import ConfigError

# The environment is one per process, so the lock that guards it is too: two pools
# (or two event loops) in one process must not interleave their spawns either.
_SPAWN_LOCK = threading.Lock()


def visible_devices(
    gpu_ids: Sequence[int],
    *,
    variable: str,
    environ: Mapping[str, str],
    device_count: int | None,
    path: str,
) -> str:
    """The value of ``variable`` that shows an engine exactly ``gpu_ids``.

    ``gpu_ids`` index the devices this process sees: when the server itself was
    started with ``CUDA_VISIBLE_DEVICES=2,3``, GPU 0 is physical device 2, as in
    vLLM's own data-parallel ranks. ``device_count`` (None: unknown) bounds the
    indices; a GPU that does not exist is a :class:`ConfigError` at ``path``.
    """
    inherited = environ.get(variable, "")
    visible = [d.strip() for d in inherited.split(",")] if inherited.strip() else None
    count = len(visible) if visible is not None else device_count
    for i, gpu in enumerate(gpu_ids):
        if count is not None and gpu >= count:
            seen = f"{variable}={inherited}" if visible is not None else "this machine"
            raise ConfigError(
                f"{path}[{i}]",
                f"GPU {gpu} does not exist: {seen} shows {count} device{'' if count == 1 else 's'}"
                + (f" (0-{count - 1})" if count > 1 else ""),
            )
    if visible is None:
        return ",".join(str(gpu) for gpu in gpu_ids)
    return ",".join(visible[gpu] for gpu in gpu_ids)


@contextlib.contextmanager
def spawn_environment(
    values: Mapping[str, str] | Callable[[], Mapping[str, str]],
    *,
    environ: MutableMapping[str, str] | None = None,
) -> Iterator[Mapping[str, str]]:
    """Set ``values`` in the process environment for the duration of one spawn.

    Holds a process-wide lock, so two spawns never interleave; on exit every
    variable gets its previous value back (or is removed if it had none). Child
    processes copy the environment when they are spawned, so an engine process
    started inside the block keeps these values, and the server does not.
    ``values`` may be a function: it is called under the lock (where no other
    spawn's values are in the environment), and the block gets what it returned.
    """
    env = os.environ if environ is None else environ
    with _SPAWN_LOCK:
        chosen = dict(values() if callable(values) else values)
        saved = {name: env.get(name) for name in chosen}
        try:
            env.update(chosen)
            yield chosen
        finally:
            for name, old in saved.items():
                if old is None:
                    env.pop(name, None)
                else:
                    env[name] = old


@attrs.define(eq=False)
class _Claim:
    gpus: frozenset[int] | None  # None: every device (an unpinned instance)
    owner: str
    granted: anyio.Event = attrs.field(factory=anyio.Event)

    def conflicts(self, other: _Claim) -> bool:
        return self.gpus is None or other.gpus is None or bool(self.gpus & other.gpus)


class StartLocks:
    """One start lock per GPU: engines on disjoint GPUs start together, others in turn.

    ``async with locks.hold(gpu_ids, owner):`` waits until no engine start holds
    any of ``gpu_ids``. An instance without GPUs is not pinned and may use any
    device the process sees, so it holds every lock and starts alone. Claims are
    granted first come, first served among those that overlap, so instances that
    share a GPU start in the order they asked (config order at pool start).
    """

    def __init__(self) -> None:
        self._claims: list[_Claim] = []  # held and waiting, in the order they asked

    @contextlib.asynccontextmanager
    async def hold(self, gpu_ids: Iterable[int], owner: str) -> AsyncIterator[None]:
        """Hold the start locks of ``gpu_ids`` (every lock if empty) for the block."""
        gpus = frozenset(gpu_ids)
        claim = _Claim(gpus or None, owner)
        self._claims.append(claim)
        self._grant()
        try:
            await claim.granted.wait()
            # Granted while its start was being cancelled (another start failed): stop here.
            await anyio.lowlevel.checkpoint_if_cancelled()
            yield
        finally:
            self._claims.remove(claim)
            self._grant()

    def blockers(self, owner: str) -> list[str]:
        """Who holds a lock that ``owner`` waits for; empty once it holds its locks."""
        mine = next((c for c in self._claims if c.owner == owner), None)
        if mine is None or mine.granted.is_set():
            return []
        return [c.owner for c in self._claims if c.granted.is_set() and c.conflicts(mine)]

    def _grant(self) -> None:
        # A claim is granted when it overlaps no claim before it in the queue,
        # held or still waiting: nobody jumps ahead of an earlier claim on a GPU.
        for i, claim in enumerate(self._claims):
            if claim.granted.is_set():
                continue
            if not any(claim.conflicts(earlier) for earlier in self._claims[:i]):
                claim.granted.set()
