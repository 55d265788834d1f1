"""Remote instances: an engine core started on "another host" (here: another process,
``vllm serve --headless`` on 127.0.0.1) attaches to the pool next to a local engine.

The pool listens on the instance's ``remote.address:port`` and the core connects, as
vLLM's multi-node data parallelism does. Killed under load, the remote instance leaves
balancing within 2 s, its requests end (retried or failed: none hangs), the local
engine's are untouched; started again, the core is attached again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import zmq

from lylm import ConfigError, EnginePool, EngineStartError, PoolConfig, RequestRecord, RestartPolicy
from lylm.engines._core_host import headless_command, headless_environment, serve_flags
from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

from _helpers import until
from _server import free_port

MODEL = "tiny"

#: The tests' remote.heartbeat: the default, and a lost core must be noticed within 2 s.
#: The cores run in this session (a process group of their own; the Ray test's too: the
#: local head ray.init starts runs its workers in the driver's session): with Linux's autogroup
#: scheduling, a core in a session of its own was starved on this 2-core machine while the
#: pool's session kept both cores busy (runnable for up to 0.46 s without a CPU), and the
#: default heartbeat then fired on healthy cores (BENCHMARKS.md 18).
HEARTBEAT = 1.2
NOTICED_WITHIN = 2.0


def _listening(port: int) -> bool:
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        for c in psutil.Process().net_connections(kind="tcp")
    )


def _instance(model: str, **remote: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"engine_args": {"model": model, **TINY_MODEL_ENGINE_ARGS}}
    if remote:
        item["remote"] = remote
    return item


# -- the config ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote", "where", "says"),
    [
        ({"address": "0.0.0.0", "port": 1}, "remote.address", "every interface"),
        ({"address": "::", "port": 1}, "remote.address", "every interface"),
        ({"address": "10.0.0.2", "port": 0}, "remote.port", "1 to 65535"),
        ({"address": "10.0.0.2", "port": "13345"}, "remote.port", "1 to 65535"),
        ({"port": 13345}, "remote.address", "required"),
        ({"address": "10.0.0.2", "port": 13345, "timeout": 0}, "remote.timeout", "positive"),
        ({"address": "10.0.0.2", "port": 13345, "heartbeat": "1"}, "remote.heartbeat", "positive"),
        ({"address": "10.0.0.2", "port": 13345, "heartbeat": 0.05}, "remote.heartbeat", "at least 0.1 s"),
        ({"address": "10.0.0.2", "port": 13345, "ray": {"gpus": -1}}, "remote.ray.gpus", "0 or more"),
        ({"address": "10.0.0.2", "port": 13345, "ray": {"gpus": 1.5}}, "remote.ray.gpus", "whole number"),
        ({"address": "10.0.0.2", "port": 13345, "ray": {"cpus": 0}}, "remote.ray.cpus", "positive"),
        ({"address": "10.0.0.2", "port": 13345, "ray": {"address": ""}}, "remote.ray.address", "Ray cluster"),
        ({"address": "10.0.0.2", "port": 13345, "ray": {"node": "a"}}, "remote.ray.node", "unknown key"),
        ({"address": "10.0.0.2", "port": 13345, "ray": 1}, "remote.ray", "object"),
        ({"address": "10.0.0.2", "port": 13345, "host": "x"}, "remote.host", "unknown key"),
        ({"address": "10.0.0.2", "port": 13345, "kv_events_port": 0}, "remote.kv_events_port", "1 to 65535"),
        ({"address": "10.0.0.2", "port": 13345, "kv_events_port": 13345}, "remote.kv_events_port", "differ"),
    ],
)
def test_a_wrong_remote_names_its_key(remote: dict[str, Any], where: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PoolConfig.from_dict({"models": {MODEL: [{"engine_args": {"model": "m"}, "remote": remote}]}})
    assert caught.value.path == f'models["{MODEL}"][0].{where}'
    assert says in str(caught.value)


def test_a_remote_instance_takes_no_gpus_nor_vllms_own_addressing() -> None:
    remote = {"address": "10.0.0.2", "port": 13345}
    with pytest.raises(ConfigError, match="chosen on its own host") as caught:
        PoolConfig.from_dict({"models": {MODEL: [{"engine_args": {"model": "m"}, "devices": {"gpu_ids": [0]},
                                                   "remote": remote}]}})
    assert caught.value.path.endswith("[0].devices.gpu_ids")
    with pytest.raises(ConfigError, match="set by lylm") as caught:
        PoolConfig.from_dict({"models": {MODEL: [{"engine_args": {"model": "m", "data_parallel_rpc_port": 1},
                                                   "remote": remote}]}})
    assert caught.value.path.endswith("[0].engine_args.data_parallel_rpc_port")
    with pytest.raises(ConfigError, match='already models\\["a"\\]\\[0\\]') as caught:
        PoolConfig.from_dict({"models": {"a": [_instance("m", **remote)], "b": [_instance("m", **remote)]}})
    assert caught.value.path == 'models["b"][0].remote'


def test_a_remote_instance_survives_the_round_trip_through_specs() -> None:
    config = PoolConfig.from_dict({"models": {MODEL: [_instance("m"), _instance("m", address="10.0.0.2", port=13345)]}})
    local, remote = config.models[0].instances
    assert local.remote is None
    assert remote.remote is not None and remote.remote.describe() == "10.0.0.2:13345"
    assert (remote.remote.timeout, remote.remote.heartbeat) == (60, 1.2)
    assert PoolConfig.from_specs([local, remote]).models == config.models


def test_a_ray_placement_survives_the_round_trip_and_engine_args_become_serve_flags() -> None:
    from lylm.engines._core_host import serve_flags

    remote = {"address": "10.0.0.2", "port": 13345, "ray": {"gpus": 2, "address": "auto"}}
    config = PoolConfig.from_dict({"models": {MODEL: [_instance("m", **remote)]}})
    (spec,) = config.models[0].instances
    assert spec.remote is not None and spec.remote.ray is not None
    assert (spec.remote.ray.gpus, spec.remote.ray.cpus, spec.remote.ray.address) == (2, 1.0, "auto")
    assert PoolConfig.from_specs([spec]).models == config.models
    assert serve_flags({"model": "m", "max_model_len": 4096, "enforce_eager": True, "trust_remote_code": False,
                        "seed": None, "hf_overrides": {"a": 1}}) == [
        "--max-model-len", "4096", "--enforce-eager", "--hf-overrides", '{"a": 1}']


def test_a_server_with_workers_refuses_remote_instances_before_anything_starts() -> None:
    from lylm.server import serve

    config = PoolConfig.from_dict({"models": {MODEL: [_instance("m", address="10.0.0.2", port=13345)]}})
    with pytest.raises(ConfigError, match="workers 1") as caught:
        serve(config, workers=2)
    assert caught.value.path == f'models["{MODEL}"][0].remote'


# -- the disconnect watch, on real ZeroMQ sockets -----------------------------------


def _stray(port: int, payload: bytes = b"", host: str = "127.0.0.1") -> None:
    """A connection that is not ZeroMQ: a port scanner's, a health probe's."""
    import socket

    with socket.create_connection((host, port), timeout=5) as s:
        if payload:
            s.sendall(payload)


def test_the_disconnect_watch_ignores_connections_that_are_not_the_core_and_sees_the_core_leave() -> None:
    """The front end's sockets listen on TCP ports: a stray connection's end must not eject
    a healthy core (ZeroMQ reports it as a disconnect too), the core's own end must."""
    import types

    from lylm.engines._remote import Disconnects
    from _helpers import wait_until

    context = zmq.Context(io_threads=2)  # as vLLM's client has it
    try:
        front_in, front_out = context.socket(zmq.ROUTER), context.socket(zmq.PULL)
        ports = [front_in.bind_to_random_port("tcp://127.0.0.1"), front_out.bind_to_random_port("tcp://127.0.0.1")]
        core_in, core_out = context.socket(zmq.DEALER), context.socket(zmq.PUSH)
        core_in.connect(f"tcp://127.0.0.1:{ports[0]}")
        core_in.send(b"ready")
        assert front_in.poll(10_000) and front_in.recv_multipart()[1] == b"ready"
        llm = types.SimpleNamespace(engine_core=types.SimpleNamespace(
            resources=types.SimpleNamespace(input_socket=front_in, output_socket=front_out)))
        watch = Disconnects(llm)
        # The core's output connection made after the watch began: a peer like the first.
        core_out.connect(f"tcp://127.0.0.1:{ports[1]}")
        core_out.send(b"out")
        assert front_out.poll(10_000) and front_out.recv() == b"out"

        for port in ports:
            _stray(port)
            _stray(port, b"GET / HTTP/1.0\r\n\r\n")
        wait_until(lambda: watch.seen() or watch.strays == 4)
        assert watch.strays == 4 and watch.what is None

        core_out.close(linger=0)  # the core goes (its late-made connection counts as the core's)
        wait_until(watch.seen)
        assert watch.what is not None and watch.what.startswith("output socket"), watch.what
        watch.close()
    finally:
        context.destroy(linger=0)  # closes every socket, then ends the context


