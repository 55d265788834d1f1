"""KVAware: routing by what the engines' KV events say they hold, against load; the guard
per candidate; the table as the fallback per instance. (With real engines: test_kv_events.py.)"""

from __future__ import annotations

import random
from collections.abc import Mapping

import anyio
import attrs
import pytest

from _helpers import make_instances, until
from lylm import RequestInfo
from lylm.balancers import KVAware, resolve_balancer
from lylm.balancers._prefix_table import block_hashes


def request(ids: list[int], cached: Mapping[str, int] | None = None) -> RequestInfo:
    r = RequestInfo(model="m", request_id="r", prompt_tokens=len(ids), max_tokens=16, prompt_token_ids=ids)
    r = KVAware().preparer()(r)  # hashed where rendered, as the pool does
    return attrs.evolve(r, cached_tokens=cached)


def prompt(seed: int, n: int = 1000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def test_it_is_registered_asks_for_events_and_hashes_16_token_blocks_where_rendered() -> None:
    balancer = resolve_balancer("kv_aware", rng=random.Random(0), path="balancer")
    assert isinstance(balancer, KVAware) and balancer.kv_events and not balancer.reads_token_ids
    ids = prompt(1, 100)
    assert request(ids).prefix_hashes == tuple(block_hashes(ids, 16, 10_000))


def test_the_engine_that_holds_the_most_of_the_prompt_wins_at_equal_load() -> None:
    a, b, c = make_instances([1, 1, 1])
    balancer = KVAware(rng=random.Random(0))
    cached = {a.name: 0, b.name: 896, c.name: 128}
    assert balancer.choose([a, b, c], request(prompt(1), cached)) is b
    assert balancer.by_events == 1


def test_the_events_overrule_the_table_an_evicted_prefix_is_not_chased() -> None:
    a, b = make_instances([1, 1])
    balancer = KVAware(rng=random.Random(0))
    ids = prompt(2)
    # The table remembers sending the prompt to a...
    first = balancer.choose([a, b], request(ids, {a.name: 0, b.name: 0}))
    other = b if first is a else a
    # ... but its engine evicted it, and the other engine holds it (another front end's work).
    assert balancer.choose([a, b], request(ids, {first.name: 0, other.name: 768})) is other


def test_without_events_for_an_instance_its_table_stands_in() -> None:
    a, b = make_instances([1, 1])
    balancer = KVAware(rng=random.Random(0))
    ids = prompt(3)
    first = balancer.choose([a, b], request(ids, {}))  # no streams (yet): the table
    assert balancer.unmatched == 1
    for _ in range(5):
        assert balancer.choose([a, b], request(ids, {})) is first
    assert balancer.by_table == 5
    # Events for one instance only: the other is still judged by the table.
    other = b if first is a else a
    assert balancer.choose([a, b], request(ids, {other.name: 0})) is first


def test_by_default_the_holder_wins_within_the_guard_whatever_its_prefill_queue() -> None:
    a, b = make_instances([1, 1])
    balancer = KVAware(rng=random.Random(0))
    a.in_flight_prefill_tokens, a.in_flight_requests = 5000, 2
    assert balancer.choose([a, b], request(prompt(4), {a.name: 512, b.name: 0})) is a
    # Equal holdings: the fewest requests, then the shortest prefill queue.
    b.in_flight_requests = 2
    assert balancer.choose([a, b], request(prompt(4), {a.name: 512, b.name: 512})) is b


def test_a_cache_hit_is_weighed_against_the_work_in_flight() -> None:
    a, b = make_instances([1, 1])
    balancer = KVAware(rng=random.Random(0), load_weight=1.0)
    ids = prompt(4)
    cached = {a.name: 512, b.name: 0}
    assert balancer.choose([a, b], request(ids, cached)) is a  # 488 to prefill against 1,000
    a.in_flight_prefill_tokens = 600  # one request's prefill queued there, within the guard
    a.in_flight_requests = 1
    assert balancer.choose([a, b], request(ids, cached)) is b  # 1,088 against 1,000
    assert balancer.by_load == 1
    # Weighted: half the load per token on an instance of weight 2.
    c, d = make_instances([2, 1])
    c.in_flight_prefill_tokens, c.in_flight_requests = 600, 1
    assert balancer.choose([c, d], request(ids, {c.name: 512, d.name: 0})) is c  # 788 against 1,000


def test_the_guard_skips_only_the_overloaded_candidate_and_others_keep_their_affinity() -> None:
    a, b, c = make_instances([1, 1, 1])
    balancer = KVAware(rng=random.Random(0), load_weight=0.0, load_factor=1.25, load_slack=0.0)
    a.in_flight_requests = 6  # loads 7, 1, 1: mean 3, line 3.75
    p, q = prompt(5), prompt(6)
    # a holds p but is over the line: p goes elsewhere.
    assert balancer.choose([a, b, c], request(p, {a.name: 896, b.name: 0, c.name: 0})) is not a
    assert balancer.overloaded == 1
    # b holds q and is not over the line: q's affinity holds though a is hot.
    assert balancer.choose([a, b, c], request(q, {a.name: 0, b.name: 896, c.name: 0})) is b
    # Everybody over the line (one candidate): it is still chosen.
    assert balancer.choose([a], request(p, {a.name: 896})) is a


def test_prompts_that_share_nothing_spread_as_least_outstanding_spreads_them() -> None:
    instances = make_instances([1, 1, 1, 1])
    balancer = KVAware(rng=random.Random(0))
    seen = set()
    for i in range(4):
        chosen = balancer.choose(instances, request(prompt(100 + i, 200), {x.name: 0 for x in instances}))
        chosen.in_flight_prefill_tokens += 200
        chosen.in_flight_requests += 1
        seen.add(chosen.name)
    assert len(seen) == 4 and balancer.unmatched == 4


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="load_weight"):
        KVAware(load_weight=-1)
    with pytest.raises(ValueError, match="load_factor"):
        KVAware(load_factor=0.5)


