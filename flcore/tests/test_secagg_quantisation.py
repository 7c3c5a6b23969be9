"""Quantisation into Z_(2**bits): the documented error bound (brute force), no wrap-around, clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flcore.errors import ConfigError
from flcore.secagg.errors import SecAggError
from flcore.secagg.quantisation import (
    clip_by_l2_norm,
    dequantise_sum,
    error_bound,
    quantisation_levels,
    quantise,
)


@pytest.mark.parametrize(
    ("bits", "num_parties", "num_summands"), [(8, 4, 4), (12, 10, 7), (32, 100, 60), (40, 5, 5)]
)
def test_dequantised_sum_is_within_the_bound_of_the_exact_sum(
    bits: int, num_parties: int, num_summands: int
) -> None:
    rng = np.random.default_rng(bits * 1000 + num_parties)
    clip_norm = 2.5
    updates = [rng.standard_normal(2000) * rng.uniform(0.001, 0.2) for _ in range(num_summands)]
    updates[0] = updates[0] * 1e3  # one long update, to be clipped
    quantised = [
        quantise(u, clip_norm=clip_norm, bits=bits, num_parties=num_parties, rng=rng) for u in updates
    ]
    # brute force: the exact integer sum with Python ints, and the exact float sum of the clipped updates
    integer_sum = [sum(int(q[i]) for q in quantised) for i in range(2000)]
    assert max(integer_sum) < 2**bits  # the modulus never wraps
    total = np.array(integer_sum, dtype=quantised[0].dtype)
    clipped = [clip_by_l2_norm(u, clip_norm) for u in updates]
    exact = np.array([math.fsum(c[i] for c in clipped) for i in range(2000)])

    got = dequantise_sum(
        total, clip_norm=clip_norm, bits=bits, num_parties=num_parties, num_summands=num_summands
    )
    bound = error_bound(clip_norm=clip_norm, bits=bits, num_parties=num_parties, num_summands=num_summands)
    assert np.abs(got - exact).max() < bound * (1 + 1e-9)
    if bits <= 12:
        # coarse grids: the error is a sizeable part of the bound, so the bound is not vacuous
        assert np.abs(got - exact).max() > 0.1 * bound


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(3)
    value = np.full(200_000, 0.3337)
    levels = quantisation_levels(bits=8, num_parties=2)  # 63 levels per side: 0.3337 sits between two
    q = quantise(value, clip_norm=1000.0, bits=8, num_parties=2, rng=rng)
    assert len(np.unique(q)) == 2
    back = (q.astype(np.float64) - levels) * 1000.0 / levels
    # mean within 5 standard errors (the step is 1000/63, the rounding variance at most step**2 / 4)
    assert abs(back.mean() - 0.3337) < 5 * (1000.0 / levels / 2) / math.sqrt(value.size)


@pytest.mark.parametrize(("bits", "num_parties"), [(2, 1), (5, 15), (8, 127), (16, 1000), (32, 500)])
def test_levels_leave_room_for_the_sum_of_every_party(bits: int, num_parties: int) -> None:
    levels = quantisation_levels(bits=bits, num_parties=num_parties)
    assert levels >= 1
    assert 2 * levels * num_parties <= 2**bits - 1  # n maximal values still fit
    assert 2 * (levels + 1) * num_parties > 2**bits - 1  # and the levels are the most that fit


def test_too_few_bits_for_the_parties_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"'bits' = 4 is too few for 8 parties.*bits >= 5"):
        quantisation_levels(bits=4, num_parties=8)
    with pytest.raises(ConfigError, match="'bits' must be an integer"):
        quantisation_levels(bits=64, num_parties=8)
    with pytest.raises(ConfigError, match="'clip_norm'"):
        quantise(np.ones(3), clip_norm=0.0, bits=32, num_parties=2, rng=np.random.default_rng(0))


def test_clipping_bounds_the_norm_and_keeps_short_vectors() -> None:
    rng = np.random.default_rng(0)
    long = rng.standard_normal(1000) * 10
    clipped = clip_by_l2_norm(long, 1.5)
    assert np.linalg.norm(clipped) <= 1.5 * (1 + 1e-12)
    np.testing.assert_allclose(clipped, long * 1.5 / np.linalg.norm(long))
    short = long / np.linalg.norm(long)
    np.testing.assert_array_equal(clip_by_l2_norm(short, 1.5), short)
    with pytest.raises(SecAggError, match="NaN"):
        clip_by_l2_norm(np.array([1.0, np.nan]), 1.0)


def test_dequantise_refuses_a_sum_no_honest_inputs_can_make() -> None:
    levels = quantisation_levels(bits=16, num_parties=4)
    too_big = np.array([2 * levels * 3 + 1], dtype=np.uint32)
    with pytest.raises(SecAggError, match="masks were not removed"):
        dequantise_sum(too_big, clip_norm=1.0, bits=16, num_parties=4, num_summands=3)
