"""Fixtures of the SDK tests: a fake protocol server and a small slice of the digits data set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from fedagent.tests.fake_server import FakeAgentServer
from flcore.data import load_digits
from flcore.models import ModelSpec, build_model
from flcore.parameters import Parameters

DIGITS_SPEC: dict[str, Any] = {
    "architecture": "mlp",
    "input_dim": 64,
    "num_classes": 10,
    "hidden_sizes": [16],
}


@pytest.fixture
def fake_server() -> Iterator[FakeAgentServer]:
    server = FakeAgentServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    x, y = load_digits()
    return x[:400], y[:400]


@pytest.fixture
def global_params() -> Parameters:
    return build_model(ModelSpec.from_json(DIGITS_SPEC)).init(np.random.default_rng(7))
