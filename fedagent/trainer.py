"""The local-training interface of an agent, and its implementation for flcore's model zoo.

A :class:`Trainer` holds one model's parameters and knows how to train and evaluate them on the agent's
private data. The :class:`~fedagent.client.FederatedClient` drives it: ``set_parameters`` (the downloaded
global model), ``evaluate`` (federated evaluation on the held-out split), ``fit``, ``get_parameters``
(from which it computes the delta it uploads). Bring your own subclass for a custom model (a task whose
``model.spec`` is null); :class:`ZooTrainer` covers the zoo's ``logreg`` and ``mlp``.

Invariants: parameters cross this interface as :data:`flcore.parameters.Parameters` (float32, in the
model's order); every source of randomness is the ``rng`` passed to :meth:`Trainer.fit`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from flcore.errors import ConfigError
from flcore.models import ModelSpec, build_model
from flcore.parameters import Parameters
from flcore.training import sgd_fit

#: Keys of a task's ``config`` that :class:`FitConfig` understands; any other key goes to ``extra``.
FIT_CONFIG_KEYS = ("local_epochs", "batch_size", "learning_rate", "seed", "proximal_mu", "max_steps")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class FitConfig:
    """How to train locally for one task, from the task's ``config`` object.

    Parameters
    ----------
    local_epochs : int
        Passes over the local training data (at least 1).
    batch_size : int
        Minibatch size (at least 1).
    learning_rate : float
        SGD step size (finite, positive).
    seed : int
        The server's seed for this task (0 <= seed < 2**63); the agent mixes in its own id.
    proximal_mu : float
        FedProx's proximal coefficient mu (Li et al. 2020, eq. 2); 0 gives plain FedAvg local SGD.
    max_steps : int or None
        Stop after this many minibatch steps even if epochs remain (at least 1), or None for no cap.
    extra : dict
        Keys of the task config that are not listed above, for custom trainers.
    """

    local_epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    proximal_mu: float = 0.0
    max_steps: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not _is_int(self.local_epochs) or self.local_epochs < 1:
            raise ConfigError(f"local_epochs must be an integer of at least 1. Found {self.local_epochs!r}.")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer of at least 1. Found {self.batch_size!r}.")
        if (
            not _is_number(self.learning_rate)
            or not math.isfinite(self.learning_rate)
            or self.learning_rate <= 0
        ):
            raise ConfigError(f"learning_rate must be a finite number above 0. Found {self.learning_rate!r}.")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63). Found {self.seed!r}.")
        if not _is_number(self.proximal_mu) or not math.isfinite(self.proximal_mu) or self.proximal_mu < 0:
            raise ConfigError(
                f"proximal_mu must be a finite number of at least 0. Found {self.proximal_mu!r}."
            )
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise ConfigError(
                f"max_steps must be null or an integer of at least 1. Found {self.max_steps!r}."
            )
        # Normalise JSON integers such as ``"learning_rate": 1`` to float.
        object.__setattr__(self, "learning_rate", float(self.learning_rate))
        object.__setattr__(self, "proximal_mu", float(self.proximal_mu))

    @classmethod
    def from_json(cls, config: Any) -> FitConfig:
        """Build and validate from a task's ``config`` object.

        ``local_epochs``, ``batch_size``, ``learning_rate`` and ``seed`` are required; ``proximal_mu``
        defaults to 0 and ``max_steps`` to null; other keys are kept in :attr:`extra`.

        Raises
        ------
        ConfigError
            If ``config`` is not an object, a required key is missing or a value is invalid.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"A task config must be a JSON object. Found {type(config).__name__}.")
        missing = [
            key for key in ("local_epochs", "batch_size", "learning_rate", "seed") if key not in config
        ]
        if missing:
            raise ConfigError(f"The task config is missing {missing}.")
        return cls(
            local_epochs=config["local_epochs"],
            batch_size=config["batch_size"],
            learning_rate=config["learning_rate"],
            seed=config["seed"],
            # null means "the default", as for max_steps.
            proximal_mu=0.0 if config.get("proximal_mu") is None else config["proximal_mu"],
            max_steps=config.get("max_steps"),
            extra={key: value for key, value in config.items() if key not in FIT_CONFIG_KEYS},
        )