# -- a remote core missing at the pool's start (fake engines) ---------------------


@pytest.mark.anyio
async def test_the_pool_starts_without_a_remote_core_that_is_missing_and_takes_it_in_when_it_connects() -> None:
    from lylm import EngineSpec
    from lylm.testing import FakeEngine, FakeSamplingParams

    core_up = False
    attempts = 0

    class Remote(FakeEngine):
        async def start(self) -> None:  # what VLLMEngine raises when no core connected in time
            nonlocal attempts
            attempts += 1
            if not core_up:
                raise TimeoutError("no engine core connected to 10.0.0.2:13345 within 60 s; start it ...")
            await super().start()

    def make(spec: EngineSpec) -> FakeEngine:
        return Remote() if spec.remote is not None else FakeEngine()

    config = {"models": {MODEL: [_instance("m"), _instance("m", address="10.0.0.2", port=13345)]}}
    # max_attempts=1: waiting for a remote core does not use up the restart attempts.
    restart = RestartPolicy(initial_backoff=0.01, max_backoff=0.01, max_attempts=1, jitter=0)
    async with EnginePool.from_config(config, engine_factory=make, restart=restart, health_interval=0.01) as pool:
        local, remote = pool.instances(MODEL)
        assert local.state == "healthy"
        assert remote.state in ("dead", "restarting") and not remote.healthy
        assert "no engine core connected to 10.0.0.2:13345" in (remote.last_error or "")
        assert remote.stats().remote == "10.0.0.2:13345"
        # The local instance serves meanwhile.
        outputs = [o async for o in pool.generate(MODEL, "hi", FakeSamplingParams(max_tokens=2))]
        assert outputs and local.completed == 1
        await until(lambda: attempts >= 5, timeout=10)  # still waiting, past max_attempts
        assert remote.state in ("dead", "restarting")
        core_up = True
        await until(lambda: remote.state == "healthy", timeout=10)
        assert remote.restarts == 1
    # Any other failure of a remote's start still fails the pool's start, as for a local one.

    class Broken(FakeEngine):
        async def start(self) -> None:
            raise RuntimeError("the core connected and failed: wrong model")

    with pytest.raises(EngineStartError, match="wrong model"):
        async with EnginePool.from_config(config, engine_factory=lambda s: Broken() if s.remote else FakeEngine()):
            pass