# -- in a pool (fake engines: they publish no events, so every cache is seen empty) ----------


def _config(**engine_args: object) -> dict[str, object]:
    args = {"model": "fake", **engine_args}
    return {"models": {"m": [{"engine_args": args}, {"engine_args": args}]}}


def test_a_model_routed_by_kv_events_may_not_turn_prefix_caching_off_nor_set_its_own_events() -> None:
    from lylm import ConfigError, EnginePool
    from lylm.testing import FakeEngine

    with pytest.raises(ConfigError, match=r'models\["m"\]\[0\]\.engine_args\.enable_prefix_caching'):
        EnginePool.from_config(_config(enable_prefix_caching=False), balancer="kv_aware",
                               engine_factory=lambda s: FakeEngine())
    with pytest.raises(ConfigError, match=r'models\["m"\]\[0\]\.engine_args\.kv_events_config'):
        EnginePool.from_config(_config(kv_events_config={"publisher": "zmq"}), balancer="kv_aware",
                               engine_factory=lambda s: FakeEngine())
    # Another balancer: the pool leaves the engines' args alone.
    plain = EnginePool.from_config(_config(enable_prefix_caching=False), balancer="prefix_aware",
                                   engine_factory=lambda s: FakeEngine())
    assert plain.kv_agreement() == []


