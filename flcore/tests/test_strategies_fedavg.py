"""Tests for the FedAvg, FedProx and FedAvgM strategies: the shared contract and hand-computed steps."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from flcore.parameters import Parameters
from flcore.strategies import build_strategy
from flcore.strategies.fedavg import FedAvg
from flcore.strategies.fedprox import FedProx
from flcore.tests.strategy_cases import StrategyContract, assert_params_close, scalar_spec, vec


class TestFedAvgContract(StrategyContract):
    algorithm = "fedavg"
    hyperparameters: ClassVar[dict[str, Any]] = {}
    invalid_hyperparameters: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"server_learning_rate": 0}, "server_learning_rate"),
        ({"server_learning_rate": "1"}, "server_learning_rate"),
        ({"server_learning_rate": float("inf")}, "server_learning_rate"),
    ]


class TestFedAvgHalfLearningRateContract(TestFedAvgContract):
    hyperparameters: ClassVar[dict[str, Any]] = {"server_learning_rate": 0.5}

    def expected_first_step(self, base: Parameters, delta: Parameters) -> Parameters:
        return {k: base[k] + 0.5 * delta[k] for k in base}


class TestFedProxContract(StrategyContract):
    algorithm = "fedprox"
    hyperparameters: ClassVar[dict[str, Any]] = {"proximal_mu": 0.1}
    invalid_hyperparameters: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"proximal_mu": -0.01}, "proximal_mu"),
        ({"proximal_mu": None}, "proximal_mu"),
    ]


class TestFedAvgMContract(StrategyContract):
    algorithm = "fedavgm"
    hyperparameters: ClassVar[dict[str, Any]] = {"server_momentum": 0.9}
    invalid_hyperparameters: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"server_momentum": 1.0}, "server_momentum"),
        ({"server_momentum": -0.1}, "server_momentum"),
        ({"server_learning_rate": -1.0}, "server_learning_rate"),
    ]


# ---- hand-computed cases -------------------------------------------------------------------------------


def test_fedavg_weighted_mean_by_hand() -> None:
    # Delta = (1 * [1, 0] + 3 * [0, 3]) / 4 = [0.25, 2.25]; eta = 0.5 -> [1, 2] + [0.125, 1.125].
    strategy = FedAvg(server_learning_rate=0.5)
    base = vec(1.0, 2.0)

    new_global, state, metrics = strategy.aggregate(
        base, [vec(1.0, 0.0), vec(0.0, 3.0)], [1, 3], strategy.init_state(scalar_spec(2))
    )

    assert_params_close(new_global, vec(1.125, 3.125))
    assert state.scalars == {"step": 1} and state.tensors == {}
    assert metrics["num_updates"] == 2.0
    assert abs(metrics["pseudo_gradient_norm"] - np.hypot(0.25, 2.25)) < 1e-6


def test_fedprox_is_fedavg_on_the_server_and_tells_agents_mu() -> None:
    fedprox = build_strategy("fedprox", {"proximal_mu": 0.5})
    default = build_strategy("fedprox", {})
    base = vec(1.0, 2.0)

    new_global, _, _ = fedprox.aggregate(
        base, [vec(1.0, 0.0), vec(0.0, 3.0)], [1, 3], fedprox.init_state(scalar_spec(2))
    )

    assert isinstance(fedprox, FedProx)
    assert fedprox.client_config() == {"proximal_mu": 0.5}
    assert default.client_config() == {"proximal_mu": 0.01}
    assert build_strategy("fedavg", {}).client_config() == {}
    assert_params_close(new_global, vec(1.25, 4.25))


def test_fedavgm_three_steps_by_hand() -> None:
    # beta = 0.9, eta = 1, x_0 = 0:
    #   Delta = 1:  v = 1,                 x = 1
    #   Delta = 2:  v = 0.9 + 2 = 2.9,     x = 3.9
    #   Delta = -1: v = 2.61 - 1 = 1.61,   x = 5.51
    strategy = build_strategy("fedavgm", {"server_momentum": 0.9, "server_learning_rate": 1.0})
    x, state = vec(0.0), strategy.init_state(scalar_spec())
    seen = []
    for delta in (1.0, 2.0, -1.0):
        x, state, _ = strategy.aggregate(x, [vec(delta)], [7], state)
        seen.append((float(x["w"][0]), float(state.tensors["momentum"]["w"][0])))

    np.testing.assert_allclose(seen, [(1.0, 1.0), (3.9, 2.9), (5.51, 1.61)], rtol=1e-6)


def test_fedavgm_learning_rate_scales_the_momentum_step() -> None:
    # eta = 0.5, beta = 0.5: Delta = 4 -> v = 4, x = 2; Delta = 4 -> v = 6, x = 5.
    strategy = build_strategy("fedavgm", {"server_momentum": 0.5, "server_learning_rate": 0.5})
    x, state = vec(0.0), strategy.init_state(scalar_spec())

    x, state, _ = strategy.aggregate(x, [vec(4.0)], [1], state)
    assert float(x["w"][0]) == 2.0
    x, state, _ = strategy.aggregate(x, [vec(4.0)], [1], state)
    assert float(x["w"][0]) == 5.0 and float(state.tensors["momentum"]["w"][0]) == 6.0
