"""Server-side (centralised) evaluation of a global model on a public test split.

Only for public benchmark data sets the server may hold (digits, MNIST); private data never leaves the
agents, whose held-out evaluation arrives with every update (federated evaluation).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from flcore.data import Dataset, load_dataset
from flcore.models import ModelSpec, build_model
from flcore.parameters import Parameters


@functools.lru_cache(maxsize=4)
def _dataset(name: str) -> Dataset:
    return load_dataset(name, mnist_path=os.environ.get("MNIST_PATH") or None)


def evaluate_on_dataset(
    model_spec: dict[str, Any], parameters: Parameters, dataset: str
) -> tuple[float, float]:
    """Return ``(loss, accuracy)`` of the model on the named data set's test split."""
    data = _dataset(dataset)
    model = build_model(ModelSpec.from_json(model_spec))
    loss, accuracy = model.evaluate(parameters, data.x_test, data.y_test)
    return float(loss), float(accuracy)
