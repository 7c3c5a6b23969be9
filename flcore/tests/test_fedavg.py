"""Tests for flcore.strategies.fedavg against a brute-force float64 weighted mean and FedAvg invariants."""

from __future__ import annotations

import abc
import tracemalloc
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from flcore.errors import FlcoreError, SerdeError
from flcore.parameters import Parameters, ParameterSpec, TensorSpec, to_bytes
from flcore.strategies import AggregationAlgorithm, FedAvgAccumulator, fedavg

# Tensor sizes 65, 5 and 24: none is a multiple of the chunk sizes used below.
SPEC = ParameterSpec(
    (
        TensorSpec("layer0.weight", (13, 5)),
        TensorSpec("layer0.bias", (5,)),
        TensorSpec("layer1.weight", (3, 4, 2)),
    )
)


def random_update(rng: np.random.Generator, spec: ParameterSpec = SPEC) -> Parameters:
    return {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}


def brute_force_mean(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {
        name: sum(w * u[name].astype(np.float64) for u, w in zip(updates, weights, strict=True)) / total
        for name in updates[0]
    }


def assert_params_close(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], atol: float = 1e-6) -> None:
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=atol, rtol=0, err_msg=name)


class AggregatorContract(abc.ABC):
    """Invariants every implementation of the weighted mean must keep."""

    @abc.abstractmethod
    def aggregate(
        self, updates: Sequence[Parameters], weights: Sequence[float], tmp_path: Path
    ) -> Parameters: ...

    def test_equals_brute_force_float64_mean(self, rng: np.random.Generator, tmp_path: Path) -> None:
        updates = [random_update(rng) for _ in range(7)]
        weights = [float(w) for w in rng.integers(1, 600, size=7)]

        result = self.aggregate(updates, weights, tmp_path)

        assert_params_close(result, brute_force_mean(updates, weights))
        assert all(v.dtype == np.float32 for v in result.values())

    def test_identical_updates_return_themselves(self, rng: np.random.Generator, tmp_path: Path) -> None:
        update = random_update(rng)

        result = self.aggregate([update] * 5, [3.0, 1.0, 600.0, 7.0, 0.5], tmp_path)

        assert_params_close(result, update, atol=1e-6)

    def test_permutation_invariance(self, rng: np.random.Generator, tmp_path: Path) -> None:
        updates = [random_update(rng) for _ in range(6)]
        weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        order = rng.permutation(6)

        forward = self.aggregate(updates, weights, tmp_path / "a")
        shuffled = self.aggregate([updates[i] for i in order], [weights[i] for i in order], tmp_path / "b")

        assert_params_close(forward, shuffled, atol=1e-6)

    def test_weights_are_respected(self, rng: np.random.Generator, tmp_path: Path) -> None:
        a, b = random_update(rng), random_update(rng)

        one_to_three = self.aggregate([a, b], [1.0, 3.0], tmp_path / "x")
        scaled = self.aggregate([a, b], [100.0, 300.0], tmp_path / "y")

        assert_params_close(one_to_three, {k: 0.25 * a[k] + 0.75 * b[k] for k in a})
        assert_params_close(scaled, one_to_three)
        assert np.abs(one_to_three["layer0.bias"] - (a["layer0.bias"] + b["layer0.bias"]) / 2).max() > 1e-3

    @pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
    def test_invalid_weight_is_rejected(self, rng: np.random.Generator, tmp_path: Path, bad: float) -> None:
        with pytest.raises(FlcoreError, match="weight"):
            self.aggregate([random_update(rng), random_update(rng)], [1.0, bad], tmp_path)


class TestReferenceFedavg(AggregatorContract):
    def aggregate(
        self, updates: Sequence[Parameters], weights: Sequence[float], tmp_path: Path
    ) -> Parameters:
        return fedavg(updates, weights)


class TestAccumulatorAdd(AggregatorContract):
    def aggregate(
        self, updates: Sequence[Parameters], weights: Sequence[float], tmp_path: Path
    ) -> Parameters:
        accumulator = FedAvgAccumulator(SPEC, chunk_size=7)
        for update, weight in zip(updates, weights, strict=True):
            accumulator.add(update, weight)
        return accumulator.result()


