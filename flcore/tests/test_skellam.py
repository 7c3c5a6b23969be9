"""The Skellam mechanism (flcore.dp.skellam): the RDP bound against the exact Renyi divergence computed with
mpmath at 40 digits and against dp-accounting's Gaussian RDP, the noise against scipy's Skellam law, and the
agent's encoding (rotation, conditional rounding, modular sum) against hand-computed references."""

from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np
import pytest
from scipy import stats
from scipy.linalg import hadamard

from flcore.dp.skellam import (
    SkellamParameters,
    aggregate_coordinate_bound,
    conditional_round,
    padded_dimension,
    randomized_hadamard,
    randomized_hadamard_inverse,
    rounded_l1_bound,
    rounded_l2_bound,
    skellam_decode,
    skellam_encode,
    skellam_noise,
    skellam_rdp,
    to_modular,
)
from flcore.errors import FlcoreError
from flcore.parameters import ParameterSpec

mpmath = pytest.importorskip("mpmath")


# ---------------------------------------------------------------------------------------------------------
# Exact Renyi divergence of Sk(mu) + shift against Sk(mu), at 40 digits
# ---------------------------------------------------------------------------------------------------------
@cache
def _pmf(mu: float, k: int) -> object:
    mpmath.mp.dps = 40
    m = mpmath.mpf(mu)
    return mpmath.exp(-2 * m) * mpmath.besseli(abs(k), 2 * m)  # P(k) = e^(-2 mu) I_k(2 mu)


def exact_renyi(mu: float, shift: int, alpha: int) -> float:
    """``D_alpha(Sk(mu) + shift || Sk(mu)) = log(sum_k P(k - shift)^alpha P(k)^(1 - alpha)) / (alpha - 1)``.

    Summed outwards from the tilted mode ``alpha * shift`` until a pair of terms adds less than 1e-35 of
    the total (the pmf decays super-exponentially, so the tail beyond is negligible).
    """
    mpmath.mp.dps = 40
    centre = alpha * shift

    def term(k: int) -> object:
        return _pmf(mu, k - shift) ** alpha * _pmf(mu, k) ** (1 - alpha)

    total = term(centre)
    step = 0
    while True:
        step += 1
        pair = term(centre + step) + term(centre - step)
        total += pair
        if step > 10 and pair < total * mpmath.mpf(10) ** -35:
            break
    return float(mpmath.log(total) / (alpha - 1))


def one_dimensional_bound(mu: float, shift: int, alpha: int) -> float:
    return float(skellam_rdp([alpha], l1_sensitivity=abs(shift), l2_sensitivity=abs(shift), mu=mu)[0])


@pytest.mark.parametrize("mu", [0.5, 2.0, 10.0, 50.0])
@pytest.mark.parametrize("shift", [1, 2, 3])
@pytest.mark.parametrize("alpha", [2, 3, 8, 20])
def test_bound_is_at_least_the_exact_renyi_divergence(mu: float, shift: int, alpha: int) -> None:
    exact = exact_renyi(mu, shift, alpha)

    bound = one_dimensional_bound(mu, shift, alpha)

    assert bound >= exact * (1 - 1e-12)


@pytest.mark.parametrize(("mu", "closeness"), [(10.0, 1.8), (50.0, 1.1)])
def test_bound_is_close_to_the_exact_divergence_once_mu_is_large(mu: float, closeness: float) -> None:
    ratios = [
        one_dimensional_bound(mu, shift, alpha) / exact_renyi(mu, shift, alpha)
        for shift in (1, 2, 3)
        for alpha in (2, 3, 8, 20)
    ]

    assert max(ratios) <= closeness
    assert min(ratios) >= 1.0


def test_bound_tightens_as_mu_grows() -> None:
    gaps = [one_dimensional_bound(mu, 2, 8) / exact_renyi(mu, 2, 8) - 1 for mu in (2.0, 10.0, 50.0, 200.0)]

    assert all(later < earlier for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] < 0.01


