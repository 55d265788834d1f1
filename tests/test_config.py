"""Tests for lylm._config: parsing, validation messages and the alternative entry points."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from lylm._config import EngineSpec, PoolConfig
from lylm._exceptions import ConfigError
from lylm.balancers._registry import DEFAULT_BALANCER

QWEN = "Qwen/Qwen2.5-7B-Instruct"
QWEN_PATH = "/models/Qwen2.5-7B-Instruct/"

SEED: dict[str, Any] = {
    "common": {"balancer": "weighted_random", "engine_args": {"max_model_len": 512}},
    "models": {
        QWEN: [
            {
                "devices": {"gpu_ids": [0, 1], "weight": 1},
                "engine_args": {"model": QWEN_PATH, "tensor_parallel_size": 2},
            },
            {
                "devices": {"gpu_ids": [3, 4], "weight": 2},
                "engine_args": {"model": QWEN_PATH, "tensor_parallel_size": 2},
            },
        ],
        "tiny": {
            "balancer": "least_outstanding",
            "instances": [{"devices": {"weight": 1}, "engine_args": {"model": "/m/tiny"}}],
        },
    },
}


def one(instance: Any, *, name: str = "m") -> dict[str, Any]:
    """A config with a single model `name` holding the single instance `instance`."""
    return {"models": {name: [instance]}}


def raises(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_dict(data)
    return info.value


# --- valid configs ----------------------------------------------------------


def test_seed_config_parses() -> None:
    config = PoolConfig.from_dict(SEED)
    assert config.model_names == (QWEN, "tiny")

    qwen = config.model(QWEN)
    assert qwen.balancer == "weighted_random"
    first, second = qwen.instances
    assert first.name == 'models["Qwen/Qwen2.5-7B-Instruct"][0]'
    assert second.name == 'models["Qwen/Qwen2.5-7B-Instruct"][1]'
    assert (first.gpu_ids, first.weight, first.index) == ((0, 1), 1.0, 0)
    assert (second.gpu_ids, second.weight, second.index) == ((3, 4), 2.0, 1)
    assert isinstance(second.weight, float)
    assert first.engine_args == {"max_model_len": 512, "model": QWEN_PATH, "tensor_parallel_size": 2}

    tiny = config.model("tiny")
    assert tiny.balancer == "least_outstanding"
    (only,) = tiny.instances
    assert only == EngineSpec(
        model="tiny", engine_args={"max_model_len": 512, "model": "/m/tiny"}, gpu_ids=(), weight=1.0
    )
    assert only.name == 'models["tiny"][0]'


def test_parsing_does_not_alias_or_mutate_input() -> None:
    data = copy.deepcopy(SEED)
    config = PoolConfig.from_dict(data)
    assert data == SEED
    data["models"]["tiny"]["instances"][0]["engine_args"]["model"] = "changed"
    assert config.model("tiny").instances[0].engine_args["model"] == "/m/tiny"


def test_specs_are_hashable_and_comparable() -> None:
    assert PoolConfig.from_dict(SEED) == PoolConfig.from_dict(copy.deepcopy(SEED))
    assert hash(PoolConfig.from_dict(SEED)) == hash(PoolConfig.from_dict(copy.deepcopy(SEED)))


def test_instance_args_override_common_args() -> None:
    data = {
        "common": {"engine_args": {"max_model_len": 512, "dtype": "half"}},
        "models": {"m": [{"engine_args": {"model": "/m", "max_model_len": 1024}}]},
    }
    spec = PoolConfig.from_dict(data).model("m").instances[0]
    assert spec.engine_args == {"max_model_len": 1024, "dtype": "half", "model": "/m"}


@pytest.mark.parametrize(
    ("common", "own", "expected"),
    [
        (None, None, DEFAULT_BALANCER),
        ("least_outstanding", None, "least_outstanding"),
        (None, "token_aware", "token_aware"),
        ("least_outstanding", "token_aware", "token_aware"),
        ("my_pkg.balancing:Sticky", None, "my_pkg.balancing:Sticky"),
    ],
)
def test_balancer_resolution(common: str | None, own: str | None, expected: str) -> None:
    model: dict[str, Any] = {"instances": [{"engine_args": {"model": "/m"}}]}
    if own is not None:
        model["balancer"] = own
    data: dict[str, Any] = {"models": {"m": model, "seed": [{"engine_args": {"model": "/s"}}]}}
    if common is not None:
        data["common"] = {"balancer": common}
    config = PoolConfig.from_dict(data)
    assert config.model("m").balancer == expected
    assert config.model("seed").balancer == (common or DEFAULT_BALANCER)


def test_devices_default_and_pinning_counts() -> None:
    data = one(
        {
            "devices": {"gpu_ids": [2, 0, 1, 3]},
            "engine_args": {"model": "/m", "tensor_parallel_size": 2, "pipeline_parallel_size": 2},
        }
    )
    spec = PoolConfig.from_dict(data).model("m").instances[0]
    assert (spec.gpu_ids, spec.weight) == ((2, 0, 1, 3), 1.0)


def test_model_lookup_missing_raises_key_error() -> None:
    with pytest.raises(KeyError):
        PoolConfig.from_dict(SEED).model("absent")


# --- validation errors ------------------------------------------------------

QWEN_1 = 'models["Qwen/Qwen2.5-7B-Instruct"][1]'


def seed_with_weight(weight: Any) -> dict[str, Any]:
    data = copy.deepcopy(SEED)
    data["models"][QWEN][1]["devices"]["weight"] = weight
    return data


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (0, "must be > 0 (got 0)"),
        (-1.5, "must be > 0 (got -1.5)"),
        ("2", 'must be a finite number (got "2")'),
        (True, "must be a finite number (got true)"),
        (None, "must be a finite number (got null)"),
        (math.nan, "must be a finite number (got NaN)"),
        (math.inf, "must be a finite number (got Infinity)"),
    ],
)
def test_weight_errors(weight: Any, message: str) -> None:
    exc = raises(seed_with_weight(weight))
    assert exc.path == f"{QWEN_1}.devices.weight"
    assert str(exc) == f"{QWEN_1}.devices.weight: {message}"


M0 = 'models["m"][0]'


@pytest.mark.parametrize(
    ("instance", "expected"),
    [
        ({"devices": {}}, f"{M0}.engine_args: required"),
        ({"engine_args": []}, f"{M0}.engine_args: must be an object (got [])"),
        (
            {"engine_args": {}},
            f"{M0}.engine_args.model: required (the model's weights: a local path or a hub name)",
        ),
        ({"engine_args": {"model": ""}}, f'{M0}.engine_args.model: must be a non-empty string (got "")'),
        ({"engine_args": {"model": 7}}, f"{M0}.engine_args.model: must be a non-empty string (got 7)"),
        (
            {"devices": {"gpu_ids": "0,1"}, "engine_args": {"model": "/m"}},
            f'{M0}.devices.gpu_ids: must be a list of GPU indices (got "0,1")',
        ),
        (
            {"devices": {"gpu_ids": [0, "1"]}, "engine_args": {"model": "/m"}},
            f'{M0}.devices.gpu_ids[1]: must be a non-negative integer (got "1")',
        ),
        (
            {"devices": {"gpu_ids": [-1]}, "engine_args": {"model": "/m"}},
            f"{M0}.devices.gpu_ids[0]: must be a non-negative integer (got -1)",
        ),
        (
            {"devices": {"gpu_ids": [True]}, "engine_args": {"model": "/m"}},
            f"{M0}.devices.gpu_ids[0]: must be a non-negative integer (got true)",
        ),
        (
            {"devices": {"gpu_ids": [1, 1]}, "engine_args": {"model": "/m", "tensor_parallel_size": 2}},
            f"{M0}.devices.gpu_ids: duplicate GPU index 1",
        ),
        (
            {"devices": {"gpu_ids": [0, 1]}, "engine_args": {"model": "/m"}},
            f"{M0}.devices.gpu_ids: lists 2 GPUs but tensor_parallel_size x pipeline_parallel_size"
            " = 1 x 1 = 1",
        ),
        (
            {"devices": {"gpu_ids": [0]}, "engine_args": {"model": "/m", "pipeline_parallel_size": 2}},
            f"{M0}.devices.gpu_ids: lists 1 GPU but tensor_parallel_size x pipeline_parallel_size"
            " = 1 x 2 = 2",
        ),
        (
            {"engine_args": {"model": "/m", "tensor_parallel_size": 0}},
            f"{M0}.engine_args.tensor_parallel_size: must be a positive integer (got 0)",
        ),
        (
            {"engine_args": {"model": "/m", "pipeline_parallel_size": "2"}},
            f'{M0}.engine_args.pipeline_parallel_size: must be a positive integer (got "2")',
        ),
        (
            {"engine_args": {"model": "/m", "device_ids": [0]}},
            f"{M0}.engine_args.device_ids: set devices.gpu_ids instead; lylm pins each instance through it",
        ),
        (
            {"engine_args": {"model": "/m", "data_parallel_size": 2}},
            f"{M0}.engine_args.data_parallel_size: lylm runs replicas as separate instances;"
            " list one instance per replica instead",
        ),
        (
            {"device": {}, "engine_args": {"model": "/m"}},
            f"{M0}.device: unknown key (allowed: devices, engine_args, remote)",
        ),
        (
            {"devices": {"gpus": [0]}, "engine_args": {"model": "/m"}},
            f"{M0}.devices.gpus: unknown key (allowed: gpu_ids, weight)",
        ),
        ({"devices": [0], "engine_args": {"model": "/m"}}, f"{M0}.devices: must be an object (got [0])"),
    ],
)
def test_instance_errors(instance: dict[str, Any], expected: str) -> None:
    exc = raises(one(instance))
    assert str(exc) == expected
    assert exc.path == expected.split(": ", 1)[0]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], "config must be a JSON object (got list)"),
        ({"modles": {}}, "modles: unknown key (allowed: common, models)"),
        ({}, "models: required"),
        ({"models": {}}, "models: must be a non-empty object of model name -> instances (got {})"),
        ({"models": [1]}, "models: must be a non-empty object of model name -> instances (got [1])"),
        ({"models": {"": []}}, 'models: model names must be non-empty strings (got "")'),
        ({"models": {"m": []}}, 'models["m"]: has no instances'),
        ({"models": {"m": {"instances": []}}}, 'models["m"]: has no instances'),
        ({"models": {"m": {"balancer": "token_aware"}}}, 'models["m"]: has no instances'),
        (
            {"models": {"m": 3}},
            'models["m"]: must be a list of instances or {"instances": [...], "balancer": ...} (got 3)',
        ),
        (
            {"models": {"m": {"instances": {"a": 1}}}},
            'models["m"].instances: must be a list of instances (got {"a": 1})',
        ),
        ({"models": {"m": [3]}}, 'models["m"][0]: must be an object (got 3)'),
        (
            {"models": {"m": {"instances": [3]}}},
            'models["m"][0]: must be an object (got 3)',
        ),
        (
            {"models": {"m": {"instances": [], "balancers": "x"}}},
            'models["m"].balancers: unknown key (allowed: instances, balancer, limits)',
        ),
        ({"common": [], "models": {}}, "common: must be an object (got [])"),
        ({"common": {"foo": 1}}, "common.foo: unknown key (allowed: balancer, engine_args, limits, workers)"),
        ({"common": {"engine_args": "x"}}, 'common.engine_args: must be an object (got "x")'),
        (
            {"common": {"engine_args": {"device_ids": [0]}}},
            "common.engine_args.device_ids: set devices.gpu_ids instead; lylm pins each instance through it",
        ),
        (
            {"common": {"balancer": "fastest"}},
            'common.balancer: unknown balancer "fastest" (known: kv_aware, least_outstanding, prefix_aware,'
            ' token_aware, weighted_random; or a "module:Class" import string)',
        ),
        ({"common": {"balancer": 3}}, "common.balancer: must be a string (got 3)"),
        (
            {"models": {"m": {"balancer": "fastest", "instances": [{"engine_args": {"model": "/m"}}]}}},
            'models["m"].balancer: unknown balancer "fastest" (known: kv_aware, least_outstanding, prefix_aware,'
            ' token_aware, weighted_random; or a "module:Class" import string)',
        ),
        (
            {"models": {"m": {"balancer": ":Cls", "instances": [{"engine_args": {"model": "/m"}}]}}},
            'models["m"].balancer: unknown balancer ":Cls" (known: kv_aware, least_outstanding, prefix_aware,'
            ' token_aware, weighted_random; or a "module:Class" import string)',
        ),
        (
            {"models": {"m": {"balancer": None, "instances": [{"engine_args": {"model": "/m"}}]}}},
            'models["m"].balancer: must be a string (got null)',
        ),
    ],
)
def test_document_errors(data: Any, expected: str) -> None:
    exc = raises(data)
    assert str(exc) == expected


def test_common_args_errors_blame_common() -> None:
    data = {
        "common": {"engine_args": {"tensor_parallel_size": -1}},
        "models": {"m": [{"engine_args": {"model": "/m"}}]},
    }
    assert str(raises(data)) == "common.engine_args.tensor_parallel_size: must be a positive integer (got -1)"


def test_common_args_can_satisfy_gpu_count() -> None:
    data = {
        "common": {"engine_args": {"tensor_parallel_size": 2}},
        "models": {"m": [{"devices": {"gpu_ids": [0, 1]}, "engine_args": {"model": "/m"}}]},
    }
    assert PoolConfig.from_dict(data).model("m").instances[0].engine_args["tensor_parallel_size"] == 2


def test_error_is_a_value_error_with_reason() -> None:
    exc = raises(seed_with_weight(0))
    assert isinstance(exc, ValueError)
    assert exc.reason == "must be > 0 (got 0)"


# --- JSON and files -----------------------------------------------------------


def test_from_json_round_trip_and_bytes() -> None:
    text = json.dumps(SEED)
    assert PoolConfig.from_json(text) == PoolConfig.from_dict(SEED)
    assert PoolConfig.from_json(text.encode()) == PoolConfig.from_dict(SEED)


def test_from_json_reports_line_and_column() -> None:
    text = '{\n  "models": {\n    "m": []\n    "n": []\n  }\n}'
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_json(text, source="config.json")
    assert info.value.path == ""
    assert str(info.value) == "config.json: invalid JSON at line 4, column 5: Expecting ',' delimiter"


def test_from_json_default_source() -> None:
    with pytest.raises(ConfigError, match=r"^<config>: invalid JSON at line 1, column 1: "):
        PoolConfig.from_json("")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"models": {"m": [], "m": []}}', "m"),
        ('{"models": {"m": [{"engine_args": {"model": "/a", "model": "/b"}}]}}', "model"),
    ],
)
def test_from_json_rejects_duplicate_keys(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_json(text, source="pool.json")
    assert str(info.value) == f'pool.json: duplicate key "{key}" in a JSON object'


def test_from_json_validates() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_json(json.dumps(seed_with_weight(0)))
    assert str(info.value) == f"{QWEN_1}.devices.weight: must be > 0 (got 0)"


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(SEED, indent=2))
    assert PoolConfig.from_file(path) == PoolConfig.from_dict(SEED)
    assert PoolConfig.from_file(str(path)) == PoolConfig.from_dict(SEED)


def test_from_file_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    path.write_text('{"models": }')
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_file(path)
    assert str(info.value) == f"{path}: invalid JSON at line 1, column 12: Expecting value"


def test_from_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_file(path)
    assert info.value.path == ""
    assert str(info.value) == f"cannot read config file '{path}': No such file or directory"


# --- specs ------------------------------------------------------------------


def test_from_specs_round_trip() -> None:
    config = PoolConfig.from_dict(SEED)
    specs = [spec for model in config.models for spec in model.instances]
    rebuilt = PoolConfig.from_specs(
        specs, balancer="weighted_random", balancers={"tiny": "least_outstanding"}
    )
    assert rebuilt == config


def test_from_specs_groups_by_model_in_order_of_appearance() -> None:
    specs = [
        EngineSpec(model="a", engine_args={"model": "/a"}, weight=1),
        EngineSpec(model="b", engine_args={"model": "/b"}, gpu_ids=(0,)),
        EngineSpec(model="a", engine_args={"model": "/a"}, weight=3, index=7),
    ]
    config = PoolConfig.from_specs(specs)
    assert config.model_names == ("a", "b")
    assert [(s.index, s.weight) for s in config.model("a").instances] == [(0, 1.0), (1, 3.0)]
    assert config.model("b").instances[0].gpu_ids == (0,)
    assert config.model("b").balancer == DEFAULT_BALANCER


@pytest.mark.parametrize("balancers", [None, {QWEN: "token_aware"}])
def test_from_specs_validates_like_from_dict(balancers: dict[str, str] | None) -> None:
    specs = [
        EngineSpec(model=QWEN, engine_args={"model": QWEN_PATH}),
        EngineSpec(model=QWEN, engine_args={"model": QWEN_PATH}, weight=0),
    ]
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_specs(specs, balancers=balancers)
    assert str(info.value) == str(raises(seed_with_weight(0)))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "models: must be a non-empty object of model name -> instances (got {})"),
        ({"balancer": "fastest"}, 'common.balancer: unknown balancer "fastest"'),
        ({"balancers": {"ghost": "token_aware"}}, 'models["ghost"]: has no instances'),
    ],
)
def test_from_specs_errors(kwargs: dict[str, Any], expected: str) -> None:
    specs = [] if not kwargs else [EngineSpec(model="m", engine_args={"model": "/m"})]
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_specs(specs, **kwargs)
    assert str(info.value).startswith(expected)


def test_from_specs_rejects_non_specs() -> None:
    with pytest.raises(TypeError, match="EngineSpec"):
        PoolConfig.from_specs([{"model": "m"}])  # type: ignore[list-item]


def test_engine_spec_copies_engine_args() -> None:
    args = {"model": "/m"}
    spec = EngineSpec(model="m", engine_args=args)
    args["model"] = "changed"
    assert spec.engine_args == {"model": "/m"}
    assert type(spec.engine_args) is dict


# --- load() -----------------------------------------------------------------


def test_load_dispatch(tmp_path: Path) -> None:
    expected = PoolConfig.from_dict(SEED)
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(SEED))
    specs = [spec for model in expected.models for spec in model.instances]

    assert PoolConfig.load(expected) is expected
    assert PoolConfig.load(SEED) == expected
    assert PoolConfig.load(path) == expected
    assert PoolConfig.load(str(path)) == expected
    loaded = PoolConfig.load(iter(specs))
    assert loaded.model_names == expected.model_names
    assert loaded.model("tiny").balancer == DEFAULT_BALANCER  # specs alone carry no balancer


def test_load_rejects_bytes() -> None:
    with pytest.raises(TypeError, match="from_json"):
        PoolConfig.load(b"{}")  # type: ignore[arg-type]



def test_common_workers_is_a_positive_integer_and_gpus_lists_every_pinned_gpu() -> None:
    base = {"models": {"m": [{"devices": {"gpu_ids": [3]}, "engine_args": {"model": "/m"}},
                             {"devices": {"gpu_ids": [1]}, "engine_args": {"model": "/m"}},
                             {"engine_args": {"model": "/m"}}]}}
    config = PoolConfig.from_dict({**base, "common": {"workers": 3}})
    assert config.workers == 3 and config.gpus == (1, 3)
    assert PoolConfig.from_dict(base).workers is None
    for bad in (0, -1, "2", True, 1.5):
        with pytest.raises(ConfigError, match=r"^common\.workers: must be a positive integer"):
            PoolConfig.from_dict({**base, "common": {"workers": bad}})


def test_the_default_worker_count_is_one_per_gpu_in_use_and_two_for_one_gpu() -> None:
    from lylm.server import default_workers

    def config(gpus: list[list[int]], **common: Any) -> PoolConfig:
        instances = [{"devices": {"gpu_ids": g}, "engine_args": {"model": "/m"}} for g in gpus]
        return PoolConfig.from_dict({"models": {"m": instances}, **({"common": common} if common else {})})

    cpus = os.cpu_count() or 1
    assert default_workers(config([[]])) == 1  # nothing pinned (the CPU build): one process
    assert default_workers(config([[0], [1], [2]])) == min(3, cpus)
    assert default_workers(config([[0], [0]])) == min(2, cpus)  # one GPU: still two
    assert default_workers(config([[0]], workers=5)) == 5