@dataclass(frozen=True)
class FitResult:
    """What local training reports.

    Attributes
    ----------
    num_examples : int
        Training examples used (the weight of this update in FedAvg).
    metrics : dict
        At least ``train_loss``, ``train_accuracy``, ``local_steps`` and ``epochs_completed`` for the zoo;
        a custom trainer reports what it can.
    """

    num_examples: int
    metrics: dict[str, float | int]


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of the current parameters on some examples.

    Attributes
    ----------
    loss : float
        Mean cross-entropy.
    accuracy : float
        Fraction of correct predictions, in [0, 1].
    num_examples : int
        How many examples were evaluated.
    """

    loss: float
    accuracy: float
    num_examples: int


class Trainer(abc.ABC):
    """Local training of one model on an agent's private data.

    Subclass it for a custom model and pass a factory to :class:`~fedagent.client.FederatedClient`.
    """

    @abc.abstractmethod
    def get_parameters(self) -> Parameters:
        """Return the current parameters (float32, same names and shapes as the global model)."""

    @abc.abstractmethod
    def set_parameters(self, parameters: Parameters) -> None:
        """Replace the current parameters (the client passes the downloaded global model)."""

    @abc.abstractmethod
    def fit(
        self,
        x: npt.NDArray[Any],
        y: npt.NDArray[np.integer[Any]],
        config: FitConfig,
        rng: np.random.Generator,
    ) -> FitResult:
        """Train the current parameters on ``(x, y)`` as ``config`` says, drawing randomness from ``rng``."""

    @abc.abstractmethod
    def evaluate(self, x: npt.NDArray[Any], y: npt.NDArray[np.integer[Any]]) -> EvalResult:
        """Evaluate the current parameters on ``(x, y)``."""


class ZooTrainer(Trainer):
    """A :class:`Trainer` for flcore's zoo models, trained by minibatch SGD (:func:`flcore.training.sgd_fit`).

    Parameters
    ----------
    model_spec : ModelSpec or dict
        The model, or its JSON form as found in ``task.model.spec``.
    rng : numpy.random.Generator, optional
        Draws the initial parameters, used until :meth:`set_parameters` is called (default seed 0).

    Notes
    -----
    With ``proximal_mu > 0`` the local objective is FedProx's (Li et al. 2020, eq. 2): the proximal term
    pulls towards the parameters held when :meth:`fit` starts, i.e. the global model.
    """

    def __init__(
        self, model_spec: ModelSpec | Mapping[str, Any], *, rng: np.random.Generator | None = None
    ) -> None:
        self.model_spec = (
            model_spec if isinstance(model_spec, ModelSpec) else ModelSpec.from_json(dict(model_spec))
        )
        self.model = build_model(self.model_spec)
        self._parameters: Parameters = self.model.init(rng if rng is not None else np.random.default_rng(0))

    def get_parameters(self) -> Parameters:
        """Return a copy of the current parameters."""
        return {name: array.copy() for name, array in self._parameters.items()}

    def set_parameters(self, parameters: Parameters) -> None:
        """Replace the current parameters with a float32 copy, checking names and shapes.

        Raises
        ------
        ConfigError
            If a tensor is missing, unexpected or of the wrong shape.
        """
        expected = self.model_spec.parameter_spec()
        if list(parameters) != list(expected.names):
            raise ConfigError(
                f"The parameters have tensors {list(parameters)}; the model expects {list(expected.names)}."
            )
        for name in expected.names:
            want = expected.shape_of(name)
            if tuple(parameters[name].shape) != want:
                raise ConfigError(
                    f"Tensor {name!r} has shape {tuple(parameters[name].shape)}; the model expects {want}."
                )
        self._parameters = {name: np.array(array, dtype=np.float32) for name, array in parameters.items()}

    def fit(
        self,
        x: npt.NDArray[Any],
        y: npt.NDArray[np.integer[Any]],
        config: FitConfig,
        rng: np.random.Generator,
    ) -> FitResult:
        """Run local SGD from the current parameters and keep the result."""
        outcome = sgd_fit(
            self.model,
            self._parameters,
            x,
            y,
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            rng=rng,
            proximal_mu=config.proximal_mu,
            max_steps=config.max_steps,
        )
        self._parameters = outcome.parameters
        return FitResult(
            num_examples=int(outcome.num_examples),
            metrics={
                "train_loss": float(outcome.train_loss),
                "train_accuracy": float(outcome.train_accuracy),
                "local_steps": int(outcome.steps),
                "epochs_completed": float(outcome.epochs_completed),
            },
        )

    def evaluate(self, x: npt.NDArray[Any], y: npt.NDArray[np.integer[Any]]) -> EvalResult:
        """Mean cross-entropy and accuracy of the current parameters on ``(x, y)``."""
        loss, accuracy = self.model.evaluate(self._parameters, x, y)
        return EvalResult(loss=float(loss), accuracy=float(accuracy), num_examples=len(y))
