"""Tests for the staleness functions, FedBuff and FedAsync, against values computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flcore.errors import ConfigError, FlcoreError
from flcore.parameters import to_bytes
from flcore.strategies import build_strategy
from flcore.strategies.fedasync import FedAsync
from flcore.strategies.fedbuff import FedBuff
from flcore.strategies.staleness import (
    StalenessFunction,
    constant_staleness,
    hinge_staleness,
    polynomial_staleness,
)
from flcore.tests.strategy_cases import SPEC, random_params, scalar_spec, vec

# ---- staleness functions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("staleness", "expected"),
    [(0, 1.0), (3, 0.5), (8, 1 / 3), (99, 0.1)],  # (t - tau + 1)^(-1/2): 1, 1/2, 1/3, 1/10
)
def test_polynomial_half(staleness: int, expected: float) -> None:
    assert polynomial_staleness(staleness, 0.5) == pytest.approx(expected, rel=1e-12)


def test_polynomial_other_exponent() -> None:
    assert polynomial_staleness(1, 1.0) == 0.5  # 2^-1
    assert polynomial_staleness(3, 2.0) == 1 / 16  # 4^-2


@pytest.mark.parametrize(
    ("staleness", "expected"),
    [(0, 1.0), (4, 1.0), (5, 1 / 11), (6, 1 / 21), (14, 1 / 101)],  # a = 10, b = 4: 1 / (10 (s - 4) + 1)
)
def test_hinge(staleness: int, expected: float) -> None:
    assert hinge_staleness(staleness, 10.0, 4.0) == pytest.approx(expected, rel=1e-12)


def test_constant_and_configured_functions() -> None:
    assert constant_staleness(1000) == 1.0
    assert StalenessFunction("constant")(7) == 1.0
    assert StalenessFunction("hinge", hinge_slope=2.0, hinge_cutoff=1.0)(3) == 0.2  # 1 / (2 * 2 + 1)
    assert StalenessFunction()(15) == 0.25  # default polynomial a = 1/2: 16^-1/2


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_invalid_staleness_is_rejected(bad: object) -> None:
    with pytest.raises(FlcoreError, match="non-negative integer"):
        polynomial_staleness(bad, 0.5)  # type: ignore[arg-type]


# ---- FedBuff -------------------------------------------------------------------------------------------


def test_fedbuff_steps_after_k_and_not_before() -> None:
    # K = 3, eta = 2, s = 1/sqrt(1 + staleness):
    #   Delta_1 = 3 at staleness 0 (weight 1), Delta_2 = 4 at staleness 3 (1/2),
    #   Delta_3 = 6 at staleness 8 (1/3)
    #   pseudo-gradient = (3 + 2 + 2) / 3 = 7/3;  x = 1 + 2 * 7/3 = 17/3
    strategy = build_strategy("fedbuff", {"buffer_size": 3, "server_learning_rate": 2.0})
    assert isinstance(strategy, FedBuff)
    buffer = strategy.buffer(scalar_spec())

    assert buffer.add(vec(3.0), 0) == 1.0
    assert buffer.add(vec(4.0), 3) == 0.5
    assert not buffer.ready()
    with pytest.raises(FlcoreError, match="holds 2 of buffer_size=3"):
        strategy.step(vec(1.0), buffer)
    assert buffer.add(vec(6.0), 8) == pytest.approx(1 / 3)
    assert buffer.ready() and buffer.count == 3

    new_global = strategy.step(vec(1.0), buffer)

    assert float(new_global["w"][0]) == pytest.approx(17 / 3, rel=1e-6)
    with pytest.raises(FlcoreError, match="already holds"):
        buffer.add(vec(1.0), 0)


def test_fedbuff_buffer_streams_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    deltas = [random_params(rng) for _ in range(2)]
    buffer = FedBuff(buffer_size=2).buffer(SPEC, chunk_size=5)
    for i, delta in enumerate(deltas):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(to_bytes(delta))
        buffer.add_file(path, 3 * i)  # weights 1 and 1/2

    pseudo_gradient = buffer.pseudo_gradient()

    for name in SPEC.names:
        np.testing.assert_allclose(
            pseudo_gradient[name], (deltas[0][name] + 0.5 * deltas[1][name]) / 2, atol=1e-6
        )


def test_fedbuff_defaults_and_is_asynchronous() -> None:
    strategy = build_strategy("fedbuff", {})

    assert strategy.asynchronous and strategy.streaming
    assert strategy.hyperparameters()["buffer_size"] == 10
    assert isinstance(strategy, FedBuff) and strategy.staleness_weight(3) == 0.5
    with pytest.raises(FlcoreError, match="asynchronous"):
        strategy.combine([vec(1.0)], [1])
    with pytest.raises(ConfigError, match="'buffer_size'"):
        build_strategy("fedbuff", {"buffer_size": 0})


# ---- FedAsync ------------------------------------------------------------------------------------------


def test_fedasync_mixing_by_hand() -> None:
    # alpha = 0.6, polynomial a = 1/2, staleness 3: alpha_t = 0.6 * 1/2 = 0.3.
    # x_new = x_tau + Delta = 0 + 2 = 2;  x_t = 0.7 * 1 + 0.3 * 2 = 1.3.
    # Second coordinate: 0.7 * 4 + 0.3 * (1 - 1) = 2.8
    strategy = build_strategy("fedasync", {"mixing": 0.6})
    assert isinstance(strategy, FedAsync)

    mixed = strategy.mix(vec(1.0, 4.0), vec(0.0, 1.0), vec(2.0, -1.0), staleness=3)

    np.testing.assert_allclose(mixed["w"], [1.3, 2.8], rtol=1e-6)
    assert strategy.mixing_weight(3) == pytest.approx(0.3)


def test_fedasync_hinge_and_fresh_update() -> None:
    # Hinge a = 10, b = 4, staleness 5: s = 1/11, alpha_t = 0.55 / 11 = 0.05; x = 0.95 * 0 + 0.05 * 20 = 1.
    strategy = FedAsync(mixing=0.55, staleness_function="hinge")
    state = strategy.init_state(scalar_spec())

    assert float(strategy.mix(vec(0.0), vec(10.0), vec(10.0), 5)["w"][0]) == pytest.approx(1.0)
    fresh, new_state = strategy.apply(vec(1.0), vec(2.0), state)
    assert float(fresh["w"][0]) == pytest.approx(1.0 + 0.55 * 2.0)  # staleness 0: x + alpha * Delta
    assert new_state.scalars["step"] == 1


def test_fedasync_validation() -> None:
    with pytest.raises(ConfigError, match="'mixing'"):
        build_strategy("fedasync", {"mixing": 0.0})
    with pytest.raises(ConfigError, match="'staleness_function'"):
        build_strategy("fedasync", {"staleness_function": "exponential"})
    with pytest.raises(FlcoreError, match="non-negative"):
        FedAsync().mix(vec(0.0), vec(0.0), vec(0.0), -1)
