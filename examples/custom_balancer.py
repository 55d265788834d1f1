"""A custom balancer: keep each user on one instance (warm prefix cache), else least loaded.

Run it against a config of your own:  python examples/custom_balancer.py config.json MODEL
"""

from __future__ import annotations

import sys
import zlib

import anyio

from lylm import Balancer, EnginePool
from lylm.balancers import LeastOutstanding


class StickyByUser(Balancer):
    """Requests with the same session key go to the same instance; others to the least loaded."""

    def __init__(self, *, rng=None):
        self.fallback = LeastOutstanding(rng=rng)

    def choose(self, candidates, request):
        if request.session_key is None:
            return self.fallback.choose(candidates, request)
        # A stable hash (not hash(), which is salted per process) of the user's key.
        return candidates[zlib.crc32(request.session_key.encode()) % len(candidates)]


async def main(config_path: str, model: str) -> None:
    from vllm import SamplingParams

    async with EnginePool.from_config(config_path, balancer=StickyByUser()) as pool:
        for user in ["alice", "bob", "alice"]:
            params = SamplingParams(max_tokens=16)
            async for out in pool.generate(model, f"Hello from {user}", params, session_key=user):
                if out.finished:
                    print(user, "->", out.outputs[0].text)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