@pytest.mark.anyio
async def test_the_pool_subscribes_per_engine_fills_cached_tokens_and_counts_agreement() -> None:
    from pathlib import Path

    from lylm import EnginePool, RequestRecord
    from lylm.openai._metrics import PoolMetrics
    from lylm.testing import FakeEngine

    made: list[dict[str, object]] = []

    def factory(spec: object) -> FakeEngine:
        made.append(dict(spec.engine_args))  # type: ignore[attr-defined]
        return FakeEngine()

    records: list[RequestRecord] = []
    async with EnginePool.from_config(_config(), balancer="kv_aware", engine_factory=factory) as pool:
        pool.add_observer(records.append)
        metrics = PoolMetrics(pool)
        # Each engine was asked to publish, on sockets of its own in a private folder.
        assert all(args["enable_prefix_caching"] is True for args in made)
        endpoints = [args["kv_events_config"]["endpoint"] for args in made]  # type: ignore[index]
        assert len(set(endpoints)) == 2 and all(e.startswith("ipc://") for e in endpoints)
        folder = Path(endpoints[0][len("ipc://"):]).parent
        assert folder.stat().st_mode & 0o777 == 0o700
        for i in range(4):
            async for _ in pool.generate("m", prompt(i, 100), None):
                pass
        names = {i.name for i in pool.instances("m")}
        assert all(r.request.cached_tokens == {n: 0 for n in names} for r in records)
        agreement = pool.kv_agreement()
        assert sum(a.exact for a in agreement) == 4 and not any(a.over or a.under for a in agreement)
        assert [a.blocks for a in agreement] == [0, 0]  # subscribed; fake engines publish nothing
        text = metrics.render().decode()
        assert 'lylm_kv_predictions_total{engine="0",model="m",result="exact"}' in text
        assert 'lylm_kv_index_blocks{engine="1",model="m"} 0.0' in text
        # An instance removed: its stream ends and its entries go.
        kv = pool._router.kv
        assert kv is not None
        gone = pool.instances("m")[1]
        key = kv._subscriptions[gone.name].key
        await pool.remove_instance(gone)
        assert gone.name not in kv._subscriptions
        await until(lambda: key not in kv.index.instances(), timeout=5)
    assert not folder.exists()  # closed: streams stopped, sockets' folder removed


@pytest.mark.anyio
async def test_a_users_balancer_that_asks_for_kv_events_reads_cached_tokens_per_candidate() -> None:
    from collections.abc import Sequence

    from lylm import Balancer, EnginePool, Instance
    from lylm.testing import FakeEngine

    seen: list[Mapping[str, int] | None] = []

    class MostCached(Balancer):
        kv_events = True  # no preparer: the pool names the prompt from its token ids

        def choose(self, candidates: Sequence[Instance], request: RequestInfo) -> Instance:
            seen.append(request.cached_tokens)
            cached = request.cached_tokens or {}
            return max(candidates, key=lambda c: cached.get(c.name, 0))

    async with EnginePool.from_config(_config(), balancer=MostCached(), engine_factory=lambda s: FakeEngine()) as pool:
        async for _ in pool.generate("m", prompt(7, 64), None):
            pass
        assert seen == [{i.name: 0 for i in pool.instances("m")}]


