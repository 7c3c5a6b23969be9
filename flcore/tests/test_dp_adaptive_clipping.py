"""Adaptive quantile clipping (Andrew et al. 2021): one step and the corrected multiplier by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flcore.dp.adaptive_clipping import (
    AdaptiveClipConfig,
    AdaptiveClipState,
    adaptive_clip_step,
    effective_noise_multiplier,
    geometric_clip_update,
    noised_unclipped_fraction,
    update_noise_multiplier,
)
from flcore.errors import FlcoreError


def test_one_step_by_hand() -> None:
    # m = 10 expected clients, 10 arrived, 7 unclipped; sigma_b = m / 20 = 0.5; gamma = 0.5, eta = 0.2.
    config = AdaptiveClipConfig(expected_clients_per_round=10)
    assert (config.target_quantile, config.learning_rate, config.count_stddev) == (0.5, 0.2, 0.5)
    g = np.random.default_rng(9).normal(0.0, 0.5)
    fraction = (7 + g) / 10  # the paper's (sum b_i + N(0, sigma_b^2)) / m, as num_updates == m
    expected_clip = 2.0 * math.exp(-0.2 * (fraction - 0.5))

    state, released = adaptive_clip_step(
        AdaptiveClipState(2.0, step=3), 7, 10, config, np.random.default_rng(9)
    )

    assert released == pytest.approx(fraction, rel=1e-15)
    assert state.clip_norm == pytest.approx(expected_clip, rel=1e-15)
    assert state.step == 4


def test_centred_count_when_fewer_clients_than_expected() -> None:
    # (sum (b_i - 1/2) + noise) / m + 1/2 with 4 of 4 unclipped, m = 8, no noise: (4 - 2) / 8 + 0.5.
    assert noised_unclipped_fraction(4, 4, 8.0, 0.0, np.random.default_rng(0)) == 0.75


def test_fraction_is_clamped_to_0_1() -> None:
    assert noised_unclipped_fraction(10, 10, 10.0, 1000.0, np.random.default_rng(1)) in {0.0, 1.0}


def test_geometric_update_direction_and_bound() -> None:
    assert geometric_clip_update(1.0, 0.9, 0.5, 0.2) == pytest.approx(math.exp(-0.08))  # shrinks
    assert geometric_clip_update(1.0, 0.1, 0.5, 0.2) == pytest.approx(math.exp(0.08))  # grows
    assert geometric_clip_update(1.0, 0.5, 0.5, 0.2) == 1.0


def test_corrected_noise_multiplier_by_hand() -> None:
    # z = 1, sigma_b = 5: z_Delta = (1 - 1/100)^(-1/2) = 1.0050378...
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5, rel=1e-15)
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx(1.00503782, rel=1e-8)
    assert effective_noise_multiplier(update_noise_multiplier(1.3, 2.0), 2.0) == pytest.approx(1.3, rel=1e-14)


def test_corrected_multiplier_needs_z_below_twice_sigma_b() -> None:
    with pytest.raises(FlcoreError, match="too low"):
        update_noise_multiplier(1.0, 0.5)


def test_state_round_trips_through_json() -> None:
    state = AdaptiveClipState(0.37, 12)
    assert AdaptiveClipState.from_json(state.to_json()) == state
    with pytest.raises(FlcoreError):
        AdaptiveClipState.from_json({"clip_norm": -1.0, "step": 0})
    with pytest.raises(FlcoreError):
        AdaptiveClipState.from_json({"clip_norm": 1.0})


def test_converges_to_the_target_quantile() -> None:
    # Norms ~ |N(0, 1)|: the median is 0.674; 300 noiseless-ish steps of 1000 clients settle near it.
    rng = np.random.default_rng(0)
    config = AdaptiveClipConfig(expected_clients_per_round=1000)
    state = AdaptiveClipState(0.1)
    for _ in range(300):
        norms = np.abs(rng.standard_normal(1000))
        state, _ = adaptive_clip_step(state, int((norms <= state.clip_norm).sum()), 1000, config, rng)
    assert state.clip_norm == pytest.approx(0.674, rel=0.1)