class TestAccumulatorAddFile(AggregatorContract):
    def aggregate(
        self, updates: Sequence[Parameters], weights: Sequence[float], tmp_path: Path
    ) -> Parameters:
        tmp_path.mkdir(parents=True, exist_ok=True)
        accumulator = FedAvgAccumulator(SPEC, chunk_size=11)
        for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
            path = tmp_path / f"update{i}.safetensors"
            path.write_bytes(to_bytes(update))
            accumulator.add_file(path, weight)
        return accumulator.result()


# ---- accumulator specifics -----------------------------------------------------------------------------


def test_count_total_weight_and_repeatable_result(rng: np.random.Generator) -> None:
    accumulator = FedAvgAccumulator(SPEC)
    accumulator.add(random_update(rng), 2.0)
    accumulator.add(random_update(rng), 3.5)

    first = accumulator.result()
    first["layer0.bias"][:] = 1e9  # results are new arrays, not views of the accumulator
    second = accumulator.result()

    assert accumulator.count == 2
    assert accumulator.total_weight == 5.5
    assert np.abs(second["layer0.bias"]).max() < 1e3
    assert list(second) == list(SPEC.names)


def test_result_without_updates_raises() -> None:
    with pytest.raises(FlcoreError, match="zero updates"):
        FedAvgAccumulator(SPEC).result()


def test_rejected_update_leaves_state_unchanged(rng: np.random.Generator, tmp_path: Path) -> None:
    accumulator = FedAvgAccumulator(SPEC, chunk_size=7)
    good = random_update(rng)
    accumulator.add(good, 1.0)
    poisoned = random_update(rng)
    poisoned["layer1.weight"][2, 3, 1] = np.nan
    wrong_shape = dict(random_update(rng), **{"layer0.bias": np.zeros(6, np.float32)})
    path = tmp_path / "wrong.safetensors"
    path.write_bytes(to_bytes(wrong_shape))

    with pytest.raises(FlcoreError, match=r"'layer1\.weight'"):
        accumulator.add(poisoned, 1.0)
    with pytest.raises(SerdeError) as info:
        accumulator.add(wrong_shape, 1.0)
    assert info.value.code == "shape_mismatch"
    with pytest.raises(SerdeError):
        accumulator.add_file(path, 1.0)
    with pytest.raises(SerdeError) as info:
        accumulator.add({k: v for k, v in good.items() if k != "layer0.bias"}, 1.0)
    assert info.value.code == "name_mismatch"

    assert accumulator.count == 1
    assert_params_close(accumulator.result(), good, atol=0)


def test_add_file_streams_without_materialising_a_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    spec = ParameterSpec((TensorSpec("w", (1000, 1000)), TensorSpec("b", (1000,))))  # 4 MB
    path = tmp_path / "big.safetensors"
    update = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}
    path.write_bytes(to_bytes(update))
    del update
    accumulator = FedAvgAccumulator(spec, chunk_size=4096)

    tracemalloc.start()
    try:
        accumulator.add_file(path, 2.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < spec.nbytes // 8  # far less than one model (4 MB); O(chunk) plus the header
    assert accumulator.count == 1


def test_fedavg_reference_validates_inputs(rng: np.random.Generator) -> None:
    with pytest.raises(FlcoreError):
        fedavg([], [])
    with pytest.raises(FlcoreError, match="weights"):
        fedavg([random_update(rng)], [1.0, 2.0])
    with pytest.raises(SerdeError):
        fedavg([random_update(rng), {"x": np.zeros(1, np.float32)}], [1.0, 1.0])


def test_aggregation_algorithm_values() -> None:
    assert AggregationAlgorithm("fedavg") is AggregationAlgorithm.FEDAVG
    assert AggregationAlgorithm.FEDAVG == "fedavg"
    assert str(AggregationAlgorithm.FEDAVG) == "fedavg" and isinstance(AggregationAlgorithm.FEDAVG, str)