@pytest.mark.anyio
async def test_a_remote_instance_with_a_kv_events_port_is_heard_over_tcp() -> None:
    import time

    import msgspec
    import zmq

    from _server import free_port
    from lylm import EnginePool, EngineSpec, RequestRecord
    from lylm.testing import FakeEngine

    port, kv_port = free_port(), free_port()
    remote = {"address": "127.0.0.1", "port": port, "kv_events_port": kv_port}
    config = {"models": {"m": [{"engine_args": {"model": "fake"}},
                               {"engine_args": {"model": "fake"}, "remote": remote}]}}  # fmt: skip
    specs: list[EngineSpec] = []

    def factory(spec: EngineSpec) -> FakeEngine:
        specs.append(spec)
        return FakeEngine()

    ids = prompt(8, 40)
    records: list[RequestRecord] = []
    async with EnginePool.from_config(config, balancer="kv_aware", engine_factory=factory) as pool:
        pool.add_observer(records.append)
        local, far = pool.instances("m")
        # The remote core is told to connect its publisher to the pool's address (no wildcard).
        assert specs[1].engine_args["kv_events_config"]["endpoint"] == f"tcp://127.0.0.1:{kv_port}"
        # A stand-in core: vLLM's batch format, one 16-token block of the prompt.
        stored = {"type": "BlockStored", "block_hashes": [7], "parent_block_hash": None, "token_ids": ids[:16],
                  "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None}  # fmt: skip
        batch = msgspec.msgpack.encode([time.time(), [stored]])
        publisher = zmq.Context.instance().socket(zmq.PUB)
        publisher.setsockopt(zmq.LINGER, 0)
        publisher.connect(f"tcp://127.0.0.1:{kv_port}")
        kv = pool._router.kv
        assert kv is not None
        key = kv._subscriptions[far.name].key
        try:
            with anyio.fail_after(10):  # until the subscription is up: a batch sent before is dropped
                while kv.index.blocks(key) == 0:
                    publisher.send_multipart([b"", (0).to_bytes(8, "big"), batch])
                    await anyio.sleep(0.05)
        finally:
            publisher.close(0)
        async for _ in pool.generate("m", ids, None):
            pass
        assert records[-1].request.cached_tokens == {local.name: 0, far.name: 16}


def test_the_prefill_queue_leaves_out_predicted_hits_and_closes_with_every_end() -> None:
    from lylm._books import Books, Tally
    from lylm._request import RequestEnd

    (a,) = make_instances([1])
    books = Books(clock=lambda: 0.0, engine_died=lambda instance, why: None)
    balancer = KVAware()
    r = request(prompt(1, 100), {a.name: 64})

    served = Tally(a, r)  # one process: steps
    books.begin(served)
    assert a.in_flight_prefill_tokens == 36  # 100 prompt tokens, 64 of them cached
    served.step(1)
    assert a.in_flight_prefill_tokens == 0
    books.end(served, RequestEnd("completed", served.remaining, 1), balancer)

    aborted = Tally(a, r)  # gone before its first output
    books.begin(aborted)
    books.end(aborted, RequestEnd("aborted", aborted.remaining), balancer)
    assert a.in_flight_prefill_tokens == 0

    elsewhere = Tally(a, r)  # a front-end worker's request, as the hub books it
    books.begin(elsewhere)
    elsewhere.sync(elsewhere.remaining - 101, 1)
    assert a.in_flight_prefill_tokens == 0
    books.end(elsewhere, RequestEnd("completed", elsewhere.remaining, 1), balancer)
    assert (a.in_flight_requests, a.in_flight_tokens, a.in_flight_prefill_tokens) == (0, 0, 0)


@pytest.mark.anyio
async def test_a_kv_aware_pool_cancelled_before_prefill_leaves_no_books_behind() -> None:
    from lylm import EnginePool
    from lylm.testing import FakeEngine

    async with EnginePool.from_config(_config(), balancer="kv_aware",
                                      engine_factory=lambda s: FakeEngine(prefill_delay=5)) as pool:  # fmt: skip
        async def one() -> None:
            async for _ in pool.generate("m", prompt(9, 100), None):
                pass

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(one)
            with anyio.fail_after(5):  # all four booked, none prefilled (nothing cached anywhere)
                while sum(i.in_flight_prefill_tokens for i in pool.instances("m")) < 400:
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()
        for instance in pool.instances("m"):
            assert (instance.in_flight_requests, instance.in_flight_tokens, instance.in_flight_prefill_tokens) == (0, 0, 0)


def test_a_prefix_nobody_holds_goes_back_to_its_home_within_the_guard() -> None:
    a, b = make_instances([1, 1])
    balancer = KVAware(rng=random.Random(0))
    ids = prompt(11)
    nobody = {a.name: 0, b.name: 0}
    home = balancer.choose([a, b], request(ids, nobody))
    other = b if home is a else a
    home.in_flight_requests = 2  # busier than the other, within the guard: still its home
    assert balancer.choose([a, b], request(ids, nobody)) is home
    assert balancer.by_home == 1
    home.in_flight_requests = 20  # over the guard's line: elsewhere
    assert balancer.choose([a, b], request(ids, nobody)) is other