def test_vector_shift_bound_covers_the_sum_of_coordinate_divergences() -> None:
    # D_alpha of a product is the sum over coordinates; the bound uses ||v||_2^2 = 6 and ||v||_1 = 4.
    mu, alpha, shift = 5.0, 4, (1, 2, -1)
    exact = sum(exact_renyi(mu, abs(s), alpha) for s in shift)

    bound = float(skellam_rdp([alpha], l1_sensitivity=4, l2_sensitivity=math.sqrt(6), mu=mu)[0])

    assert exact <= bound <= 1.25 * exact


def test_closed_form_matches_the_theorem_by_hand() -> None:
    # alpha 3, D2 2, D1 4, mu 10: 3*4/40 + min((5*4 + 24) / 1600, 12 / 40) = 0.3 + 0.0275.
    assert skellam_rdp([3], l1_sensitivity=4, l2_sensitivity=2, mu=10)[0] == pytest.approx(0.3275, rel=1e-15)
    # A non-integer order uses the bound at its ceiling (RDP is non-decreasing in the order).
    assert skellam_rdp([2.5], l1_sensitivity=4, l2_sensitivity=2, mu=10)[0] == pytest.approx(0.3275)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"l1_sensitivity": 1, "l2_sensitivity": 1, "mu": 0}, "mu"),
        ({"l1_sensitivity": -1, "l2_sensitivity": 1, "mu": 1}, "l1_sensitivity"),
        ({"l1_sensitivity": 1, "l2_sensitivity": math.nan, "mu": 1}, "l2_sensitivity"),
    ],
)
def test_bad_rdp_arguments_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(FlcoreError, match=field):
        skellam_rdp([2], **kwargs)


def test_orders_must_exceed_one() -> None:
    with pytest.raises(FlcoreError, match="order"):
        skellam_rdp([1.0, 2.0], l1_sensitivity=1, l2_sensitivity=1, mu=1)


# ---------------------------------------------------------------------------------------------------------
# Against dp-accounting's Gaussian RDP at the same variance
# ---------------------------------------------------------------------------------------------------------
ORDERS = np.array([2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0])


def _gaussian_rdp(noise_multiplier: float) -> np.ndarray:
    dp_accounting = pytest.importorskip("dp_accounting")
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier))
    return np.asarray(accountant._rdp)  # dp-accounting has no public getter for the RDP curve


def test_skellam_rdp_tends_to_the_gaussian_rdp_with_the_same_variance() -> None:
    l2, dimension = 3.0, 16
    l1 = rounded_l1_bound(l2, dimension)
    ratios = []
    for mu in (10.0, 100.0, 1e3, 1e4, 1e5):
        gaussian = _gaussian_rdp(math.sqrt(2 * mu) / l2)  # N(0, 2 mu), sensitivity l2
        skellam = skellam_rdp(ORDERS, l1_sensitivity=l1, l2_sensitivity=l2, mu=mu)
        assert np.all(skellam >= gaussian * (1 - 1e-12))
        ratios.append(float(np.max(skellam / gaussian)))

    assert all(later < earlier for earlier, later in itertools.pairwise(ratios))
    assert ratios[-1] - 1 < 1e-3


def test_skellam_epsilon_is_at_least_the_gaussian_epsilon_and_approaches_it() -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import rdp_privacy_accountant

    l2, delta, rounds = 2.0, 1e-5, 50
    orders = rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    relative = []
    for mu in (20.0, 200.0, 2e3, 2e4):
        gaussian = dp_accounting.rdp.RdpAccountant()
        gaussian.compose(
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(math.sqrt(2 * mu) / l2), rounds)
        )
        epsilon_gaussian = gaussian.get_epsilon(delta)
        curve = rounds * skellam_rdp(orders, l1_sensitivity=l2 * l2, l2_sensitivity=l2, mu=mu)
        epsilon_skellam, _ = rdp_privacy_accountant.compute_epsilon(orders, curve, delta)
        assert epsilon_skellam >= epsilon_gaussian - 1e-9
        relative.append(epsilon_skellam / epsilon_gaussian - 1)

    assert relative[-1] < 1e-3
    assert relative[-1] < relative[0]


# ---------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------
def test_scipy_pmf_is_the_bessel_form() -> None:
    for mu, k in ((0.7, 0), (3.0, 2), (12.0, -5)):
        assert float(stats.skellam.pmf(k, mu, mu)) == pytest.approx(float(_pmf(mu, k)), rel=1e-10)


