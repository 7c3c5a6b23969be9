"""Multinomial logistic regression: one dense layer ``layer0`` followed by softmax.

Invariants: parameters are ``layer0.weight`` ``(input_dim, num_classes)`` and ``layer0.bias``
``(num_classes,)``; weights start Glorot-uniform, biases at zero.
"""

from __future__ import annotations

from flcore.errors import ConfigError
from flcore.models.dense import DenseSoftmaxClassifier
from flcore.models.spec import ModelSpec

__all__ = ["LogisticRegression"]


class LogisticRegression(DenseSoftmaxClassifier):
    """Softmax (multinomial logistic) regression trained with mean cross-entropy.

    Weights are initialised with Glorot & Bengio (2010) uniform limits; the loss is convex in the
    parameters.
    """

    def __init__(self, spec: ModelSpec) -> None:
        if spec.architecture != "logreg":
            raise ConfigError(f"LogisticRegression needs architecture 'logreg'. Found {spec.architecture!r}.")
        super().__init__(spec)
