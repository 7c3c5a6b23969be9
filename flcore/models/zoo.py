"""Model construction from a :class:`ModelSpec`, and named reference architectures.

Invariants: :func:`build_model` is the only place that maps an architecture name to a class; the presets
are immutable specs.
"""

from __future__ import annotations

from flcore.errors import ConfigError
from flcore.models.logreg import LogisticRegression
from flcore.models.mlp import MultilayerPerceptron
from flcore.models.spec import Model, ModelSpec

__all__ = ["PRESETS", "build_model"]

PRESETS: dict[str, ModelSpec] = {
    # McMahan et al. (2017), section 3: "2NN", two hidden layers of 200 ReLU units on MNIST (199,210 params).
    "mnist_2nn": ModelSpec("mlp", 784, 10, (200, 200)),
    "mnist_logreg": ModelSpec("logreg", 784, 10),
    "digits_mlp": ModelSpec("mlp", 64, 10, (64,)),
    "digits_logreg": ModelSpec("logreg", 64, 10),
}
"""Named reference architectures."""


def build_model(spec: ModelSpec) -> Model:
    """Return the model described by ``spec``.

    Raises
    ------
    ConfigError
        If the architecture is unknown.
    """
    if spec.architecture == "logreg":
        return LogisticRegression(spec)
    if spec.architecture == "mlp":
        return MultilayerPerceptron(spec)
    raise ConfigError(f"Unknown architecture {spec.architecture!r}; expected 'logreg' or 'mlp'.")