def test_summed_agent_noise_is_skellam_of_the_summed_mu() -> None:
    agents, mu, samples = 8, 1.5, 200_000
    rng = np.random.default_rng(7)

    total = sum(skellam_noise((samples,), mu, rng) for _ in range(agents))

    assert total.dtype == np.int64
    reference = stats.skellam(agents * mu, agents * mu)
    values, counts = np.unique(total, return_counts=True)
    inside = (values >= -12) & (values <= 12)  # expected counts >= 5 in every cell kept
    expected = reference.pmf(values[inside]) * samples
    observed = counts[inside]
    rest_observed = samples - observed.sum()
    rest_expected = samples - expected.sum()
    chi2 = stats.chisquare(np.append(observed, rest_observed), np.append(expected, rest_expected))
    assert chi2.pvalue > 1e-4
    assert np.var(total) == pytest.approx(2 * agents * mu, rel=0.02)


def test_zero_mu_draws_nothing() -> None:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state

    assert not skellam_noise((5,), 0.0, rng).any()
    assert rng.bit_generator.state == state


def test_noise_needs_a_generator() -> None:
    with pytest.raises(FlcoreError, match="rng"):
        skellam_noise((3,), 1.0, 42)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Rotation, rounding and the sensitivity bounds
# ---------------------------------------------------------------------------------------------------------
def test_rotation_is_the_signed_hadamard_matrix_and_inverts() -> None:
    vector = np.arange(1.0, 6.0)  # d = 5 pads to 8
    signs = np.random.default_rng(11).choice([-1.0, 1.0], size=8)
    expected = hadamard(8) @ (np.concatenate([vector, np.zeros(3)]) * signs) / math.sqrt(8)

    rotated = randomized_hadamard(vector, 11)

    np.testing.assert_allclose(rotated, expected, atol=1e-12)
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(vector), rel=1e-14)
    np.testing.assert_allclose(randomized_hadamard_inverse(rotated, 11, 5), vector, atol=1e-12)


def test_padded_dimension() -> None:
    assert [padded_dimension(d) for d in (1, 2, 3, 1024, 1025)] == [1, 2, 4, 1024, 2048]


def test_rounded_bounds_by_hand() -> None:
    # c s = 10, d = 16, beta = e^-0.5: sqrt(100 + 4 + 1 * (10 + 2)) = sqrt(116) < 10 + 4.
    assert rounded_l2_bound(1.0, 10.0, 16, math.exp(-0.5)) == pytest.approx(math.sqrt(116))
    assert rounded_l2_bound(1.0, 10.0, 16, 0.0) == pytest.approx(14.0)
    assert rounded_l1_bound(3.0, 100) == 9.0
    assert rounded_l1_bound(30.0, 4) == 60.0


def test_l1_bound_holds_for_integer_vectors() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        vector = rng.integers(-3, 4, size=int(rng.integers(1, 30)))
        l2 = float(np.linalg.norm(vector))
        assert np.abs(vector).sum() <= rounded_l1_bound(l2, vector.size) + 1e-9


def test_conditional_rounding_never_exceeds_its_bound_and_is_unbiased() -> None:
    rng = np.random.default_rng(5)
    vector = rng.normal(size=64)
    vector *= 20.0 / np.linalg.norm(vector)
    bound = rounded_l2_bound(20.0, 1.0, 64)

    draws = np.array([conditional_round(vector, bound, rng) for _ in range(4000)])

    assert np.all(np.sum(draws.astype(np.float64) ** 2, axis=1) <= bound * bound)
    assert np.all(np.abs(draws - vector) < 1)
    # Conditioning on the norm biases little: the mean stays within 0.05 of x in every coordinate.
    assert np.max(np.abs(draws.mean(axis=0) - vector)) < 0.05


def test_conditional_rounding_refuses_an_unclipped_vector() -> None:
    with pytest.raises(FlcoreError, match="clip"):
        conditional_round(np.full(16, 10.0), 5.0, np.random.default_rng(0), max_attempts=5)


