"""Tests for the strategy interface: registry, hyperparameter validation, ServerState and chunk helpers."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from flcore.errors import ConfigError, FlcoreError, SerdeError
from flcore.parameters import ParameterSpec, TensorSpec, flatten, to_bytes
from flcore.strategies import (
    STRATEGIES,
    AggregationAlgorithm,
    FedAvgAccumulator,
    ServerState,
    build_strategy,
)
from flcore.strategies.base import FlatLayout, coordinate_chunks, default_chunk_size
from flcore.tests.strategy_cases import SPEC, StrategyContract, random_params

CONTRACT_MODULES = [
    "flcore.tests.test_strategies_fedavg",
    "flcore.tests.test_strategies_fedopt",
    "flcore.tests.test_strategies_krum",
    "flcore.tests.test_strategies_coordinatewise",
    "flcore.tests.test_strategies_norm_bounded",
]


def all_subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= all_subclasses(sub)
    return found


# ---- registry ------------------------------------------------------------------------------------------


def test_every_algorithm_has_one_strategy() -> None:
    assert set(STRATEGIES) == set(AggregationAlgorithm)
    assert all(cls.algorithm is algorithm for algorithm, cls in STRATEGIES.items())
    assert {a for a, cls in STRATEGIES.items() if cls.asynchronous} == {"fedbuff", "fedasync"}


def test_every_synchronous_algorithm_runs_the_contract() -> None:
    for module in CONTRACT_MODULES:
        importlib.import_module(module)
    covered = {c.algorithm for c in all_subclasses(StrategyContract) if hasattr(c, "algorithm")}

    assert covered == {a.value for a, cls in STRATEGIES.items() if not cls.asynchronous}


def test_aggregation_algorithm_is_reexported_and_str() -> None:
    from flcore.strategies.base import AggregationAlgorithm as Base

    assert Base is AggregationAlgorithm
    assert AggregationAlgorithm("trimmed_mean") is AggregationAlgorithm.TRIMMED_MEAN
    assert str(AggregationAlgorithm.KRUM) == "krum"


def test_unknown_algorithm_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"'fedsgd'.*'fedavg'"):
        build_strategy("fedsgd", {})


def test_streaming_flags() -> None:
    streaming = {a.value for a, cls in STRATEGIES.items() if cls.streaming and not cls.asynchronous}
    assert streaming == {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "norm_bounded"}
    assert {a.value for a, cls in STRATEGIES.items() if cls.needs_statistics} == {"krum", "multikrum"}


# ---- hyperparameters -----------------------------------------------------------------------------------


def test_hyperparameters_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        build_strategy("fedavg", [("server_learning_rate", 1.0)])  # type: ignore[arg-type]


def test_unknown_keys_are_listed_with_the_allowed_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"\['eta'\]; allowed: \['beta_1', 'beta_2', 'server_learning_rate', 'tau'\]"
    ):
        build_strategy("fedadam", {"eta": 0.1})


def test_messages_name_field_value_and_range() -> None:
    with pytest.raises(ConfigError) as info:
        build_strategy("fedyogi", {"beta_2": 1.5})

    assert str(info.value) == "fedyogi hyperparameter 'beta_2' must be a number in [0, 1). Found 1.5."


def test_values_are_normalised() -> None:
    strategy = build_strategy("fedavgm", {"server_learning_rate": 1, "server_momentum": np.float32(0.5)})

    assert strategy.hyperparameters() == {"server_learning_rate": 1.0, "server_momentum": 0.5}
    assert all(type(v) is float for v in strategy.hyperparameters().values())
    json.dumps(strategy.hyperparameters())


def test_direct_construction_is_validated_too() -> None:
    from flcore.strategies.fedopt import FedAdam

    with pytest.raises(ConfigError, match="'tau'"):
        FedAdam(tau=-1.0)


# ---- server state --------------------------------------------------------------------------------------


def test_server_state_round_trip_with_tensors_and_scalars() -> None:
    rng = np.random.default_rng(0)
    state = ServerState({"m": random_params(rng), "v": random_params(rng)}, {"step": 7, "loss_scale": 0.125})

    data = state.to_bytes()
    restored = ServerState.from_bytes(data, SPEC)

    assert restored.equals(state)
    assert list(restored.tensors["m"]) == list(SPEC.names)
    assert isinstance(restored.scalars["step"], int) and restored.scalars["loss_scale"] == 0.125
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert "m/layer1.weight" in header and "v/layer0.bias" in header


def test_empty_server_state_round_trips() -> None:
    state = ServerState({}, {"step": 0})

    assert ServerState.from_bytes(state.to_bytes(), SPEC).equals(state)


def test_server_state_for_another_model_is_rejected() -> None:
    state = ServerState({"momentum": SPEC.zeros()}, {"step": 1})
    other = ParameterSpec(
        (
            TensorSpec("layer1.weight", (13, 5)),
            TensorSpec("layer0.bias", (6,)),
            TensorSpec("layer0.weight", (3, 4, 2)),
        )
    )

    with pytest.raises(SerdeError) as info:
        ServerState.from_bytes(state.to_bytes(), other)
    assert info.value.code == "shape_mismatch"


def test_plain_parameters_are_not_a_server_state() -> None:
    with pytest.raises(FlcoreError, match="not a server state"):
        ServerState.from_bytes(to_bytes(SPEC.zeros()), SPEC)


def test_non_finite_scalars_are_rejected() -> None:
    with pytest.raises(FlcoreError, match="'step'"):
        ServerState({}, {"step": float("nan")}).to_bytes()


# ---- chunk helpers and the accumulator's scale ---------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 94, 100])
def test_flat_layout_gathers_chunks_across_tensors(chunk_size: int) -> None:
    rng = np.random.default_rng(1)
    updates = [random_params(rng) for _ in range(3)]
    layout = FlatLayout(SPEC)
    expected = np.stack([flatten(u) for u in updates])

    pieces = [layout.stack(updates, a, b) for a, b in coordinate_chunks(SPEC.num_parameters, chunk_size)]

    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), expected)


@pytest.mark.parametrize("chunk_size", [1, 5, 94, 100])
def test_flat_layout_gathers_coordinate_major_chunks_into_a_reused_buffer(chunk_size: int) -> None:
    rng = np.random.default_rng(1)
    updates = [random_params(rng) for _ in range(3)]
    layout = FlatLayout(SPEC)
    views = layout.flat_views(updates)
    scratch = np.full((chunk_size, 3), np.nan, dtype=np.float32)

    pieces = []
    for a, b in coordinate_chunks(SPEC.num_parameters, chunk_size):
        fresh = layout.stack_transposed(views, a, b)
        reused = layout.stack_transposed(views, a, b, scratch)
        assert fresh.flags.c_contiguous and reused.flags.c_contiguous and reused.base is scratch
        np.testing.assert_array_equal(reused, fresh)
        pieces.append(fresh)

    np.testing.assert_array_equal(np.concatenate(pieces), np.stack([flatten(u) for u in updates]).T)


def test_default_chunk_size_is_cache_sized() -> None:
    assert default_chunk_size(100) == 5242  # 2 MiB / (4 bytes * 100 updates)
    assert default_chunk_size(1) == 65536 and default_chunk_size(10**6) == 1024


def test_accumulator_scale_multiplies_the_update_not_the_weight() -> None:
    accumulator = FedAvgAccumulator(SPEC)
    a, b = random_params(np.random.default_rng(2)), random_params(np.random.default_rng(3))
    accumulator.add(a, 1.0, scale=0.5)
    accumulator.add(b, 3.0)

    result = accumulator.result()

    for name in SPEC.names:
        np.testing.assert_allclose(result[name], (0.5 * a[name] + 3.0 * b[name]) / 4.0, atol=1e-6)
    with pytest.raises(FlcoreError, match="scale"):
        accumulator.add(a, 1.0, scale=0.0)


@pytest.mark.parametrize("counts", [[1, 0], [1, -3], [1, 2.5], [1]])
def test_invalid_num_examples_are_rejected(counts: list[int]) -> None:
    rng = np.random.default_rng(4)

    with pytest.raises(FlcoreError, match="num_examples"):
        build_strategy("fedavg", {}).combine([random_params(rng), random_params(rng)], counts)


def test_statistics_summed_in_any_chunk_order_give_the_same_selection() -> None:
    rng = np.random.default_rng(9)
    updates = [random_params(rng) for _ in range(7)]
    strategy = build_strategy("multikrum", {"num_malicious": 2})
    matrix = np.stack([flatten(u) for u in updates])
    chunks = list(coordinate_chunks(SPEC.num_parameters, 10))

    forward = sum(strategy.chunk_statistics(matrix[:, a:b]) for a, b in chunks)
    backward = sum(strategy.chunk_statistics(matrix[:, a:b]) for a, b in reversed(chunks))
    weights = np.ones(7)

    assert (
        strategy.finalize_statistics(forward, weights).selected
        == strategy.finalize_statistics(backward, weights).selected
    )


# ---- threads, ranges and finiteness of the combination -------------------------------------------------

CHUNKED_RULES = [
    ("krum", {"num_malicious": 2}),
    ("multikrum", {"num_malicious": 2, "weighting": "num_examples"}),
    ("median", {}),
    ("trimmed_mean", {"trim_fraction": 0.2}),
    (
        "norm_bounded",
        {"clip_norm": 1.0, "inner": "krum", "inner_hyperparameters": {"num_malicious": 2}},
    ),
]


@pytest.mark.parametrize(("algorithm", "hyperparameters"), CHUNKED_RULES)
def test_the_thread_count_does_not_change_the_result(algorithm: str, hyperparameters: dict) -> None:
    rng = np.random.default_rng(21)
    updates = [random_params(rng, 0.5 + i % 3) for i in range(10)]
    counts = [int(c) for c in rng.integers(1, 100, size=10)]
    strategy = build_strategy(algorithm, hyperparameters)

    alone, _ = strategy.combine(updates, counts, chunk_size=9, threads=1)
    shared, _ = strategy.combine(updates, counts, chunk_size=9, threads=3)

    for name in alone:
        np.testing.assert_array_equal(alone[name], shared[name], err_msg=name)


@pytest.mark.parametrize(("algorithm", "hyperparameters"), CHUNKED_RULES[:4])
def test_a_worker_range_gathered_chunk_by_chunk_equals_the_in_process_result(
    algorithm: str, hyperparameters: dict
) -> None:
    # What a server task runs: range_statistics / range_combine over [start, stop) of the updates.
    rng = np.random.default_rng(22)
    updates = [random_params(rng, 1.0 + i % 2) for i in range(10)]
    counts = [int(c) for c in rng.integers(1, 100, size=10)]
    strategy = build_strategy(algorithm, hyperparameters)
    weights = np.array([strategy.update_weight(k, 0.0) for k in counts])
    layout = FlatLayout(SPEC)
    ranges = list(coordinate_chunks(SPEC.num_parameters, 40))

    context = None
    if strategy.needs_statistics:
        gram = sum(strategy.range_statistics(layout, updates, a, b) for a, b in ranges)
        context = strategy.finalize_statistics(gram, weights)
    flat = np.concatenate(
        [strategy.range_combine(layout, updates, a, b, weights, context) for a, b in ranges]
    )
    expected, _ = strategy.combine(updates, counts)

    np.testing.assert_allclose(flat, flatten(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("algorithm", ["fedavg", "median", "krum"])
def test_a_non_finite_update_is_named_by_its_index(algorithm: str) -> None:
    rng = np.random.default_rng(23)
    updates = [random_params(rng) for _ in range(5)]
    updates[3]["layer0.weight"][1, 2, 0] = np.inf
    hyperparameters = {"num_malicious": 1} if algorithm == "krum" else {}

    with pytest.raises(FlcoreError, match="Update 3 contains NaN or Inf"):
        build_strategy(algorithm, hyperparameters).combine(updates, [1] * 5)


def test_fedavg_refuses_a_sum_that_overflows_float32() -> None:
    # Every value finite, the weighted sum is not: the in-memory FedAvg checks the sum, not only the inputs.
    huge = {t.name: np.full(t.shape, 3e38, dtype=np.float32) for t in SPEC.tensors}

    with pytest.raises(FlcoreError, match="overflowed float32"):
        build_strategy("fedavg", {}).combine([huge, huge], [1, 1])


def test_threads_must_be_a_positive_integer() -> None:
    rng = np.random.default_rng(24)

    with pytest.raises(FlcoreError, match=r"threads must be a positive integer\. Found 0"):
        build_strategy("median", {}).combine([random_params(rng)] * 3, [1] * 3, threads=0)
