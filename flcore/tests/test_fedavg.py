"""Tests for flcore.strategies.fedavg against a brute-force float64 weighted mean and FedAvg invariants."""

from __future__ import annotations

import abc
import importlib
import tracemalloc
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from flcore.errors import FlcoreError, SerdeError
from flcore.parameters import Parameters, ParameterSpec, TensorSpec, safetensors_bytes, to_bytes
from flcore.strategies import AggregationAlgorithm, FedAvgAccumulator, fedavg

# The module, not the function of the same name that flcore.strategies re-exports.
fedavg_module = importlib.import_module("flcore.strategies.fedavg")

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


class TestAccumulatorAddFileVerified(AggregatorContract):
    """The server's call: blobs validated at upload, finiteness checked once in result()."""

    def aggregate(
        self, updates: Sequence[Parameters], weights: Sequence[float], tmp_path: Path
    ) -> Parameters:
        tmp_path.mkdir(parents=True, exist_ok=True)
        accumulator = FedAvgAccumulator(SPEC, chunk_size=11)
        for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
            path = tmp_path / f"update{i}.safetensors"
            path.write_bytes(to_bytes(update, metadata={"num_examples": str(i)}))
            accumulator.add_file(path, weight, verified=True)
        return accumulator.result()


class TestAccumulatorWithoutBlas(AggregatorContract):
    """Without scipy's saxpy the accumulator falls back to numpy chunks through the scratch buffer."""

    @pytest.fixture(autouse=True)
    def _no_saxpy(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(fedavg_module, "_saxpy", lambda: None)

    def aggregate(
        self, updates: Sequence[Parameters], weights: Sequence[float], tmp_path: Path
    ) -> Parameters:
        tmp_path.mkdir(parents=True, exist_ok=True)
        accumulator = FedAvgAccumulator(SPEC, chunk_size=7)
        for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
            if i % 2:
                accumulator.add(update, weight)
            else:
                path = tmp_path / f"update{i}.safetensors"
                path.write_bytes(to_bytes(update))
                accumulator.add_file(path, weight, verified=bool(i % 4))
        return accumulator.result()


def write_unsorted_blob(path: Path, update: Mapping[str, np.ndarray]) -> None:
    """A valid safetensors file whose tensors are stored in the update's order, not sorted by name."""
    tensors = {name: np.asarray(array, dtype="<f4", order="C") for name, array in update.items()}
    path.write_bytes(safetensors_bytes(tensors, {}))


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


def test_verified_add_file_reports_a_non_finite_stored_update_in_result(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    good, poisoned = random_update(rng), random_update(rng)
    poisoned["layer1.weight"][1, 2, 0] = np.inf
    (tmp_path / "good.safetensors").write_bytes(to_bytes(good))
    (tmp_path / "poisoned.safetensors").write_bytes(to_bytes(poisoned))  # to_bytes does not check values
    accumulator = FedAvgAccumulator(SPEC)

    accumulator.add_file(tmp_path / "good.safetensors", 2.0, verified=True)
    accumulator.add_file(tmp_path / "poisoned.safetensors", 1.0, verified=True)  # deferred: no error here

    with pytest.raises(FlcoreError, match=r"verified=True.*not finite"):
        accumulator.result()
    with pytest.raises(FlcoreError, match="not finite"):
        accumulator.result()  # still refused on a second call


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_default_add_file_refuses_a_non_finite_file_before_adding(
    rng: np.random.Generator, tmp_path: Path, bad: float
) -> None:
    good, poisoned = random_update(rng), random_update(rng)
    poisoned["layer0.bias"][3] = bad
    path = tmp_path / "poisoned.safetensors"
    path.write_bytes(to_bytes(poisoned))
    accumulator = FedAvgAccumulator(SPEC, chunk_size=7)
    accumulator.add(good, 1.0)

    with pytest.raises(FlcoreError, match=r"'layer0\.bias'.*NaN or Inf"):
        accumulator.add_file(path, 1.0)

    assert accumulator.count == 1
    assert_params_close(accumulator.result(), good, atol=0)
    path.unlink()  # the refused file's mapping was closed (or is released with the traceback)


def test_verified_add_file_still_checks_names_and_shapes(rng: np.random.Generator, tmp_path: Path) -> None:
    wrong_shape = dict(random_update(rng), **{"layer0.bias": np.zeros(6, np.float32)})
    missing = {k: v for k, v in random_update(rng).items() if k != "layer0.bias"}
    (tmp_path / "shape.safetensors").write_bytes(to_bytes(wrong_shape))
    (tmp_path / "names.safetensors").write_bytes(to_bytes(missing))
    (tmp_path / "junk.safetensors").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
    accumulator = FedAvgAccumulator(SPEC)

    with pytest.raises(SerdeError) as info:
        accumulator.add_file(tmp_path / "shape.safetensors", 1.0, verified=True)
    assert info.value.code == "shape_mismatch"
    with pytest.raises(SerdeError) as info:
        accumulator.add_file(tmp_path / "names.safetensors", 1.0, verified=True)
    assert info.value.code == "name_mismatch"
    with pytest.raises(SerdeError):
        accumulator.add_file(tmp_path / "junk.safetensors", 1.0, verified=True)
    assert accumulator.count == 0


@pytest.mark.parametrize("verified", [False, True])
def test_add_file_reads_blobs_in_any_valid_layout(
    rng: np.random.Generator, tmp_path: Path, verified: bool
) -> None:
    updates = [random_update(rng) for _ in range(3)]
    weights = [3.0, 1.0, 2.5]
    accumulator = FedAvgAccumulator(SPEC, chunk_size=7)
    for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        path = tmp_path / f"u{i}.safetensors"
        if i == 1:
            write_unsorted_blob(path, update)  # spec order, not to_bytes' sorted layout: the general path
        else:
            path.write_bytes(to_bytes(update))
        accumulator.add_file(path, weight, scale=0.5 if i == 2 else 1.0, verified=verified)

    expected = brute_force_mean(
        [updates[0], updates[1], {k: 0.5 * v for k, v in updates[2].items()}], weights
    )
    assert_params_close(accumulator.result(), expected)


def test_add_accepts_float64_and_strided_arrays(rng: np.random.Generator) -> None:
    updates = [random_update(rng) for _ in range(3)]
    accumulator = FedAvgAccumulator(SPEC, chunk_size=7)
    accumulator.add({k: v.astype(np.float64) for k, v in updates[0].items()}, 1.0)
    accumulator.add({k: np.asfortranarray(v) for k, v in updates[1].items()}, 2.0)
    accumulator.add(updates[2], 3.0)

    assert_params_close(accumulator.result(), brute_force_mean(updates, [1.0, 2.0, 3.0]))


def test_verified_add_file_and_result_hold_at_most_two_models(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    spec = ParameterSpec((TensorSpec("w", (1000, 1000)), TensorSpec("b", (1000,))))  # 4 MB
    paths = []
    for i in range(3):
        update = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}
        paths.append(tmp_path / f"u{i}.safetensors")
        paths[-1].write_bytes(to_bytes(update))
    del update

    tracemalloc.start()
    try:
        accumulator = FedAvgAccumulator(spec)
        for path in paths:
            accumulator.add_file(path, 2.0, verified=True)
        result = accumulator.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 2 * spec.nbytes + spec.nbytes // 20  # the accumulator and the result, nothing else
    assert result["w"].shape == (1000, 1000)


class TestAccumulatorAddFileMeasured(AggregatorContract):
    """With a reference set (the server's anomaly statistics) the sum is unchanged."""

    def aggregate(
        self, updates: Sequence[Parameters], weights: Sequence[float], tmp_path: Path
    ) -> Parameters:
        tmp_path.mkdir(parents=True, exist_ok=True)
        accumulator = FedAvgAccumulator(SPEC, chunk_size=11)
        accumulator.set_reference(random_update(np.random.default_rng(5)))
        for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
            path = tmp_path / f"update{i}.safetensors"
            path.write_bytes(to_bytes(update))
            accumulator.add_file(path, weight, verified=True)
        return accumulator.result()


@pytest.mark.parametrize("verified", [False, True])
def test_reference_dots_of_mapped_files_match_brute_force_and_leave_the_sum_bitwise(
    tmp_path: Path, verified: bool
) -> None:
    rng = np.random.default_rng(11)
    updates = [random_update(rng) for _ in range(5)]
    reference = random_update(rng)
    plain, measured = FedAvgAccumulator(SPEC, chunk_size=11), FedAvgAccumulator(SPEC, chunk_size=11)
    norm = measured.set_reference(reference)
    for i, update in enumerate(updates):
        path = tmp_path / f"u{i}.safetensors"
        path.write_bytes(to_bytes(update))
        plain.add_file(path, 1.0 + i, scale=0.5, verified=verified)
        measured.add_file(path, 1.0 + i, scale=0.5, verified=verified)

    for name, array in plain.result().items():
        np.testing.assert_array_equal(measured.result()[name], array)
    flat_reference = np.concatenate([reference[t.name].astype(np.float64).ravel() for t in SPEC.tensors])
    expected = [
        float(np.concatenate([u[t.name].astype(np.float64).ravel() for t in SPEC.tensors]) @ flat_reference)
        for u in updates
    ]
    np.testing.assert_allclose(measured.reference_dots, expected, rtol=1e-5, atol=1e-4)  # float32 chunks
    assert norm == pytest.approx(float(np.linalg.norm(flat_reference)), rel=1e-12)


def test_reference_after_an_update_is_refused() -> None:
    accumulator = FedAvgAccumulator(SPEC)
    accumulator.add(random_update(np.random.default_rng(0)), 1.0)
    with pytest.raises(FlcoreError, match="before adding updates"):
        accumulator.set_reference(random_update(np.random.default_rng(1)))
