"""Clipping: norms are bounded, short updates unchanged, per-layer budgets add up in quadrature."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flcore.dp.clipping import (
    clip_by_l1_norm,
    clip_by_l2_norm,
    clip_per_layer,
    per_layer_clip_norms,
    per_layer_sensitivity,
)
from flcore.errors import FlcoreError
from flcore.parameters import Parameters, ParameterSpec, l2_norm


def test_clip_bounds_the_l2_norm_over_all_tensors(params: Parameters) -> None:
    norm = l2_norm(params)
    clipped, original, factor = clip_by_l2_norm(params, norm / 3)

    assert original == pytest.approx(norm, rel=1e-12)
    assert factor == pytest.approx(1 / 3, rel=1e-6)
    assert l2_norm(clipped) <= norm / 3  # strictly within the bound, float32 rounding included
    assert l2_norm(clipped) == pytest.approx(norm / 3, rel=1e-6)
    assert list(clipped) == list(params) and all(a.dtype == np.float32 for a in clipped.values())
    for name in params:  # the direction is kept
        np.testing.assert_allclose(clipped[name], params[name] * factor, rtol=1e-6)


def test_clip_leaves_short_updates_unchanged_and_inputs_untouched(params: Parameters) -> None:
    before = {k: v.copy() for k, v in params.items()}
    clipped, _, factor = clip_by_l2_norm(params, l2_norm(params) * 2)

    assert factor == 1.0
    for name in params:
        np.testing.assert_array_equal(clipped[name], params[name])
        np.testing.assert_array_equal(params[name], before[name])
        assert clipped[name] is not params[name]


@pytest.mark.parametrize("seed", range(20))
def test_clipped_float32_norm_never_exceeds_the_bound(seed: int) -> None:
    rng = np.random.default_rng(seed)
    update = {"w": (rng.standard_normal(10_000) * 10 ** rng.uniform(-3, 3)).astype(np.float32)}
    bound = float(rng.uniform(0.01, 1.0)) * l2_norm(update)
    clipped, _, _ = clip_by_l2_norm(update, bound)
    assert l2_norm(clipped) <= bound


def test_clip_by_l1_norm_bounds_the_l1_norm(params: Parameters) -> None:
    l1 = sum(float(np.abs(a.astype(np.float64)).sum()) for a in params.values())
    clipped, original, _ = clip_by_l1_norm(params, 1.0)
    assert original == pytest.approx(l1)
    assert sum(float(np.abs(a.astype(np.float64)).sum()) for a in clipped.values()) <= 1.0


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_clip_rejects_a_bad_bound(params: Parameters, bad: float) -> None:
    with pytest.raises(FlcoreError, match="clip_norm"):
        clip_by_l2_norm(params, bad)


def test_clip_rejects_non_finite_updates() -> None:
    with pytest.raises(FlcoreError, match="NaN or Inf"):
        clip_by_l2_norm({"w": np.array([1.0, np.nan], dtype=np.float32)}, 1.0)


def test_per_layer_clipping_bounds_each_layer_and_the_total(params: Parameters) -> None:
    bounds = per_layer_clip_norms(params, 0.5)
    clipped, norms, factors = clip_per_layer(params, bounds)

    for name in params:
        assert l2_norm({name: clipped[name]}) <= bounds[name]
        assert norms[name] == pytest.approx(l2_norm({name: params[name]}))
        assert 0 < factors[name] <= 1
    assert per_layer_sensitivity(bounds) == pytest.approx(0.5)
    assert l2_norm(clipped) <= per_layer_sensitivity(bounds)


@pytest.mark.parametrize("split", ["equal", "sqrt_size"])
def test_per_layer_split_has_the_total_sensitivity(split: str) -> None:
    spec = ParameterSpec.from_parameters(
        {"a": np.zeros((30, 10), np.float32), "b": np.zeros(10, np.float32), "c": np.zeros(5, np.float32)}
    )
    bounds = per_layer_clip_norms(spec, 2.0, split=split)  # type: ignore[arg-type]

    assert list(bounds) == ["a", "b", "c"]
    assert math.sqrt(sum(c**2 for c in bounds.values())) == pytest.approx(2.0, rel=1e-12)
    if split == "equal":
        assert bounds["a"] == pytest.approx(2.0 / math.sqrt(3))
    else:  # c_l = C sqrt(n_l / n): 300, 10 and 5 of 315 values
        assert bounds["a"] == pytest.approx(2.0 * math.sqrt(300 / 315))
        assert bounds["c"] == pytest.approx(2.0 * math.sqrt(5 / 315))


def test_per_layer_clipping_needs_a_bound_per_tensor(params: Parameters) -> None:
    with pytest.raises(FlcoreError, match="exactly"):
        clip_per_layer(params, {"layer1.weight": 1.0})