# -- real engines --------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("remote") / "tiny")


class Namespace:
    """A network namespace joined to this one by a veth pair: the "remote host" gets an
    address of its own, and its link can be cut (packets dropped, no connection closed),
    as a host that loses power or a network partition looks from the pool."""

    def __init__(self) -> None:
        pid = os.getpid()
        n = pid % 250 + 1
        self.name, self.host_link, self.core_link = f"lylm{pid}", f"lh{pid}", f"lc{pid}"
        self.pool_address, self.core_address = f"10.231.{n}.1", f"10.231.{n}.2"

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def create(self) -> None:
        self._ip("netns", "add", self.name)
        self._ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.core_link)
        self._ip("link", "set", self.core_link, "netns", self.name)
        self._ip("addr", "add", f"{self.pool_address}/30", "dev", self.host_link)
        self._ip("link", "set", self.host_link, "up")
        for args in (("addr", "add", f"{self.core_address}/30", "dev", self.core_link),
                     ("link", "set", self.core_link, "up"), ("link", "set", "lo", "up")):
            self._ip("netns", "exec", self.name, "ip", *args)

    def run(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def cut(self) -> None:
        """The core's link goes down: what either side sends is dropped, nothing is closed."""
        self._ip("netns", "exec", self.name, "ip", "link", "set", self.core_link, "down")

    def heal(self) -> None:
        self._ip("netns", "exec", self.name, "ip", "link", "set", self.core_link, "up")

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)  # its veth goes too
        subprocess.run(["ip", "link", "del", self.host_link], capture_output=True, timeout=30)