# ---------------------------------------------------------------------------------------------------------
# One round: shares, modular sum, decoding
# ---------------------------------------------------------------------------------------------------------
def _deltas(agents: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [
        {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
        for _ in range(agents)
    ]


def test_decoded_modular_sum_is_the_sum_of_clipped_deltas_within_the_noise() -> None:
    rng = np.random.default_rng(21)
    deltas = _deltas(10, rng)
    parameters = SkellamParameters(
        clip_norm=1.0, scale=200.0, agent_mu=2.0, bits=16, dimension=35, rotation_seed=9
    )
    spec = ParameterSpec.from_parameters(deltas[0])

    shares = [skellam_encode(delta, parameters, rng) for delta in deltas]
    total = to_modular(np.sum([to_modular(share, 16) for share in shares], axis=0), 16)
    decoded = skellam_decode(total, parameters, spec)

    clipped_sum = sum(
        np.concatenate([d["w"].ravel(), d["b"]])
        / max(1.0, np.linalg.norm(np.concatenate([d["w"].ravel(), d["b"]])))
        for d in deltas
    )
    flat = np.concatenate([decoded["w"].ravel(), decoded["b"]])
    # Per coordinate: noise of variance 10 * 2 mu plus rounding of variance <= 10 / 4, over s.
    stddev = math.sqrt(10 * (2 * 2.0 + 0.25)) / 200.0
    assert np.max(np.abs(flat - clipped_sum)) < 6 * stddev
    assert decoded["w"].shape == (6, 5) and decoded["w"].dtype == np.float32


def test_share_is_integer_with_the_padded_length_and_bounded_before_noise() -> None:
    rng = np.random.default_rng(1)
    delta = {"w": (rng.normal(size=100) * 10).astype(np.float32)}  # norm far above the clip
    parameters = SkellamParameters(clip_norm=0.5, scale=40.0, agent_mu=1e-9, bits=20, dimension=100)

    share = skellam_encode(delta, parameters, rng)

    assert share.dtype == np.int64 and share.shape == (128,)
    assert float(np.dot(share, share)) <= parameters.l2_sensitivity**2  # mu ~ 0: almost surely no noise


def test_wrapped_sum_decodes_like_the_signed_sum() -> None:
    parameters = SkellamParameters(clip_norm=1.0, scale=1.0, agent_mu=1.0, bits=8, dimension=4)
    signed = np.array([-128, -1, 0, 127])

    np.testing.assert_allclose(
        skellam_decode(to_modular(signed, 8), parameters), skellam_decode(signed, parameters)
    )


def test_aggregate_coordinate_bound_by_hand() -> None:
    # n = 4, c s = 8, d' = 16, mu = 1: sqrt(32^2 / 16 + 4 * 2.25) = sqrt(73).
    value = aggregate_coordinate_bound(
        num_agents=4, clip_norm=1.0, scale=8.0, dimension=16, agent_mu=1.0, stddevs=3
    )
    assert value == pytest.approx(3 * math.sqrt(73))


def test_parameters_round_trip_and_name_bad_fields() -> None:
    parameters = SkellamParameters(
        clip_norm=1.0, scale=3.0, agent_mu=5.0, bits=20, dimension=7, rotation_seed=4
    )
    assert SkellamParameters.from_json(parameters.to_json()) == parameters
    with pytest.raises(FlcoreError, match="bits"):
        SkellamParameters(clip_norm=1.0, scale=3.0, agent_mu=5.0, bits=70, dimension=7)
    with pytest.raises(FlcoreError, match="agent_mu"):
        SkellamParameters(clip_norm=1.0, scale=3.0, agent_mu=-1.0, bits=20, dimension=7)
    with pytest.raises(FlcoreError, match="beta"):
        SkellamParameters(clip_norm=1.0, scale=3.0, agent_mu=1.0, bits=20, dimension=7, beta=1.0)
    with pytest.raises(FlcoreError, match="Unknown"):
        SkellamParameters.from_json({**parameters.to_json(), "sigma": 1})
    with pytest.raises(FlcoreError, match="parameters"):
        skellam_encode({"w": np.zeros(3, np.float32)}, parameters, np.random.default_rng(0))
