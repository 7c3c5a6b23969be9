"""FitConfig validation and ZooTrainer training."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedagent.tests.conftest import DIGITS_SPEC
from fedagent.trainer import FitConfig, ZooTrainer
from flcore.errors import ConfigError
from flcore.parameters import l2_norm, subtract

VALID: dict[str, Any] = {
    "local_epochs": 2,
    "batch_size": 32,
    "learning_rate": 0.1,
    "seed": 123,
    "proximal_mu": 0.0,
    "max_steps": None,
}


def test_fit_config_from_task_config() -> None:
    config = FitConfig.from_json({**VALID, "learning_rate": 1, "proximal_mu": None, "dp_clip": 1.0})

    assert config.local_epochs == 2
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.proximal_mu == 0.0
    assert config.max_steps is None
    assert config.extra == {"dp_clip": 1.0}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("local_epochs", 0),
        ("local_epochs", 1.5),
        ("local_epochs", True),
        ("local_epochs", "1"),
        ("batch_size", 0),
        ("batch_size", -3),
        ("learning_rate", 0),
        ("learning_rate", -0.1),
        ("learning_rate", math.nan),
        ("learning_rate", math.inf),
        ("learning_rate", "0.1"),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", 1.0),
        ("proximal_mu", -0.01),
        ("proximal_mu", math.nan),
        ("max_steps", 0),
        ("max_steps", 2.0),
    ],
)
def test_fit_config_rejects_bad_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        FitConfig.from_json({**VALID, key: value})


@pytest.mark.parametrize("missing", ["local_epochs", "batch_size", "learning_rate", "seed"])
def test_fit_config_requires_keys(missing: str) -> None:
    config = {k: v for k, v in VALID.items() if k != missing}
    with pytest.raises(ConfigError, match=missing):
        FitConfig.from_json(config)


def test_fit_config_rejects_non_objects() -> None:
    with pytest.raises(ConfigError):
        FitConfig.from_json([1, 2])


def test_zoo_trainer_fit_decreases_loss(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    trainer = ZooTrainer(DIGITS_SPEC)
    before = trainer.evaluate(x, y)

    result = trainer.fit(x, y, FitConfig.from_json({**VALID, "local_epochs": 3}), np.random.default_rng(0))
    after = trainer.evaluate(x, y)

    assert after.loss < before.loss - 0.1
    assert after.accuracy > before.accuracy
    assert result.num_examples == len(y)
    assert result.metrics["local_steps"] == 3 * math.ceil(len(y) / 32)
    assert set(result.metrics) >= {"train_loss", "train_accuracy", "local_steps", "epochs_completed"}


def _trained(seed: int, x: np.ndarray, y: np.ndarray, **config: Any) -> dict[str, np.ndarray]:
    trainer = ZooTrainer(DIGITS_SPEC, rng=np.random.default_rng(1))
    trainer.fit(x, y, FitConfig.from_json({**VALID, **config}), np.random.default_rng(seed))
    return trainer.get_parameters()


def test_zoo_trainer_is_deterministic_per_seed(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    first, again, other = _trained(5, x, y), _trained(5, x, y), _trained(6, x, y)

    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert any(not np.array_equal(first[name], other[name]) for name in first)


def test_zoo_trainer_honours_max_steps(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    trainer = ZooTrainer(DIGITS_SPEC)
    result = trainer.fit(x, y, FitConfig.from_json({**VALID, "max_steps": 3}), np.random.default_rng(0))

    assert result.metrics["local_steps"] == 3


def test_zoo_trainer_honours_proximal_mu(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    start = ZooTrainer(DIGITS_SPEC, rng=np.random.default_rng(1)).get_parameters()
    free = _trained(5, x, y, local_epochs=3, learning_rate=0.5)
    pulled = _trained(5, x, y, local_epochs=3, learning_rate=0.5, proximal_mu=1.0)

    # FedProx's proximal term keeps the local model closer to where it started.
    assert l2_norm(subtract(pulled, start)) < 0.9 * l2_norm(subtract(free, start))


def test_set_and_get_parameters_copy(global_params: dict[str, np.ndarray]) -> None:
    trainer = ZooTrainer(DIGITS_SPEC)
    trainer.set_parameters(global_params)
    got = trainer.get_parameters()
    got["layer0.bias"][:] = 99.0

    np.testing.assert_array_equal(trainer.get_parameters()["layer0.weight"], global_params["layer0.weight"])
    assert not np.any(trainer.get_parameters()["layer0.bias"] == 99.0)


def test_set_parameters_rejects_wrong_shapes(global_params: dict[str, np.ndarray]) -> None:
    trainer = ZooTrainer(DIGITS_SPEC)
    bad = dict(global_params, **{"layer0.bias": np.zeros(3, dtype=np.float32)})
    with pytest.raises(ConfigError, match=r"layer0\.bias"):
        trainer.set_parameters(bad)
