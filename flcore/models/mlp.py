"""Multilayer perceptron with ReLU hidden layers and a softmax head.

Invariants: layer ``i`` has ``layer{i}.weight`` ``(in, out)`` and ``layer{i}.bias`` ``(out,)``; hidden layers
start He-uniform and the output layer Glorot-uniform; biases start at zero.
"""

from __future__ import annotations

import math

from flcore.errors import ConfigError
from flcore.models.dense import DenseSoftmaxClassifier
from flcore.models.spec import ModelSpec

__all__ = ["MultilayerPerceptron"]


class MultilayerPerceptron(DenseSoftmaxClassifier):
    """ReLU multilayer perceptron.

    The 2NN of McMahan et al. (2017) is ``MultilayerPerceptron(ModelSpec("mlp", 784, 10, (200, 200)))``.
    """

    def __init__(self, spec: ModelSpec) -> None:
        if spec.architecture != "mlp":
            raise ConfigError(f"MultilayerPerceptron needs architecture 'mlp'. Found {spec.architecture!r}.")
        super().__init__(spec)

    def _init_limit(self, layer: int, fan_in: int, fan_out: int) -> float:
        if layer < self._num_layers - 1:
            # He et al. (2015), "Delving Deep into Rectifiers", eq. 10: Var[w] = 2 / fan_in for ReLU inputs,
            # i.e. U[-sqrt(6 / fan_in), +sqrt(6 / fan_in)].
            return math.sqrt(6.0 / fan_in)
        return super()._init_limit(layer, fan_in, fan_out)
