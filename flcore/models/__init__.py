"""Dense softmax classifiers: specifications, implementations and :func:`build_model`.

Invariants: models are stateless and never mutate the parameters passed to them; parameter names are
``layer{i}.weight`` ``(in, out)`` and ``layer{i}.bias`` ``(out,)``.
"""

from flcore.models.dense import DenseSoftmaxClassifier
from flcore.models.logreg import LogisticRegression
from flcore.models.mlp import MultilayerPerceptron
from flcore.models.spec import ARCHITECTURES, Model, ModelSpec
from flcore.models.zoo import PRESETS, build_model

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "DenseSoftmaxClassifier",
    "LogisticRegression",
    "Model",
    "ModelSpec",
    "MultilayerPerceptron",
    "build_model",
]
