"""Local training by minibatch stochastic gradient descent, optionally with the FedProx proximal term.

Invariants: :func:`sgd_fit` never mutates the parameters or data passed to it; all randomness (the
per-epoch shuffles) comes from the ``rng`` argument, so the same inputs and the same generator state give
bit-identical results; the returned parameters are new float32 arrays in the model's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from flcore.errors import ConfigError, FlcoreError
from flcore.models.spec import Model
from flcore.parameters import Parameters

__all__ = ["FitOutcome", "sgd_fit"]


@dataclass
class FitOutcome:
    """Result of local training.

    Parameters
    ----------
    parameters : Parameters
        The trained float32 parameters.
    num_examples : int
        Number of local training examples (the FedAvg weight ``n_k``).
    train_loss : float
        Mean cross-entropy of the trained parameters over all local training examples.
    train_accuracy : float
        Accuracy of the trained parameters over all local training examples.
    steps : int
        Number of SGD steps taken.
    epochs_completed : float
        ``steps / steps_per_epoch``; fractional when ``max_steps`` stopped training early.
    """

    parameters: Parameters
    num_examples: int
    train_loss: float
    train_accuracy: float
    steps: int
    epochs_completed: float


def sgd_fit(
    model: Model,
    params: Parameters,
    x: npt.NDArray[Any],
    y: npt.NDArray[np.integer[Any]],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    rng: np.random.Generator,
    proximal_mu: float = 0.0,
    max_steps: int | None = None,
) -> FitOutcome:
    """Train ``params`` on ``(x, y)`` with minibatch SGD, as in ClientUpdate of FedAvg.

    Implements ClientUpdate of McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", Algorithm 1: ``epochs`` passes over the data in shuffled minibatches of
    ``batch_size`` (the last one may be smaller), each step ``w <- w - lr * grad``. With
    ``proximal_mu > 0`` it solves the FedProx local objective of Li et al. (2020), "Federated Optimization in
    Heterogeneous Networks", eq. 2, ``h(w) = F(w) + mu / 2 * ||w - w_global||^2``, whose gradient adds
    ``mu * (w - w_global)``; ``w_global`` is ``params`` as passed in. ``max_steps`` caps the number of
    steps so that a straggler can return partial work (FedProx's variable local work).

    Parameters
    ----------
    model : Model
        The model.
    params : Parameters
        Starting (global) parameters; not modified.
    x, y : ndarray
        Local training inputs ``(n, input_dim)`` and integer labels ``(n,)``, n >= 1.
    epochs : int
        Number of passes over the data, >= 1.
    batch_size : int
        Minibatch size, >= 1.
    learning_rate : float
        Step size, > 0.
    rng : numpy.random.Generator
        Source of the per-epoch permutations.
    proximal_mu : float
        FedProx coefficient ``mu`` >= 0; 0 gives plain SGD.
    max_steps : int, optional
        Stop after this many steps (>= 0).

    Returns
    -------
    FitOutcome
        New parameters and training statistics.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer. Found {epochs!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer. Found {batch_size!r}.")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ConfigError(f"learning_rate must be positive and finite. Found {learning_rate!r}.")
    if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise ConfigError(f"proximal_mu must be non-negative and finite. Found {proximal_mu!r}.")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise ConfigError(f"max_steps must be a non-negative integer or None. Found {max_steps!r}.")
    n = int(np.shape(x)[0])
    if n == 0:
        raise FlcoreError("Cannot train on an empty data set; expected at least one example.")
    model.parameter_spec().validate(params)

    global_params = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
    weights = {k: v.copy() for k, v in global_params.items()}
    lr = np.float32(learning_rate)
    mu = np.float32(proximal_mu)
    steps_per_epoch = math.ceil(n / batch_size)
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            batch = order[start : start + batch_size]
            _, grads = model.loss_and_grad(weights, x[batch], y[batch])
            for name, w in weights.items():
                g = grads[name]
                if proximal_mu > 0:
                    g = g + mu * (w - global_params[name])
                w -= lr * g
            steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    loss, accuracy = model.evaluate(weights, x, y)
    return FitOutcome(
        parameters=weights,
        num_examples=n,
        train_loss=loss,
        train_accuracy=accuracy,
        steps=steps,
        epochs_completed=steps / steps_per_epoch,
    )