@pytest.fixture
def namespace() -> Iterator[Namespace | None]:
    """A namespace for the core where this machine lets the tests make one (root, iproute2);
    otherwise None, and the core runs beside the pool on 127.0.0.1."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield None
        return
    made = Namespace()
    try:
        made.create()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        made.delete()
        yield None
        return
    yield made
    made.delete()


class HeadlessCore:
    """``vllm serve MODEL --headless`` pointed at the pool's address: the remote host's part,
    in its own network namespace when there is one."""

    def __init__(self, model: Path, port: int, log: Path, namespace: Namespace | None = None) -> None:
        self.model, self.port, self.log, self.namespace = model, port, log, namespace
        self.pool_address = namespace.pool_address if namespace else "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # vLLM's own command line (not lylm core), the instance's engine args as its flags.
        command = headless_command(str(self.model), self.pool_address, self.port, serve_flags(TINY_MODEL_ENGINE_ARGS))
        if self.namespace is not None:
            command = self.namespace.run(command)
        # With one data-parallel rank, vLLM's core takes the front end's address from
        # VLLM_DP_MASTER_IP (default 127.0.0.1), not from --data-parallel-address.
        environment = headless_environment(self.pool_address, dict(os.environ))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, process_group=0, env=environment
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGSTOP: alive, connections open, nothing answered."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)


@pytest.fixture
def core(model_dir: Path, tmp_path: Path, namespace: Namespace | None) -> Iterator[HeadlessCore]:
    started = HeadlessCore(model_dir, free_port(), tmp_path / "core.log", namespace)
    yield started
    started.kill()


@pytest.mark.engines
@pytest.mark.anyio
async def test_a_remote_core_that_never_connects_leaves_the_pool_to_start_without_it(model_dir: Path) -> None:
    port = free_port()
    config = {"models": {MODEL: [_instance(str(model_dir), address="127.0.0.1", port=port, timeout=2)]}}
    began = time.monotonic()
    with anyio.fail_after(60):
        async with EnginePool.from_config(config, restart=RestartPolicy(initial_backoff=0.1, jitter=0)) as pool:
            started = time.monotonic() - began
            (remote,) = pool.instances(MODEL)
            assert remote.state in ("dead", "restarting")
            assert f"no engine core connected to 127.0.0.1:{port} within 2 s; start it" in (remote.last_error or "")
            # ... and keeps waiting for it (a new front end listens for the core again).
            await until(lambda: remote.state == "restarting" and _listening(port), timeout=30)
            closing = time.monotonic()
    closed = time.monotonic() - closing
    await until(lambda: not _listening(port), timeout=10)
    print(f"\npool started {started:.1f} s after it began, without its remote (timeout 2 s); closed in {closed:.1f} s")


async def _under_load(pool: EnginePool, remote: Any, errors: list[str], stop: anyio.Event) -> None:
    """8 streams until ``stop``; returns once tokens flow on the remote (mid-stream)."""
    from vllm import SamplingParams

    long = SamplingParams(max_tokens=200, ignore_eos=True)

    async def one() -> None:
        while not stop.is_set():
            try:
                async for _ in pool.generate(MODEL, [9, 10, 11], long):
                    pass
            except Exception as exc:
                errors.append(type(exc).__name__)

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(one)
        await stop.wait()


async def _lose_under_load(pool: EnginePool, remote: Any, lose: Any) -> tuple[float, list[str]]:
    """Lose the remote core (``lose()``) with 8 streams running, tokens flowing on it; wait
    for its ejection and for every request it held to end. Returns (ejection s, errors)."""
    errors: list[str] = []
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_under_load, pool, remote, errors, stop)
        streamed = remote.generated_tokens
        await until(lambda: remote.in_flight_requests > 0 and remote.generated_tokens > streamed + 200, timeout=30)
        lose()
        lost = time.monotonic()
        await until(lambda: remote.state != "healthy", timeout=10)
        ejected = time.monotonic() - lost
        stop.set()
        # None hangs: every request the lost core held ends (retried or failed).
        await until(lambda: remote.in_flight_requests == 0, timeout=20)
    return ejected, errors


async def _serves(pool: EnginePool, instance: Any) -> None:
    from vllm import SamplingParams

    served = instance.completed
    with anyio.fail_after(60):  # weighted random: it gets one within a few dozen requests
        while instance.completed == served:
            async for _ in pool.generate(MODEL, [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True)):
                pass


@pytest.mark.engines
@pytest.mark.anyio
async def test_a_remote_core_joins_a_running_pool_dies_and_vanishes_under_load_and_attaches_again(
    model_dir: Path, core: HeadlessCore
) -> None:
    from lylm.openai._monitor import health_report
    from lylm.openai._metrics import PoolMetrics

    # The pool starts before the core does (each wait for it: 5 s): the local engine serves
    # meanwhile, and the core joins when its host starts it.
    config = {"models": {MODEL: [_instance(str(model_dir)),
                                 _instance(str(model_dir), address=core.pool_address, port=core.port, timeout=5,
                                           heartbeat=HEARTBEAT)]}}
    where = f"{core.pool_address}:{core.port}"
    records: list[RequestRecord] = []
    restart = RestartPolicy(initial_backoff=0.1, jitter=0)
    async with EnginePool.from_config(config, restart=restart, health_interval=0.1) as pool:
        local, remote = pool.instances(MODEL)
        assert local.state == "healthy" and remote.state in ("dead", "restarting")
        pool.add_observer(records.append)
        await _serves(pool, local)
        core.start()
        began = time.monotonic()
        await until(lambda: remote.state == "healthy", timeout=180)
        joined = time.monotonic() - began
        # /health and /metrics tell the remote instance from the local one.
        _, health = health_report(pool)
        assert [e["remote"] for e in health["models"][MODEL]["engines"]] == [None, where]
        text = PoolMetrics(pool).render().decode()
        assert f'lylm_engine_info{{attaches_at="",core="local",engine="0",model="{MODEL}"}} 1.0' in text
        assert f'lylm_engine_info{{attaches_at="{where}",core="remote",engine="1",model="{MODEL}"}} 1.0' in text
        await _serves(pool, remote)

        # Anything may connect to the front end's engine-core ports: a connection that is
        # not ZeroMQ (a port scanner's) ends like a disconnect, but is not the core's.
        watch = remote.engine.link._disconnects
        resources = remote.engine._llm.engine_core.resources
        for socket in (resources.input_socket, resources.output_socket):
            host, port = socket.getsockopt(zmq.LAST_ENDPOINT).decode().removeprefix("tcp://").rsplit(":", 1)
            _stray(int(port), host=host)
        await until(lambda: watch.strays == 2)
        assert remote.state == "healthy", remote.last_error
        await _serves(pool, remote)

        # Killed under load: the host closes its connections.
        killed, errors = await _lose_under_load(pool, remote, core.kill)
        assert "disconnected" in (remote.last_error or ""), remote.last_error
        on_local = [r for r in records if r.instance is local]
        assert on_local and all(r.outcome == "completed" for r in on_local), {r.outcome for r in on_local}
        assert all(e == "EngineDeadError" for e in errors), errors
        on_remote = [r for r in records if r.instance is remote and r.outcome == "failed"]
        assert len(errors) == len([r for r in on_remote if r.time_to_first_token is not None])

        core.start()  # its host's supervisor brings it back: the pool attaches again
        began = time.monotonic()
        await until(lambda: remote.state == "healthy", timeout=180)
        attached = time.monotonic() - began
        await _serves(pool, remote)

        # Gone without a word under load: its link cut (in its own namespace), or else the
        # core stopped (SIGSTOP): connections open, nothing answered. The heartbeats notice.
        records.clear()
        how = "link cut" if core.namespace is not None else "SIGSTOP"
        vanished, errors = await _lose_under_load(pool, remote, core.namespace.cut if core.namespace else core.stop)
        assert "heartbeat" in (remote.last_error or ""), remote.last_error
        assert all(e == "EngineDeadError" for e in errors), errors
        assert all(r.outcome == "completed" for r in records if r.instance is local)
        core.kill()

        # Dead again, its restart waiting for a core that does not come: closing the pool
        # ends that wait instead of leaving it to run out.
        await until(lambda: remote.state == "restarting" and _listening(core.port), timeout=30)
        closing = time.monotonic()
        with anyio.fail_after(30):
            await pool.aclose()
    closed = time.monotonic() - closing
    # ... and the wait is over, not left behind in a thread: nothing listens for the core.
    await until(lambda: not _listening(core.port), timeout=10)
    print(f"\nremote core at {where}: joined the running pool {joined:.1f} s after its start; ejected {killed:.3f} s after "
          f"SIGKILL, {vanished:.3f} s after {how} (heartbeat {HEARTBEAT:g} s); attached again {attached:.1f} s after its "
          f"restart; pool closed {closed:.1f} s into a restart's wait")
    assert killed < 2.0 and vanished < NOTICED_WITHIN


class CoreHostProcess:
    """``lylm core`` (the core's host's supervisor) in its own session, in the namespace
    when there is one."""

    def __init__(
        self, model: Path, port: int, log: Path, namespace: Namespace | None, *, kv_events_port: int | None = None
    ) -> None:
        self.pool_address = namespace.pool_address if namespace else "127.0.0.1"
        kv = ["--kv-events-port", str(kv_events_port)] if kv_events_port is not None else []
        self.command = [
            sys.executable, "-m", "lylm", "core", "--pool", f"{self.pool_address}:{port}", "--grace", "1",
            "--restart-delay", "0.5", *kv, str(model), *serve_flags(TINY_MODEL_ENGINE_ARGS),
        ]  # fmt: skip
        if namespace is not None:
            self.command = namespace.run(self.command)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, process_group=0)

    def engine_cores(self) -> list[psutil.Process]:
        assert self.proc is not None
        return [p for p in psutil.Process(self.proc.pid).children(recursive=True) if "EngineCore" in p.name()]

    def starts(self) -> int:
        return self.log.read_text(errors="replace").count("engine core started (pid")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # it stops its core first
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


@pytest.mark.engines
@pytest.mark.anyio
async def test_lylm_core_keeps_a_remote_core_attachable_across_pool_restarts_partitions_and_crashes(
    model_dir: Path, tmp_path: Path, namespace: Namespace | None
) -> None:
    port = free_port()
    host = CoreHostProcess(model_dir, port, tmp_path / "lylm-core.log", namespace)
    where = f"{host.pool_address}:{port}"
    config = {"models": {MODEL: [_instance(str(model_dir), address=host.pool_address, port=port, timeout=5,
                                           heartbeat=HEARTBEAT)]}}
    restart = RestartPolicy(initial_backoff=0.1, jitter=0)
    times: dict[str, float] = {}
    host.start()
    try:
        async with EnginePool.from_config(config, restart=restart, health_interval=0.1) as pool:
            (remote,) = pool.instances(MODEL)
            await until(lambda: remote.state == "healthy", timeout=180)
            await _serves(pool, remote)
        # The pool is gone: vLLM's core would stay up, unattachable. lylm core starts it
        # again, and a new pool (a restart of the front end) gets it.
        closed = time.monotonic()
        async with EnginePool.from_config(config, restart=restart, health_interval=0.1) as pool:
            (remote,) = pool.instances(MODEL)
            await until(lambda: remote.state == "healthy", timeout=180)
            times["pool restart"] = time.monotonic() - closed
            await _serves(pool, remote)
            assert host.starts() == 2

            if namespace is not None:
                # A partition: the pool gives the core up (heartbeat) and waits for a new
                # one; the core, still up and connected as far as it knows, is orphaned.
                # Once the network is back, lylm core sees the pool waiting and starts
                # the core again, and it attaches.
                namespace.cut()
                cut = time.monotonic()
                await until(lambda: remote.state != "healthy", timeout=10)
                times["ejected after link cut"] = time.monotonic() - cut
                assert times["ejected after link cut"] < NOTICED_WITHIN
                await until(lambda: remote.state == "restarting" and _listening(port), timeout=30)
                namespace.heal()
                healed = time.monotonic()
                await until(lambda: remote.state == "healthy", timeout=180)
                times["partition healed"] = time.monotonic() - healed
                assert host.starts() == 3
                await _serves(pool, remote)

            # The engine core crashes: lylm core starts it again.
            starts, restarts = host.starts(), remote.restarts
            (engine_core,) = host.engine_cores()
            engine_core.kill()
            crashed = time.monotonic()
            await until(lambda: remote.state != "healthy", timeout=10)
            await until(lambda: remote.state == "healthy", timeout=180)
            times["core crash"] = time.monotonic() - crashed
            assert host.starts() == starts + 1 and remote.restarts == restarts + 1
            await _serves(pool, remote)
    finally:
        host.stop()
    assert host.proc is not None and host.proc.returncode == 0, host.log.read_text(errors="replace")[-3000:]
    print(f"\nlylm core at {where}: attached again (s after the event): "
          + ", ".join(f"{what} {seconds:.1f}" for what, seconds in times.items()))



@pytest.mark.engines
@pytest.mark.anyio
async def test_a_remote_core_under_lylm_core_publishes_its_kv_events_to_a_kv_aware_pool(
    model_dir: Path, tmp_path: Path
) -> None:
    import random

    from vllm import SamplingParams

    port, kv_port = free_port(), free_port()
    host = CoreHostProcess(model_dir, port, tmp_path / "lylm-core.log", None, kv_events_port=kv_port)
    config = {"models": {MODEL: [_instance(str(model_dir), address="127.0.0.1", port=port, timeout=5,
                                           heartbeat=HEARTBEAT, kv_events_port=kv_port)]}}  # fmt: skip
    records: list[RequestRecord] = []
    host.start()
    try:
        async with EnginePool.from_config(config, balancer="kv_aware", health_interval=0.1,
                                          restart=RestartPolicy(initial_backoff=0.1, jitter=0)) as pool:
            pool.add_observer(records.append)
            (remote,) = pool.instances(MODEL)
            await until(lambda: remote.state == "healthy", timeout=180)
            kv = pool._router.kv
            assert kv is not None
            rng = random.Random(3)
            prompt = [rng.randrange(10, 500) for _ in range(300)]
            for expected in (0, 256):  # the second time its two full blocks are cached
                async for out in pool.generate(MODEL, prompt, SamplingParams(max_tokens=1, ignore_eos=True)):
                    last = out
                assert records[-1].request.cached_tokens == {remote.name: expected}
                assert last.num_cached_tokens == expected
                # The core's events cross TCP to the pool: two blocks held.
                await until(lambda: kv.index.blocks(kv._subscriptions[remote.name].key) == 2, timeout=10)
            (agreement,) = pool.kv_agreement()
            assert (agreement.exact, agreement.blocks) == (2, 2)
    finally:
        host.stop()
    assert host.proc is not None and host.proc.returncode == 0, host.log.read_text(errors="replace")[-3000:]


@pytest.mark.engines
@pytest.mark.anyio
async def test_a_remote_core_placed_through_ray_serves_and_is_placed_again_when_it_dies(model_dir: Path) -> None:
    ray = pytest.importorskip("ray")
    from ray.util.placement_group import placement_group_table

    port = free_port()
    args = {"model": str(model_dir), **TINY_MODEL_ENGINE_ARGS}
    # A local Ray head on this machine; the core asks for no GPU (the CPU build).
    config = {"models": {MODEL: [{"engine_args": args, "remote": {
        "address": "127.0.0.1", "port": port, "timeout": 120, "heartbeat": HEARTBEAT, "ray": {"gpus": 0, "cpus": 1}}}]}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def cores() -> list[psutil.Process]:
        # This test's: the child of the headless `vllm serve` that Ray's actor started for this
        # pool's port (told by its command line, not by vLLM's process titles or pids, which
        # earlier tests' cores may have had), less multiprocessing's resource tracker.
        flag = ["--data-parallel-rpc-port", str(port)]
        found: list[psutil.Process] = []
        for p in psutil.process_iter(["cmdline"]):
            line = p.info["cmdline"] or []
            if any(line[i:i + 2] == flag for i in range(len(line) - 1)):
                try:
                    found += [c for c in p.children() if "resource_tracker" not in " ".join(c.cmdline())]
                except psutil.Error:
                    pass
        return found

    def ray_logs() -> str:  # what the actor's core host logged (Ray keeps it out of our output)
        try:
            logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        except Exception as e:  # Ray's private API: only for the message
            return f"(no Ray logs: {e!r})"
        lines = [line for f in sorted(logs.glob("worker-*")) for line in f.read_text(errors="replace").splitlines()
                 if "engine core" in line or "lylm" in line]
        # ... and whether Ray's raylet killed a worker (its memory monitor does, for one)
        lines += [line for f in logs.glob("raylet.*") for line in f.read_text(errors="replace").splitlines()
                  if "kill" in line.lower()]
        return "\n".join(lines[-60:])

    async def one_core() -> psutil.Process:
        with anyio.move_on_after(10):
            while len(found := cores()) != 1:
                await anyio.sleep(0.1)
        found = cores()
        assert len(found) == 1, (found, remote.state, remote.restarts, ray_logs())
        return found[0]

    times: dict[str, float] = {}
    try:
        began = time.monotonic()
        async with EnginePool.from_config(config, restart=RestartPolicy(initial_backoff=0.1, jitter=0),
                                          health_interval=0.1) as pool:
            (remote,) = pool.instances(MODEL)
            assert remote.state == "healthy"
            times["placed and serving"] = time.monotonic() - began
            await _serves(pool, remote)
            groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
            assert len(groups) == 1 and groups[0]["name"] == f'lylm {remote.name}'
            # The core dies: the pool places a new one through Ray, and it attaches.
            first = await one_core()
            assert remote.restarts == 0, ray_logs()
            first.kill()
            died = time.monotonic()
            await until(lambda: remote.state != "healthy", timeout=10)
            times["ejected"] = time.monotonic() - died
            await until(lambda: remote.state == "healthy", timeout=180)
            times["placed again and serving"] = time.monotonic() - died
            assert remote.restarts == 1, ray_logs()
            # ... through Ray: the first placement removed, a second one made.
            states = sorted(g["state"] for g in placement_group_table().values())
            assert states == ["CREATED", "REMOVED"], states
            await _serves(pool, remote)
            second = await one_core()
        # Closed: no core, no actor, no placement left behind.
        await until(lambda: not cores() and not second.is_running(), timeout=60)
        assert all(g["state"] == "REMOVED" for g in placement_group_table().values())
    finally:
        ray.shutdown()
    print("\nRay-placed core: " + ", ".join(f"{what} {seconds:.2f} s" for what, seconds in times.items()))
