"""Shared fixtures for flcore tests (pure numpy; no database)."""

from __future__ import annotations

import numpy as np
import pytest

from flcore.parameters import Parameters


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def params(rng: np.random.Generator) -> Parameters:
    """Three tensors whose names are NOT in sorted order, to catch order loss."""
    return {
        "layer1.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "layer0.weight": rng.standard_normal((5, 4)).astype(np.float32),
        "layer0.bias": rng.standard_normal(4).astype(np.float32),
    }
