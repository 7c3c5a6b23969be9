"""Tests for FedAdagrad, FedYogi and FedAdam (Reddi et al. 2021, Algorithm 2): contract and steps by hand."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from flcore.parameters import Parameters
from flcore.strategies import build_strategy
from flcore.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from flcore.tests.strategy_cases import SPEC, StrategyContract, scalar_spec, vec

FEDOPT_INVALID: list[tuple[dict[str, Any], str]] = [
    ({"beta_1": 1.0}, "beta_1"),
    ({"beta_1": -0.5}, "beta_1"),
    ({"tau": 0.0}, "tau"),
    ({"server_learning_rate": 0.0}, "server_learning_rate"),
]


class FedOptContract(StrategyContract):
    """First step from ``m = 0``, ``v = tau^2``: ``x + eta (1 - b1) D / (sqrt(v_0) + tau)``."""

    def expected_first_step(self, base: Parameters, delta: Parameters) -> Parameters:
        hp = self.strategy().hyperparameters()
        eta, beta_1, tau = hp["server_learning_rate"], hp["beta_1"], hp["tau"]
        result = {}
        for name in base:
            d = delta[name].astype(np.float64)
            if self.algorithm == "fedadagrad":
                v = tau**2 + d**2
            elif self.algorithm == "fedadam":
                v = hp["beta_2"] * tau**2 + (1 - hp["beta_2"]) * d**2
            else:  # fedyogi: D^2 > tau^2 here, so sign(v - D^2) = -1 and v grows
                assert np.all(d**2 > tau**2)
                v = tau**2 + (1 - hp["beta_2"]) * d**2
            result[name] = (base[name] + eta * (1 - beta_1) * d / (np.sqrt(v) + tau)).astype(np.float32)
        return result


class TestFedAdamContract(FedOptContract):
    algorithm = "fedadam"
    hyperparameters: ClassVar[dict[str, Any]] = {}
    invalid_hyperparameters = [*FEDOPT_INVALID, ({"beta_2": 1.5}, "beta_2")]


class TestFedYogiContract(FedOptContract):
    algorithm = "fedyogi"
    hyperparameters: ClassVar[dict[str, Any]] = {"tau": 1e-4}
    invalid_hyperparameters = [*FEDOPT_INVALID, ({"beta_2": "0.9"}, "beta_2")]


class TestFedAdagradContract(FedOptContract):
    algorithm = "fedadagrad"
    hyperparameters: ClassVar[dict[str, Any]] = {"beta_1": 0.5, "tau": 1e-3}
    invalid_hyperparameters = FEDOPT_INVALID


# ---- hand-computed cases -------------------------------------------------------------------------------


def run_steps(algorithm: str, hyperparameters: dict[str, Any], deltas: list[Parameters]) -> list[Parameters]:
    strategy = build_strategy(algorithm, hyperparameters)
    size = len(deltas[0]["w"])
    x, state = vec(*([0.0] * size)), strategy.init_state(scalar_spec(size))
    seen = []
    for delta in deltas:
        x, state, _ = strategy.aggregate(x, [delta, delta], [3, 5], state)
        seen.append(x)
    return seen


def test_fedadam_two_steps_by_hand() -> None:
    # beta_1 = 0.5, beta_2 = 0.5, tau = 1 (v_{-1} = 1), eta = 1; coordinate 2 mirrors coordinate 1.
    # Step 1, Delta = 1:  m = 0.5 * 1 = 0.5;      v = 0.5 * 1 + 0.5 * 1 = 1;  x = 0.5 / (1 + 1) = 0.25
    # Step 2, Delta = 7:  m = 0.25 + 3.5 = 3.75;  v = 0.5 + 0.5 * 49 = 25;    x = 0.25 + 3.75 / 6 = 0.875
    hyperparameters = {"beta_1": 0.5, "beta_2": 0.5, "tau": 1.0, "server_learning_rate": 1.0}

    first, second = run_steps("fedadam", hyperparameters, [vec(1.0, -1.0), vec(7.0, -7.0)])

    np.testing.assert_allclose(first["w"], [0.25, -0.25], rtol=1e-7)
    np.testing.assert_allclose(second["w"], [0.875, -0.875], rtol=1e-7)


def test_fedadam_with_unequal_betas_by_hand() -> None:
    # beta_1 = 0.5 (first moment), beta_2 = 0.75 (second moment), tau = 2 (v_{-1} = 4), eta = 1; unequal
    # betas, so using one in the other's place (or the same for both) changes every number below.
    # Step 1, Delta = (2, 6):
    #   m = 0.5 * Delta = (1, 3);   v = 0.75 * 4 + 0.25 * Delta^2 = (3 + 1, 3 + 9) = (4, 12)
    #   x = m / (sqrt(v) + 2) = (1 / 4, 3 / (2 sqrt 3 + 2)) = (0.25, (3 sqrt 3 - 3) / 4)
    # Step 2, Delta = (2, 0):
    #   m = 0.5 * m + 0.5 * Delta = (1.5, 1.5);   v = 0.75 * v + 0.25 * Delta^2 = (4, 9)
    #   x = x + m / (sqrt(v) + 2) = (0.25 + 1.5 / 4, x_2 + 1.5 / 5) = (0.625, x_2 + 0.3)
    # (Swapped, step 1 would give m = (0.5, 1.5) and v = (4, 20).)
    strategy = build_strategy(
        "fedadam", {"beta_1": 0.5, "beta_2": 0.75, "tau": 2.0, "server_learning_rate": 1.0}
    )
    x, state = vec(0.0, 0.0), strategy.init_state(scalar_spec(2))
    second = (3 * np.sqrt(3.0) - 3) / 4

    x, state, _ = strategy.aggregate(x, [vec(2.0, 6.0)], [1], state)
    np.testing.assert_allclose(state.tensors["m"]["w"], [1.0, 3.0], rtol=1e-7)
    np.testing.assert_allclose(state.tensors["v"]["w"], [4.0, 12.0], rtol=1e-7)
    np.testing.assert_allclose(x["w"], [0.25, second], rtol=1e-6)
    x, state, _ = strategy.aggregate(x, [vec(2.0, 0.0)], [1], state)
    np.testing.assert_allclose(state.tensors["m"]["w"], [1.5, 1.5], rtol=1e-7)
    np.testing.assert_allclose(state.tensors["v"]["w"], [4.0, 9.0], rtol=1e-7)
    np.testing.assert_allclose(x["w"], [0.625, second + 0.3], rtol=1e-6)


def test_fedyogi_sign_branches_by_hand() -> None:
    # beta_1 = 0.5, beta_2 = 0.36 (1 - beta_2 = 0.64), tau = 2 (v_{-1} = 4), eta = 1.
    # Step 1:
    #   Delta = 6:   36 > 4, sign(4 - 36) = -1:  v = 4 + 0.64 * 36 = 27.04 = 5.2^2
    #                m = 3;    x = 3 / 7.2 = 5/12
    #   Delta = 1.5: 2.25 < 4, sign = +1:        v = 4 - 0.64 * 2.25 = 2.56 = 1.6^2
    #                m = 0.75; x = 0.75 / 3.6 = 5/24
    #   Delta = 2:   4 == 4, sign = 0:           v = 4
    #                m = 1;    x = 1 / 4 = 0.25
    # Step 2, Delta = 0 everywhere (sign +1, v unchanged since Delta^2 = 0; m halves):
    #   x = 5/12 + 1.5 / 7.2 = 0.625;  5/24 + 0.375 / 3.6 = 0.3125;  0.25 + 0.5 / 4 = 0.375
    hyperparameters = {"beta_1": 0.5, "beta_2": 0.36, "tau": 2.0, "server_learning_rate": 1.0}
    strategy = build_strategy("fedyogi", hyperparameters)
    x, state = vec(0.0, 0.0, 0.0), strategy.init_state(scalar_spec(3))

    x, state, _ = strategy.aggregate(x, [vec(6.0, 1.5, 2.0)], [1], state)
    np.testing.assert_allclose(x["w"], [5 / 12, 5 / 24, 0.25], rtol=1e-6)
    np.testing.assert_allclose(state.tensors["v"]["w"], [27.04, 2.56, 4.0], rtol=1e-6)
    np.testing.assert_allclose(state.tensors["m"]["w"], [3.0, 0.75, 1.0], rtol=1e-7)
    x, state, _ = strategy.aggregate(x, [vec(0.0, 0.0, 0.0)], [1], state)
    np.testing.assert_allclose(x["w"], [0.625, 0.3125, 0.375], rtol=1e-6)


def test_fedadagrad_two_steps_by_hand() -> None:
    # beta_1 = 0.5, tau = 3 (v_{-1} = 9), eta = 1.
    # Step 1, Delta = 4:   v = 9 + 16 = 25;    m = 2;           x = 2 / (5 + 3) = 0.25
    # Step 2, Delta = 12:  v = 25 + 144 = 169; m = 1 + 6 = 7;   x = 0.25 + 7 / (13 + 3) = 0.6875
    hyperparameters = {"beta_1": 0.5, "tau": 3.0, "server_learning_rate": 1.0}

    first, second = run_steps("fedadagrad", hyperparameters, [vec(4.0), vec(12.0)])

    np.testing.assert_allclose(first["w"], [0.25], rtol=1e-7)
    np.testing.assert_allclose(second["w"], [0.6875], rtol=1e-7)


def test_initial_state_is_zero_momentum_and_tau_squared() -> None:
    state = FedYogi(tau=0.5).init_state(SPEC)

    assert list(state.tensors) == ["m", "v"]
    assert all(np.all(a == 0) for a in state.tensors["m"].values())
    assert all(np.all(a == np.float32(0.25)) and a.dtype == np.float32 for a in state.tensors["v"].values())


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (FedAdam, {"server_learning_rate": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9}),
        (FedYogi, {"server_learning_rate": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
        (FedAdagrad, {"server_learning_rate": 0.1, "beta_1": 0.0, "tau": 1e-9}),
    ],
)
def test_documented_defaults(cls: type, expected: dict[str, float]) -> None:
    assert cls.from_hyperparameters({}).hyperparameters() == expected


def test_state_from_another_algorithm_is_rejected() -> None:
    fedavgm_state = build_strategy("fedavgm", {}).init_state(SPEC)

    with pytest.raises(ValueError, match=r"groups \['m', 'v'\]"):
        FedAdam().apply(SPEC.zeros(), SPEC.zeros(), fedavgm_state)
