"""Tests for flcore.training.sgd_fit: determinism, purity, convergence, FedProx term, early stopping."""

from __future__ import annotations

import numpy as np
import pytest

from flcore.data import load_dataset
from flcore.errors import ConfigError
from flcore.models import ModelSpec, build_model
from flcore.parameters import Parameters, l2_norm, subtract
from flcore.training import sgd_fit


def separable_data(rng: np.random.Generator, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs in 4 dimensions."""
    centres = np.array([[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0]], np.float32)
    y = rng.integers(0, 3, n)
    x = centres[y] + 0.3 * rng.standard_normal((n, 4)).astype(np.float32)
    return x.astype(np.float32), y


@pytest.fixture
def setup(rng: np.random.Generator) -> tuple[object, Parameters, np.ndarray, np.ndarray]:
    model = build_model(ModelSpec("mlp", 4, 3, (8,)))
    x, y = separable_data(rng)
    return model, model.init(rng), x, y


def test_same_seed_gives_bit_identical_results(setup) -> None:  # type: ignore[no-untyped-def]
    model, params, x, y = setup

    runs = [
        sgd_fit(
            model, params, x, y, epochs=2, batch_size=16, learning_rate=0.1, rng=np.random.default_rng(seed)
        )
        for seed in (7, 7, 8)
    ]

    assert all(np.array_equal(runs[0].parameters[k], runs[1].parameters[k]) for k in params)
    assert runs[0].train_loss == runs[1].train_loss
    assert not np.array_equal(runs[0].parameters["layer0.weight"], runs[2].parameters["layer0.weight"])


def test_does_not_mutate_inputs(setup) -> None:  # type: ignore[no-untyped-def]
    model, params, x, y = setup
    before = {k: v.copy() for k, v in params.items()}
    x_before, y_before = x.copy(), y.copy()

    outcome = sgd_fit(
        model, params, x, y, epochs=2, batch_size=16, learning_rate=0.5, rng=np.random.default_rng(0)
    )

    assert all(np.array_equal(params[k], before[k]) for k in params)
    assert np.array_equal(x, x_before) and np.array_equal(y, y_before)
    assert all(not np.shares_memory(outcome.parameters[k], params[k]) for k in params)
    assert l2_norm(subtract(outcome.parameters, params)) > 0


def test_decreases_loss_on_separable_data(setup) -> None:  # type: ignore[no-untyped-def]
    model, params, x, y = setup
    initial_loss, _ = model.evaluate(params, x, y)

    outcome = sgd_fit(
        model, params, x, y, epochs=20, batch_size=10, learning_rate=0.1, rng=np.random.default_rng(0)
    )

    assert outcome.train_loss < 0.25 * initial_loss
    assert outcome.train_accuracy == 1.0
    assert outcome.num_examples == 120
    assert outcome.steps == 20 * 12
    assert outcome.epochs_completed == 20.0
    assert all(v.dtype == np.float32 for v in outcome.parameters.values())


def test_proximal_term_matches_hand_computed_steps(setup) -> None:  # type: ignore[no-untyped-def]
    model, params, x, y = setup
    lr, mu = 0.5, 2.0
    # Two full-batch steps: at step 1 w == w_global so the proximal term vanishes; at step 2 it is mu*(w1-w0).
    _, g0 = model.loss_and_grad(params, x, y)
    w1 = {k: params[k] - np.float32(lr) * g0[k] for k in params}
    _, g1 = model.loss_and_grad(w1, x, y)
    prox = {k: w1[k] - np.float32(lr) * (g1[k] + np.float32(mu) * (w1[k] - params[k])) for k in params}
    plain = {k: w1[k] - np.float32(lr) * g1[k] for k in params}

    outcome = sgd_fit(
        model,
        params,
        x,
        y,
        epochs=2,
        batch_size=len(y),
        learning_rate=lr,
        rng=np.random.default_rng(0),
        proximal_mu=mu,
    )

    for k in params:
        np.testing.assert_allclose(outcome.parameters[k], prox[k], rtol=1e-4, atol=1e-5)
    assert l2_norm(subtract(prox, plain)) > 1e-2  # the check above can tell the two apart


def test_proximal_term_pulls_towards_global(setup) -> None:  # type: ignore[no-untyped-def]
    model, params, x, y = setup

    distances = []
    for mu in (0.0, 1.0, 10.0):
        outcome = sgd_fit(
            model,
            params,
            x,
            y,
            epochs=5,
            batch_size=10,
            learning_rate=0.05,
            rng=np.random.default_rng(3),
            proximal_mu=mu,
        )
        distances.append(l2_norm(subtract(outcome.parameters, params)))

    assert distances[0] > distances[1] > distances[2]


def test_max_steps_stops_early_with_fractional_epochs(setup) -> None:  # type: ignore[no-untyped-def]
    model, params, x, y = setup

    outcome = sgd_fit(
        model,
        params,
        x,
        y,
        epochs=5,
        batch_size=10,
        learning_rate=0.1,
        rng=np.random.default_rng(0),
        max_steps=18,
    )
    none = sgd_fit(
        model,
        params,
        x,
        y,
        epochs=5,
        batch_size=10,
        learning_rate=0.1,
        rng=np.random.default_rng(0),
        max_steps=0,
    )

    assert outcome.steps == 18
    assert outcome.epochs_completed == pytest.approx(1.5)
    assert none.steps == 0 and none.epochs_completed == 0.0
    assert all(np.array_equal(none.parameters[k], params[k]) for k in params)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"learning_rate": -1.0},
        {"learning_rate": float("nan")},
        {"proximal_mu": -1.0},
        {"max_steps": -1},
    ],
)
def test_invalid_hyperparameters(setup, kwargs) -> None:  # type: ignore[no-untyped-def]
    model, params, x, y = setup
    arguments = {"epochs": 1, "batch_size": 8, "learning_rate": 0.1, "rng": np.random.default_rng(0)} | kwargs

    with pytest.raises(ConfigError):
        sgd_fit(model, params, x, y, **arguments)


def test_mlp_on_digits_reaches_90_percent() -> None:
    dataset = load_dataset("digits")
    model = build_model(ModelSpec("mlp", 64, 10, (64,)))
    rng = np.random.default_rng(0)

    outcome = sgd_fit(
        model,
        model.init(rng),
        dataset.x_train,
        dataset.y_train,
        epochs=10,
        batch_size=32,
        learning_rate=0.1,
        rng=rng,
    )
    _, test_accuracy = model.evaluate(outcome.parameters, dataset.x_test, dataset.y_test)

    assert test_accuracy > 0.9
