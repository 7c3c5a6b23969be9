"""Tests for flcore.models: specs, initialisation, and gradients against central finite differences."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flcore.errors import ConfigError, FlcoreError
from flcore.models import PRESETS, LogisticRegression, Model, ModelSpec, MultilayerPerceptron, build_model
from flcore.parameters import Parameters


def numerical_gradient(model: Model, params: Parameters, x: Any, y: Any, eps: float = 1e-6) -> Parameters:
    """Central finite differences of the loss, in float64."""
    grads: Parameters = {}
    for name, array in params.items():
        grad = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            original = array[index]
            array[index] = original + eps
            plus, _ = model.loss_and_grad(params, x, y)
            array[index] = original - eps
            minus, _ = model.loss_and_grad(params, x, y)
            array[index] = original
            grad[index] = (plus - minus) / (2 * eps)
        grads[name] = grad
    return grads


@pytest.mark.parametrize(
    "spec",
    [ModelSpec("logreg", 5, 3), ModelSpec("mlp", 5, 3, (4,)), ModelSpec("mlp", 4, 3, (5, 3))],
    ids=["logreg", "mlp1", "mlp2"],
)
def test_gradient_matches_central_finite_differences(spec: ModelSpec, rng: np.random.Generator) -> None:
    model = build_model(spec)
    params = {k: v.astype(np.float64) for k, v in model.init(rng).items()}
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}  # non-zero biases
    x = rng.standard_normal((7, spec.input_dim))
    y = rng.integers(0, spec.num_classes, size=7)

    loss, grads = model.loss_and_grad(params, x, y)
    expected = numerical_gradient(model, params, x, y)

    assert np.isfinite(loss) and loss > 0
    assert list(grads) == list(params)
    for name in params:
        assert grads[name].shape == params[name].shape
        assert grads[name].dtype == np.float64
        difference = np.linalg.norm(grads[name] - expected[name])
        scale = max(np.linalg.norm(grads[name]) + np.linalg.norm(expected[name]), 1e-12)
        assert difference / scale < 1e-4, name


def test_loss_is_stable_for_huge_logits() -> None:
    model = build_model(ModelSpec("logreg", 2, 3))
    params = {
        "layer0.weight": np.array([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]], np.float32),
        "layer0.bias": np.zeros(3, np.float32),
    }
    x = np.array([[10.0, 0.0]], np.float32)

    loss_right, grads = model.loss_and_grad(params, x, np.array([0]))
    loss_wrong, _ = model.loss_and_grad(params, x, np.array([1]))

    assert loss_right == pytest.approx(0.0, abs=1e-6)
    assert loss_wrong == pytest.approx(2e5, rel=1e-4)
    assert all(np.isfinite(g).all() for g in grads.values())


def test_loss_equals_log_num_classes_at_zero_parameters() -> None:
    model = build_model(ModelSpec("mlp", 3, 4, (2,)))
    params = model.parameter_spec().zeros()

    loss, accuracy = model.evaluate(params, np.ones((5, 3), np.float32), np.array([0, 1, 2, 3, 0]))

    assert loss == pytest.approx(np.log(4), rel=1e-6)
    assert accuracy == pytest.approx(2 / 5)  # argmax of equal logits is class 0


def test_parameter_names_shapes_and_init(rng: np.random.Generator) -> None:
    model = build_model(PRESETS["mnist_2nn"])

    params = model.init(rng)

    assert [(k, v.shape) for k, v in params.items()] == [
        ("layer0.weight", (784, 200)),
        ("layer0.bias", (200,)),
        ("layer1.weight", (200, 200)),
        ("layer1.bias", (200,)),
        ("layer2.weight", (200, 10)),
        ("layer2.bias", (10,)),
    ]
    assert model.parameter_spec().num_parameters == 199_210  # McMahan et al. (2017), 2NN
    assert all(v.dtype == np.float32 for v in params.values())
    assert not params["layer0.bias"].any()
    assert np.abs(params["layer0.weight"]).max() <= np.sqrt(6 / 784)  # He uniform
    assert np.abs(params["layer0.weight"]).max() > 0.9 * np.sqrt(6 / 784)
    assert np.abs(params["layer2.weight"]).max() <= np.sqrt(6 / 210)  # Glorot uniform
    assert isinstance(model, MultilayerPerceptron)
    assert isinstance(build_model(ModelSpec("logreg", 4, 2)), LogisticRegression)


def test_init_is_deterministic_under_rng() -> None:
    model = build_model(ModelSpec("mlp", 6, 3, (4,)))

    a = model.init(np.random.default_rng(1))
    b = model.init(np.random.default_rng(1))
    c = model.init(np.random.default_rng(2))

    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["layer0.weight"], c["layer0.weight"])


def test_predict_and_evaluate_agree(rng: np.random.Generator) -> None:
    model = build_model(ModelSpec("mlp", 6, 3, (4,)))
    params = model.init(rng)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    y = rng.integers(0, 3, 50)

    predictions = model.predict(params, x)
    _, accuracy = model.evaluate(params, x, y)

    assert predictions.dtype == np.int64
    np.testing.assert_array_equal(predictions, model.logits(params, x).argmax(axis=1))
    assert accuracy == pytest.approx(float((predictions == y).mean()))


def test_bad_inputs_are_rejected(rng: np.random.Generator) -> None:
    model = build_model(ModelSpec("logreg", 3, 2))
    params = model.init(rng)

    with pytest.raises(FlcoreError, match=r"\(n, 3\)"):
        model.predict(params, np.zeros((2, 4), np.float32))
    with pytest.raises(FlcoreError, match="Labels"):
        model.loss_and_grad(params, np.zeros((2, 3), np.float32), np.array([0, 2]))
    with pytest.raises(FlcoreError):
        model.loss_and_grad({"layer0.weight": params["layer0.weight"]}, np.zeros((2, 3)), np.array([0, 1]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"architecture": "cnn", "input_dim": 4, "num_classes": 2}, "architecture"),
        ({"architecture": "mlp", "input_dim": 4, "num_classes": 2}, "hidden size"),
        ({"architecture": "logreg", "input_dim": 4, "num_classes": 2, "hidden_sizes": [3]}, "no hidden"),
        ({"architecture": "mlp", "input_dim": 0, "num_classes": 2, "hidden_sizes": [3]}, "input_dim"),
        ({"architecture": "mlp", "input_dim": 4, "num_classes": 2, "hidden_sizes": [-3]}, "hidden size"),
        ({"architecture": "logreg", "input_dim": 4, "num_classes": 1}, "num_classes"),
        ({"architecture": "logreg", "input_dim": 4.5, "num_classes": 2}, "input_dim"),
        ({"architecture": "logreg", "input_dim": 4}, "missing"),
        ({"architecture": "logreg", "input_dim": 4, "num_classes": 2, "depth": 3}, "unknown"),
    ],
)
def test_model_spec_validation(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelSpec.from_json(data)


def test_model_spec_json_round_trip() -> None:
    spec = ModelSpec("mlp", 784, 10, (200, 200))

    assert ModelSpec.from_json(spec.to_json()) == spec
    assert spec.to_json() == {
        "architecture": "mlp",
        "input_dim": 784,
        "num_classes": 10,
        "hidden_sizes": [200, 200],
    }
    assert spec.parameter_spec() == build_model(spec).parameter_spec()
