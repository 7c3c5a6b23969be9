"""Tests for flcore.data_synthetic: Synthetic(alpha, beta) of Li et al. (2020) / Shamir et al. (2014)."""

from __future__ import annotations

import numpy as np
import pytest

from flcore.data_synthetic import (
    SYNTHETIC_DIMENSION,
    SYNTHETIC_NUM_CLASSES,
    SYNTHETIC_NUM_DEVICES,
    synthetic_covariance_diagonal,
    synthetic_device_sizes,
    synthetic_federation,
    synthetic_labels,
)
from flcore.errors import ConfigError


def test_shapes_dtypes_and_default_sizes() -> None:
    # Prepare / Execute
    federation = synthetic_federation(1.0, 1.0, np.random.default_rng(0))

    # Assert
    assert federation.name == "synthetic(1,1)"
    assert len(federation.devices) == SYNTHETIC_NUM_DEVICES == 30
    assert (federation.dimension, federation.num_classes) == (60, 10)
    for device in federation.devices:
        n = device.num_examples
        assert n >= 50
        assert device.x_train.dtype == device.x_test.dtype == np.float32
        assert device.y_train.dtype == device.y_test.dtype == np.int64
        assert device.x_train.shape == (device.y_train.shape[0], SYNTHETIC_DIMENSION)
        assert device.x_test.shape == (device.y_test.shape[0], SYNTHETIC_DIMENSION)
        assert device.y_train.shape[0] == int(0.8 * n)  # 80/20 per device
        assert device.weight.shape == (SYNTHETIC_DIMENSION, SYNTHETIC_NUM_CLASSES)
        assert device.bias.shape == (SYNTHETIC_NUM_CLASSES,)
        assert device.input_mean.shape == (SYNTHETIC_DIMENSION,)
        labels = np.concatenate([device.y_train, device.y_test])
        assert labels.min() >= 0 and labels.max() < SYNTHETIC_NUM_CLASSES
    x_test, y_test = federation.test_union()
    assert x_test.shape == (y_test.shape[0], 60)
    assert y_test.shape[0] == sum(d.y_test.shape[0] for d in federation.devices)


def test_same_seed_same_data_and_other_seed_other_data() -> None:
    # Prepare / Execute
    first = synthetic_federation(0.5, 0.5, np.random.default_rng(7))
    second = synthetic_federation(0.5, 0.5, np.random.default_rng(7))
    other = synthetic_federation(0.5, 0.5, np.random.default_rng(8))

    # Assert
    for a, b in zip(first.devices, second.devices, strict=True):
        assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_train, b.y_train)
        assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_test, b.y_test)
        assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    assert not np.array_equal(first.devices[0].weight, other.devices[0].weight)


def test_labels_are_the_argmax_of_the_device_model_on_the_stored_inputs() -> None:
    # Prepare
    federation = synthetic_federation(1.0, 1.0, np.random.default_rng(1))

    for device in federation.devices:
        for x, y in ((device.x_train, device.y_train), (device.x_test, device.y_test)):
            # Execute: brute force with an explicit softmax in float64
            logits = x.astype(np.float64) @ device.weight + device.bias
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=1, keepdims=True)

            # Assert
            assert np.array_equal(y, probabilities.argmax(axis=1))
            assert np.array_equal(y, synthetic_labels(x, device.weight, device.bias))


def test_covariance_diagonal_decays_as_j_to_the_minus_1_2() -> None:
    diagonal = synthetic_covariance_diagonal(60)

    assert diagonal.shape == (60,)
    assert diagonal[0] == 1.0
    np.testing.assert_allclose(diagonal, np.arange(1, 61, dtype=np.float64) ** -1.2, rtol=0, atol=0)
    np.testing.assert_allclose(diagonal[1:] / diagonal[:-1], (np.arange(1, 60) / np.arange(2, 61)) ** 1.2)


def test_inputs_have_the_diagonal_power_law_covariance_around_the_device_mean() -> None:
    # Prepare: one large device, so the sample covariance is precise
    federation = synthetic_federation(
        1.0, 1.0, np.random.default_rng(3), num_devices=1, device_sizes=[40_000], test_fraction=0.0
    )
    device = federation.devices[0]
    x = device.x_train.astype(np.float64)

    # Execute
    covariance = np.cov(x, rowvar=False)
    expected = synthetic_covariance_diagonal(60)

    # Assert: variances within sampling error (relative sd sqrt(2 / n) ~ 0.7%), off-diagonals near zero,
    # and the mean is v_k (the standard error of coordinate j is sqrt(j^-1.2 / n)).
    np.testing.assert_allclose(np.diag(covariance), expected, rtol=0.04)
    off_diagonal = covariance / np.sqrt(np.outer(expected, expected)) - np.eye(60)
    assert np.abs(off_diagonal).max() < 0.04
    np.testing.assert_allclose(x.mean(axis=0), device.input_mean, atol=5 * np.sqrt(1 / 40_000))


def test_heterogeneity_parameters_control_how_far_device_means_spread() -> None:
    # beta = 0: every v_k ~ N(0, 1); large beta: the per-device centres B_k spread the means apart.
    rng_sizes = [60] * 30
    tight = synthetic_federation(0.0, 0.0, np.random.default_rng(4), device_sizes=rng_sizes)
    wide = synthetic_federation(0.0, 10.0, np.random.default_rng(4), device_sizes=rng_sizes)

    spread_tight = np.std([d.input_mean.mean() for d in tight.devices])
    spread_wide = np.std([d.input_mean.mean() for d in wide.devices])
    assert spread_tight < 0.5 < 5.0 < spread_wide


def test_device_sizes_are_lognormal_4_2_plus_50() -> None:
    sizes = synthetic_device_sizes(100_000, np.random.default_rng(5))

    assert sizes.dtype == np.int64 and sizes.min() >= 50
    # log(n - 50 + U) ~ N(4, 2) up to the floor: the median of n - 50 is e^4 ~ 54.6.
    assert abs(np.median(sizes - 50) - np.exp(4.0)) < 2.0
    np.testing.assert_allclose(np.std(np.log(sizes - 50 + 0.5)), 2.0, rtol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"beta": float("nan")}, "beta"),
        ({"num_devices": 0}, "num_devices"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"device_sizes": [10, 10]}, "device_sizes"),
        ({"num_devices": 2, "device_sizes": [1, 10]}, "at least 2"),
    ],
)
def test_invalid_arguments_raise_config_error_naming_the_value(
    kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"alpha": 1.0, "beta": 1.0, **kwargs}
    alpha, beta = arguments.pop("alpha"), arguments.pop("beta")

    with pytest.raises(ConfigError, match=message):
        synthetic_federation(alpha, beta, np.random.default_rng(0), **arguments)  # type: ignore[arg-type]
