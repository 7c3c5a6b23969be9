"""Shared fixtures and the contract every synchronous aggregation strategy's tests inherit."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from flcore.errors import ConfigError, FlcoreError
from flcore.parameters import Parameters, ParameterSpec, TensorSpec, l2_norm
from flcore.strategies import ServerState, Strategy, build_strategy

# Tensor sizes 65, 5 and 24 (P = 94), in non-sorted name order: no chunk size below divides them all.
SPEC = ParameterSpec(
    (
        TensorSpec("layer1.weight", (13, 5)),
        TensorSpec("layer0.bias", (5,)),
        TensorSpec("layer0.weight", (3, 4, 2)),
    )
)
P = SPEC.num_parameters
CHUNK_SIZES = [1, 7, 16, 64, P - 1, P, P + 5]


def random_params(rng: np.random.Generator, scale: float = 1.0, spec: ParameterSpec = SPEC) -> Parameters:
    return {t.name: (scale * rng.standard_normal(t.shape)).astype(np.float32) for t in spec.tensors}


def scalar_spec(size: int = 1) -> ParameterSpec:
    return ParameterSpec((TensorSpec("w", (size,)),))


def vec(*values: float) -> Parameters:
    return {"w": np.array(values, dtype=np.float32)}


def assert_params_close(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], atol: float = 1e-6) -> None:
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=atol, rtol=0, err_msg=name)


def assert_params_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return l2_norm({k: a[k].astype(np.float64) - b[k] for k in a})


class StrategyContract:
    """Invariants every synchronous strategy keeps; subclasses set the class attributes below."""

    algorithm: ClassVar[str]
    hyperparameters: ClassVar[dict[str, Any]]
    weighted: ClassVar[bool] = True
    num_updates: ClassVar[int] = 6
    invalid_hyperparameters: ClassVar[list[tuple[dict[str, Any], str]]] = []

    # ---- helpers ------------------------------------------------------------------------------------

    def strategy(self) -> Strategy:
        return build_strategy(self.algorithm, self.hyperparameters)

    def expected_first_step(self, base: Parameters, delta: Parameters) -> Parameters:
        """New global after one round in which every client sent ``delta``; ``base + delta`` by default."""
        return {k: base[k] + delta[k] for k in base}

    def round_inputs(self, rng: np.random.Generator) -> tuple[list[Parameters], list[int]]:
        deltas = [random_params(rng, 0.1) for _ in range(self.num_updates)]
        counts = [int(c) for c in rng.integers(1, 500, size=self.num_updates)]
        return deltas, counts

    # ---- invariants ---------------------------------------------------------------------------------

    def test_identical_updates_return_themselves(self, rng: np.random.Generator) -> None:
        strategy = self.strategy()
        base, delta = random_params(rng), random_params(rng, 0.1)
        counts = [int(c) for c in rng.integers(1, 500, size=self.num_updates)]

        new_global, state, metrics = strategy.aggregate(
            base, [delta] * self.num_updates, counts, strategy.init_state(SPEC)
        )

        assert_params_close(new_global, self.expected_first_step(base, delta), atol=2e-6)
        assert state.scalars["step"] == 1
        assert metrics["num_updates"] == self.num_updates

    def test_permutation_invariance(self, rng: np.random.Generator) -> None:
        strategy = self.strategy()
        base = random_params(rng)
        deltas, counts = self.round_inputs(rng)
        order = rng.permutation(len(deltas))

        forward, _, _ = strategy.aggregate(base, deltas, counts, strategy.init_state(SPEC))
        shuffled, _, _ = strategy.aggregate(
            base, [deltas[i] for i in order], [counts[i] for i in order], strategy.init_state(SPEC)
        )

        assert_params_close(forward, shuffled, atol=1e-6)

    def test_scaling_all_weights_changes_nothing(self, rng: np.random.Generator) -> None:
        strategy = self.strategy()
        deltas, counts = self.round_inputs(rng)

        once, _ = strategy.combine(deltas, counts)
        doubled, _ = strategy.combine(deltas, [2 * c for c in counts])

        assert_params_close(once, doubled, atol=1e-6)

    def test_moving_weight_to_an_update(self, rng: np.random.Generator) -> None:
        strategy = self.strategy()
        deltas, _ = self.round_inputs(rng)
        even = [10] * len(deltas)
        favour_first = [1000] + [10] * (len(deltas) - 1)

        balanced, _ = strategy.combine(deltas, even)
        favoured, _ = strategy.combine(deltas, favour_first)

        if self.weighted:
            assert distance(favoured, deltas[0]) < distance(balanced, deltas[0]) - 1e-3
        else:
            assert_params_equal(favoured, balanced)

    @pytest.mark.parametrize("chunk_size", [None, 7])
    @pytest.mark.parametrize("streaming", [None, False])
    def test_measured_combination_is_the_same_and_its_dots_match_brute_force(
        self, rng: np.random.Generator, chunk_size: int | None, streaming: bool | None
    ) -> None:
        strategy = self.strategy()
        deltas, counts = self.round_inputs(rng)
        deltas[0] = {k: 40 * v for k, v in deltas[0].items()}  # an outlier the clipping rules scale down
        reference = random_params(rng)

        plain, plain_metrics = strategy.combine(deltas, counts, chunk_size=chunk_size, streaming=streaming)
        measured, metrics, dots = strategy.combine_measured(
            deltas, counts, reference, chunk_size=chunk_size, streaming=streaming
        )

        assert_params_equal(measured, plain)
        assert metrics == plain_metrics
        expected = [
            sum(
                float(np.dot(d[k].astype(np.float64).ravel(), reference[k].astype(np.float64).ravel()))
                for k in d
            )
            for d in deltas
        ]
        np.testing.assert_allclose(dots, expected, rtol=1e-5, atol=1e-6)

    def test_inputs_are_not_mutated(self, rng: np.random.Generator) -> None:
        strategy = self.strategy()
        base = random_params(rng)
        deltas, counts = self.round_inputs(rng)
        state = strategy.aggregate(base, deltas, counts, strategy.init_state(SPEC))[1]
        saved = copy.deepcopy((base, deltas, counts))
        saved_state = copy.deepcopy(state)

        strategy.aggregate(base, deltas, counts, state, chunk_size=7)
        strategy.aggregate(base, deltas, counts, state)

        assert_params_equal(base, saved[0])
        for delta, original in zip(deltas, saved[1], strict=True):
            assert_params_equal(delta, original)
        assert counts == saved[2]
        assert state.equals(saved_state)

    def run_rounds(
        self,
        strategy: Strategy,
        rounds: Sequence[tuple[list[Parameters], list[int]]],
        base: Parameters,
        state: ServerState,
    ) -> tuple[Parameters, ServerState]:
        for deltas, counts in rounds:
            base, state, _ = strategy.aggregate(base, deltas, counts, state)
        return base, state

    def test_state_round_trips_through_bytes(self, rng: np.random.Generator) -> None:
        strategy = self.strategy()
        rounds = [self.round_inputs(rng) for _ in range(2)]
        _, state = self.run_rounds(strategy, rounds, random_params(rng), strategy.init_state(SPEC))

        restored = ServerState.from_bytes(state.to_bytes(), SPEC)

        assert restored.equals(state)
        assert list(restored.tensors) == list(strategy.STATE_GROUPS)
        assert restored.scalars == {"step": 2}

    def test_resume_after_restart_is_identical(self, rng: np.random.Generator) -> None:
        strategy = self.strategy()
        base = random_params(rng)
        rounds = [self.round_inputs(rng) for _ in range(3)]

        straight, straight_state = self.run_rounds(strategy, rounds, base, strategy.init_state(SPEC))
        halfway, halfway_state = self.run_rounds(strategy, rounds[:2], base, strategy.init_state(SPEC))
        stored = (json.dumps(strategy.hyperparameters()), halfway_state.to_bytes())
        rebuilt = build_strategy(self.algorithm, json.loads(stored[0]))
        resumed, resumed_state = self.run_rounds(
            rebuilt, rounds[2:], halfway, ServerState.from_bytes(stored[1], SPEC)
        )

        assert_params_equal(resumed, straight)
        assert resumed_state.equals(straight_state)

    @pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
    def test_chunked_equals_unchunked(self, rng: np.random.Generator, chunk_size: int) -> None:
        strategy = self.strategy()
        deltas, counts = self.round_inputs(rng)

        reference, _ = strategy.combine(deltas, counts, chunk_size=P + 100)
        chunked, _ = strategy.combine(deltas, counts, chunk_size=chunk_size)
        across_workers, _ = strategy.combine(deltas, counts, chunk_size=chunk_size, streaming=False)

        assert_params_close(chunked, reference, atol=1e-7)
        assert_params_close(across_workers, reference, atol=1e-7)

    def test_results_are_float32_in_model_order(self, rng: np.random.Generator) -> None:
        strategy = self.strategy()
        deltas, counts = self.round_inputs(rng)

        new_global, _, metrics = strategy.aggregate(
            random_params(rng), deltas, counts, strategy.init_state(SPEC)
        )

        assert list(new_global) == list(SPEC.names)
        assert all(v.dtype == np.float32 and v.flags.writeable for v in new_global.values())
        assert all(isinstance(v, float) for v in metrics.values())

    def test_non_finite_update_is_rejected(self, rng: np.random.Generator) -> None:
        strategy = self.strategy()
        deltas, counts = self.round_inputs(rng)
        deltas[2]["layer0.bias"][1] = np.nan

        with pytest.raises(FlcoreError, match="NaN"):
            strategy.combine(deltas, counts)

    def test_hyperparameters_round_trip_as_json(self) -> None:
        strategy = self.strategy()

        rebuilt = build_strategy(self.algorithm, json.loads(json.dumps(strategy.hyperparameters())))

        assert rebuilt.hyperparameters() == strategy.hyperparameters()
        assert rebuilt.algorithm == self.algorithm

    def test_unknown_hyperparameter_is_rejected(self) -> None:
        with pytest.raises(ConfigError, match="'learning_rat'"):
            build_strategy(self.algorithm, {**self.hyperparameters, "learning_rat": 0.1})

    def test_invalid_hyperparameters_name_the_field(self) -> None:
        for overrides, field in self.invalid_hyperparameters:
            with pytest.raises(ConfigError, match=f"'{field}'") as info:
                build_strategy(self.algorithm, {**self.hyperparameters, **overrides})
            value = next(iter(overrides.values()))
            if not isinstance(value, dict):
                assert f"Found {value!r}" in str(info.value)
