"""Model specifications and the interface every model implements.

Invariants: a :class:`ModelSpec` is immutable and valid once constructed (architecture known, positive
sizes, hidden layers only for ``"mlp"``); it fully determines the model's :class:`ParameterSpec`, whose
tensors are ``layer{i}.weight`` of shape ``(in, out)`` followed by ``layer{i}.bias`` of shape ``(out,)``
for ``i = 0, 1, ...``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from flcore.errors import ConfigError
from flcore.parameters import Parameters, ParameterSpec, TensorSpec

__all__ = ["ARCHITECTURES", "Model", "ModelSpec"]

ARCHITECTURES = ("logreg", "mlp")


def _positive_int(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{field} must be a positive integer. Found {value!r}.")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and sizes of a dense softmax classifier.

    Parameters
    ----------
    architecture : {"logreg", "mlp"}
        Multinomial logistic regression (one layer) or a ReLU multilayer perceptron.
    input_dim : int
        Number of input features.
    num_classes : int
        Number of output classes (at least 2).
    hidden_sizes : tuple of int
        Widths of the hidden layers; empty for ``"logreg"``, at least one for ``"mlp"``.

    Examples
    --------
    The 2NN of McMahan et al. (2017) is ``ModelSpec("mlp", 784, 10, (200, 200))``.
    """

    architecture: str
    input_dim: int
    num_classes: int
    hidden_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"architecture must be one of {list(ARCHITECTURES)}. Found {self.architecture!r}."
            )
        _positive_int(self.input_dim, "input_dim")
        _positive_int(self.num_classes, "num_classes")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2. Found {self.num_classes}.")
        if not isinstance(self.hidden_sizes, tuple):
            raise ConfigError(
                f"hidden_sizes must be a tuple of positive integers. Found {self.hidden_sizes!r}."
            )
        for size in self.hidden_sizes:
            _positive_int(size, "Every hidden size")
        if self.architecture == "mlp" and not self.hidden_sizes:
            raise ConfigError("An 'mlp' needs at least one hidden size, e.g. hidden_sizes=(64,). Found none.")
        if self.architecture == "logreg" and self.hidden_sizes:
            raise ConfigError(
                f"A 'logreg' model has no hidden layers. Found hidden_sizes={self.hidden_sizes}."
            )

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """Widths from input to output, e.g. ``(784, 200, 200, 10)``."""
        return (self.input_dim, *self.hidden_sizes, self.num_classes)

    def parameter_spec(self) -> ParameterSpec:
        """Return the names and shapes of this model's parameters."""
        sizes = self.layer_sizes
        tensors: list[TensorSpec] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            tensors.append(TensorSpec(f"layer{i}.weight", (fan_in, fan_out)))
            tensors.append(TensorSpec(f"layer{i}.bias", (fan_out,)))
        return ParameterSpec(tuple(tensors))

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "architecture": self.architecture,
            "input_dim": self.input_dim,
            "num_classes": self.num_classes,
            "hidden_sizes": list(self.hidden_sizes),
        }

    @classmethod
    def from_json(cls, data: Any) -> ModelSpec:
        """Build and validate a spec from the output of :meth:`to_json`.

        Raises
        ------
        ConfigError
            If keys are missing or unknown, or a value is invalid.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"A model spec must be a JSON object. Found {type(data).__name__}.")
        allowed = {"architecture", "input_dim", "num_classes", "hidden_sizes"}
        missing = sorted({"architecture", "input_dim", "num_classes"} - set(data))
        unknown = sorted(set(data) - allowed)
        if missing:
            raise ConfigError(f"The model spec is missing {missing}.")
        if unknown:
            raise ConfigError(
                f"The model spec has unknown key(s) {unknown}; expected only {sorted(allowed)}."
            )
        hidden = data.get("hidden_sizes", [])
        if not isinstance(hidden, list | tuple):
            raise ConfigError(f"hidden_sizes must be a list of positive integers. Found {hidden!r}.")
        return cls(data["architecture"], data["input_dim"], data["num_classes"], tuple(hidden))


class Model(Protocol):
    """A differentiable classifier over float parameters (see :func:`flcore.models.build_model`)."""

    @property
    def spec(self) -> ModelSpec:
        """The model's specification."""
        ...

    def parameter_spec(self) -> ParameterSpec:
        """Names and shapes of the parameters."""
        ...

    def init(self, rng: np.random.Generator) -> Parameters:
        """Draw initial float32 parameters."""
        ...

    def logits(self, params: Parameters, x: npt.NDArray[Any]) -> npt.NDArray[np.floating[Any]]:
        """Unnormalised class scores of shape ``(n, num_classes)``."""
        ...

    def forward(self, params: Parameters, x: npt.NDArray[Any]) -> npt.NDArray[np.floating[Any]]:
        """Alias of :meth:`logits`."""
        ...

    def loss_and_grad(
        self, params: Parameters, x: npt.NDArray[Any], y: npt.NDArray[np.integer[Any]]
    ) -> tuple[float, Parameters]:
        """Mean softmax cross-entropy and its gradient with respect to every parameter."""
        ...

    def predict(self, params: Parameters, x: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """Predicted class indices."""
        ...

    def evaluate(
        self, params: Parameters, x: npt.NDArray[Any], y: npt.NDArray[np.integer[Any]]
    ) -> tuple[float, float]:
        """Mean cross-entropy loss and accuracy."""
        ...
