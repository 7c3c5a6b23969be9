"""Validation of the privacy machinery against independent references (``manage.py validate_privacy``).

Three checks, each on the project's real code paths:

1. **Mechanisms.** Noise drawn by :mod:`flcore.dp.mechanisms` (Gaussian and Laplace, raw and added to
   parameters) and by :meth:`flcore.dp.central.CentralDp.noised_mean` is tested against its nominal
   distribution: a Kolmogorov-Smirnov test against ``N(0, s^2)`` or ``Lap(0, b)``, and an exact test of the
   scale (Gaussian: ``(n - 1) S^2 / s^2 ~ chi^2(n - 1)``; Laplace: ``sum |x_i| / b ~ Gamma(n, 1)``), each
   two-sided. The family-wise false-alarm rate is :data:`FAMILY_ALPHA`, split over the table (Bonferroni).
2. **Accountants.** Epsilon from :mod:`privacy.accounting` (dp-accounting's RDP and PLD) beside Microsoft's
   PRV accountant (Gopi, Lee and Wutschitz 2021, "Numerical Composition of Differential Privacy"), which
   returns bounds ``eps_lower <= eps <= eps_upper``. RDP is an upper bound, so it must be at least
   ``eps_lower``; our PLD (pessimistic discretisation) must lie in ``[eps_lower, eps_upper + k * h]`` with
   ``h`` the PLD value discretisation and ``k`` the number of composed rounds (each pessimistic rounding
   adds at most ``h`` to the privacy loss).
3. **Empirical audit** (Jagielski, Ullman and Oprea 2020, "Auditing Differentially Private Machine
   Learning: How Private is Private SGD?", NeurIPS; Nasr et al. 2021, "Adversary Instantiation", IEEE S&P).
   The central-DP aggregation the server runs (:func:`flcore.dp.central.wrap_central_dp` around FedAvg,
   clipped unweighted sum in a :class:`~flcore.dp.central.ClippedSumAccumulator`, then ``noised_mean``) is
   run many times on two neighbouring sets of client deltas, with and without a canary whose delta is far
   larger than ``C`` in a fixed direction ``u``. The attack statistic is ``<released mean, u>``; a threshold
   chosen on one half of the trials gives a false-positive and a false-negative rate on the other half;
   their Clopper-Pearson upper bounds ``a``, ``b`` give ``eps_lb = max(log((1 - delta - a) / b),
   log((1 - delta - b) / a))`` (Jagielski et al. 2020, Theorem 1 and Algorithm 2), a lower bound on the
   true epsilon that holds with the stated confidence. The check passes iff ``eps_lb`` does not exceed the
   accounted epsilon of that single round (q = 1) at the same delta.

4. **Distributed DP** (the Skellam mechanism, Agarwal, Kairouz and Liu 2021). For a worked example
   calibrated by :func:`privacy.accounting.calibrate_skellam`, ``n`` agents' shares of a zero delta are
   computed by the agent's real path (:func:`flcore.dp.skellam.skellam_encode`: clip, scale, rotate,
   round, add ``Sk(mu)``) and summed: the sum must be ``Sk(n mu)``, tested by its variance (``2 n mu``;
   the sample variance's own variance is ``(2m + 8m^2) / N`` for ``m = n mu``, from the Skellam cumulants
   ``kappa_2 = kappa_4 = 2m``) and by a chi-square goodness-of-fit over 50 bins (about equally likely) of
   ``scipy.stats.skellam``, Bonferroni at :data:`FAMILY_ALPHA`. Analytically: the epsilon the accountant
   gives the calibrated ``mu`` is at most the target and within 1e-3 of it (and 0.99 ``mu`` overspends),
   composing the rounds one ledger entry at a time gives the same epsilon as the self-composed event, and
   the Skellam RDP is at least dp-accounting's Gaussian RDP at the same variance at every order.

Invariants: every random draw comes from a ``numpy.random.Generator`` seeded from the caller's seed, so a
run is reproducible; nothing here writes to the database. :func:`noise_switched_off` (the command's
``--break-noise``) replaces flcore's noise samplers by zeros for the duration of a ``with`` block, in this
process only, to show that the checks catch a mechanism that adds no noise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
import numpy as np
import numpy.typing as npt
from scipy import stats

from flcore.dp import central as dp_central
from flcore.dp import mechanisms as dp_mechanisms
from flcore.dp import skellam as dp_skellam
from flcore.parameters import ParameterSpec, l2_norm
from flcore.strategies.registry import build_strategy
from privacy.accounting import (
    PLD_VALUE_DISCRETIZATION,
    AccountingError,
    RdpAccountant,
    calibrate_skellam,
    composed_epsilon,
    round_event,
    skellam_epsilon,
    skellam_round_event,
)

FAMILY_ALPHA = 1e-3
"""Family-wise false-alarm rate of the mechanism table (Bonferroni-split over its tests)."""

AUDIT_CONFIDENCE = 0.95
"""Joint confidence of the two Clopper-Pearson upper bounds of the audit (each one-sided at 1 - 0.025)."""

INSTALL_HINT = "pip install -r requirements/privacy-validation.txt"

SECTIONS = ("mechanisms", "accountants", "audit", "distributed")


class ValidationError(ValueError):
    """An invalid validation request (the message names the bad value)."""


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------
def clopper_pearson_upper(successes: int, trials: int, *, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson upper bound on a binomial proportion.

    The ``1 - alpha`` quantile of ``Beta(k + 1, n - k)``; 1 when ``k = n`` (Clopper and Pearson 1934).
    """
    _check_counts(successes, trials, alpha)
    if successes == trials:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, successes + 1, trials - successes))


def clopper_pearson_lower(successes: int, trials: int, *, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound: the ``alpha`` quantile of ``Beta(k, n-k+1)``."""
    _check_counts(successes, trials, alpha)
    if successes == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, successes, trials - successes + 1))


def _check_counts(successes: int, trials: int, alpha: float) -> None:
    if trials < 1:
        raise ValidationError(f"trials must be at least 1. Found {trials}.")
    if not 0 <= successes <= trials:
        raise ValidationError(f"successes must be in [0, {trials}]. Found {successes}.")
    if not 0 < alpha < 1:
        raise ValidationError(f"alpha must be in (0, 1). Found {alpha}.")


def epsilon_lower_bound(*, false_positive_rate: float, false_negative_rate: float, delta: float) -> float:
    """The epsilon that an attack with these error rates proves, at ``delta`` (0 if it proves none).

    For an ``(epsilon, delta)``-DP mechanism every test satisfies ``FPR + e^eps FNR >= 1 - delta`` and
    ``FNR + e^eps FPR >= 1 - delta`` (Kairouz, Oh and Viswanath 2015), so
    ``eps >= max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR))`` (Jagielski et al. 2020).
    Pass upper confidence bounds of the rates to get a bound that holds with that confidence.
    """
    for name, value in (
        ("false_positive_rate", false_positive_rate),
        ("false_negative_rate", false_negative_rate),
    ):
        if not 0 <= value <= 1:
            raise ValidationError(f"{name} must be in [0, 1]. Found {value}.")
    if not 0 <= delta < 1:
        raise ValidationError(f"delta must be in [0, 1). Found {delta}.")

    def one(numerator_rate: float, denominator_rate: float) -> float:
        numerator = 1.0 - delta - numerator_rate
        if numerator <= 0:
            return 0.0
        if denominator_rate <= 0:
            return math.inf
        return math.log(numerator / denominator_rate)

    return max(
        0.0, one(false_positive_rate, false_negative_rate), one(false_negative_rate, false_positive_rate)
    )


def _two_sided(cdf: float, sf: float) -> float:
    return float(min(1.0, 2.0 * min(cdf, sf)))


# ---------------------------------------------------------------------------------------------------------
# 1. Mechanisms
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MechanismCheck:
    """One statistical test of one noise source."""

    source: str
    distribution: str
    test: str
    samples: int
    expected_scale: float
    observed_scale: float
    statistic: float
    p_value: float
    alpha: float

    @property
    def passed(self) -> bool:
        return self.p_value >= self.alpha


def _gaussian_tests(source: str, sample: npt.NDArray[Any], stddev: float) -> list[Any]:
    x = np.asarray(sample, dtype=np.float64).ravel()
    n = x.size
    ks = stats.kstest(x, "norm", args=(0.0, stddev))
    chi2 = float((n - 1) * np.var(x, ddof=1) / stddev**2)
    p_chi2 = _two_sided(float(stats.chi2.cdf(chi2, n - 1)), float(stats.chi2.sf(chi2, n - 1)))
    observed = float(np.std(x, ddof=1))
    distribution = f"N(0, {stddev:.4g}^2)"
    return [
        (
            source,
            distribution,
            "Kolmogorov-Smirnov",
            n,
            stddev,
            observed,
            float(ks.statistic),
            float(ks.pvalue),
        ),
        (source, distribution, "chi^2 on variance", n, stddev, observed, chi2, p_chi2),
    ]


def _laplace_tests(source: str, sample: npt.NDArray[Any], scale: float) -> list[Any]:
    x = np.asarray(sample, dtype=np.float64).ravel()
    n = x.size
    ks = stats.kstest(x, "laplace", args=(0.0, scale))
    # |X| ~ Exponential(b) for X ~ Lap(b), so sum |x_i| / b ~ Gamma(n, 1) exactly.
    total = float(np.sum(np.abs(x)) / scale)
    p_gamma = _two_sided(float(stats.gamma.cdf(total, n)), float(stats.gamma.sf(total, n)))
    observed = float(np.mean(np.abs(x)))
    distribution = f"Lap(0, {scale:.4g})"
    return [
        (
            source,
            distribution,
            "Kolmogorov-Smirnov",
            n,
            scale,
            observed,
            float(ks.statistic),
            float(ks.pvalue),
        ),
        (source, distribution, "Gamma on sum |x| / b", n, scale, observed, total, p_gamma),
    ]


def check_mechanisms(*, samples: int, seed: int) -> list[MechanismCheck]:
    """Sample every flcore noise source with seeded generators and test it against its distribution.

    Scale columns: the standard deviation for Gaussian noise, the mean absolute deviation ``b`` for Laplace.
    """
    if samples < 100:
        raise ValidationError(f"samples must be at least 100. Found {samples}.")
    rows: list[Any] = []
    sigma, b = 1.7, 0.6
    rows += _gaussian_tests(
        "gaussian_noise",
        dp_mechanisms.gaussian_noise((samples,), sigma, np.random.default_rng([seed, 1])),
        sigma,
    )
    rows += _laplace_tests(
        "laplace_noise",
        dp_mechanisms.laplace_noise((samples,), b, np.random.default_rng([seed, 2])),
        b,
    )
    # The parameter-level mechanisms, on a two-tensor model of zeros: every tensor must get noise.
    half = samples // 2
    zeros = {
        "w": np.zeros((half // 10, 10), np.float32),
        "b": np.zeros(samples - (half // 10) * 10, np.float32),
    }
    noised = dp_mechanisms.add_gaussian_noise(zeros, sigma, np.random.default_rng([seed, 3]))
    rows += _gaussian_tests(
        "add_gaussian_noise (float32)", np.concatenate([a.ravel() for a in noised.values()]), sigma
    )
    noised = dp_mechanisms.add_laplace_noise(zeros, b, np.random.default_rng([seed, 4]))
    rows += _laplace_tests(
        "add_laplace_noise (float32)", np.concatenate([a.ravel() for a in noised.values()]), b
    )
    # The server's release: (sum of clipped + N(0, (z C)^2)) / m, on a zero sum.
    z, clip, m = 1.3, 0.5, 8.0
    dp = dp_central.wrap_central_dp(
        build_strategy("fedavg", {}), noise_multiplier=z, clip_norm=clip, expected_clients_per_round=m
    )
    released = dp.noised_mean(zeros, 0, np.random.default_rng([seed, 5]))
    rows += _gaussian_tests(
        f"CentralDp.noised_mean z={z} C={clip} m={m:g}",
        np.concatenate([a.ravel() for a in released.values()]),
        z * clip / m,
    )
    alpha = FAMILY_ALPHA / len(rows)
    return [MechanismCheck(*row, alpha=alpha) for row in rows]


# ---------------------------------------------------------------------------------------------------------
# 2. Accountants
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AccountantSetting:
    """One point of the accountant grid."""

    mechanism: str
    sampling_probability: float
    noise_multiplier: float
    rounds: int
    delta: float


@dataclass(frozen=True)
class AccountantCheck:
    setting: AccountantSetting
    rdp_epsilon: float | None
    pld_epsilon: float
    prv_lower: float
    prv_estimate: float
    prv_upper: float
    pld_tolerance: float
    seconds: float

    @property
    def rdp_ok(self) -> bool:
        return self.rdp_epsilon is None or self.rdp_epsilon >= self.prv_lower

    @property
    def pld_ok(self) -> bool:
        return self.prv_lower <= self.pld_epsilon <= self.prv_upper + self.pld_tolerance

    @property
    def passed(self) -> bool:
        return self.rdp_ok and self.pld_ok


@dataclass(frozen=True)
class AccountantReport:
    checks: list[AccountantCheck] = field(default_factory=list)
    error: str | None = None
    prv_eps_error: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks)


QUICK_ACCOUNTANT_GRID = (
    AccountantSetting("gaussian", 1.0, 1.0, 1, 1e-5),
    AccountantSetting("gaussian", 0.1, 1.0, 20, 1e-5),
    AccountantSetting("gaussian", 0.5, 2.0, 10, 1e-6),
    AccountantSetting("laplace", 1.0, 2.0, 5, 1e-5),
)
FULL_ACCOUNTANT_GRID = (
    *QUICK_ACCOUNTANT_GRID,
    AccountantSetting("gaussian", 1.0, 5.0, 1, 1e-5),
    AccountantSetting("gaussian", 1.0, 4.0, 30, 1e-5),
    AccountantSetting("gaussian", 0.01, 1.0, 1000, 1e-5),
    AccountantSetting("gaussian", 0.05, 0.8, 200, 1e-5),
    AccountantSetting("gaussian", 0.1, 1.0, 100, 1e-5),
    AccountantSetting("gaussian", 0.2, 1.5, 100, 1e-6),
    AccountantSetting("gaussian", 0.5, 2.0, 50, 1e-5),
    AccountantSetting("gaussian", 1.0, 10.0, 100, 1e-5),
)


def prv_available() -> bool:
    """Whether the optional reference accountant (``prv-accountant``) is importable."""
    return importlib.util.find_spec("prv_accountant") is not None


def _our_epsilon(setting: AccountantSetting, accountant: str) -> float:
    event = round_event(
        mechanism=setting.mechanism,
        noise_multiplier=setting.noise_multiplier,
        sampling_probability=setting.sampling_probability,
    )
    # One self-composed event: the same epsilon as the ledger's list of identical rounds, in far less time.
    return composed_epsilon(
        [dp_accounting.SelfComposedDpEvent(event, setting.rounds)], delta=setting.delta, accountant=accountant
    )


def _prv_epsilon(setting: AccountantSetting, eps_error: float) -> tuple[float, float, float]:
    import prv_accountant

    if setting.mechanism == "laplace":
        if setting.sampling_probability < 1:
            raise ValidationError("prv-accountant has no subsampled Laplace mechanism; use q = 1.")
        # dp-accounting's LaplaceDpEvent(b) has sensitivity 1: privacy loss bounded by 1 / b.
        prv: Any = prv_accountant.LaplaceMechanism(mu=1.0 / setting.noise_multiplier)
    elif setting.sampling_probability >= 1:
        prv = prv_accountant.GaussianMechanism(noise_multiplier=setting.noise_multiplier)
    else:
        prv = prv_accountant.PoissonSubsampledGaussianMechanism(
            sampling_probability=setting.sampling_probability, noise_multiplier=setting.noise_multiplier
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = prv_accountant.PRVAccountant(
            prvs=prv,
            max_self_compositions=setting.rounds,
            eps_error=eps_error,
            delta_error=setting.delta / 1000,  # the library's recommendation: about 1e-3 delta
        )
        lower, estimate, upper = accountant.compute_epsilon(
            delta=setting.delta, num_self_compositions=[setting.rounds]
        )
    return float(lower), float(estimate), float(upper)


def check_accountants(
    grid: Sequence[AccountantSetting],
    *,
    prv_eps_error: float = 0.01,
    progress: Callable[[], None] | None = None,
) -> AccountantReport:
    """Compare our RDP and PLD epsilon with the PRV accountant's bounds on every point of ``grid``."""
    if not prv_available():
        return AccountantReport(
            error=(
                "The reference accountant prv-accountant is not installed, so our accounting cannot be "
                f"compared with an independent one. Install it with: {INSTALL_HINT}"
            )
        )
    checks = []
    for setting in grid:
        started = time.perf_counter()
        try:
            rdp_epsilon: float | None = _our_epsilon(setting, "rdp")
        except AccountingError:
            rdp_epsilon = None  # RDP cannot account this event (Laplace under sampling)
        pld_epsilon = _our_epsilon(setting, "pld")
        lower, estimate, upper = _prv_epsilon(setting, prv_eps_error)
        checks.append(
            AccountantCheck(
                setting=setting,
                rdp_epsilon=rdp_epsilon,
                pld_epsilon=pld_epsilon,
                prv_lower=lower,
                prv_estimate=estimate,
                prv_upper=upper,
                pld_tolerance=setting.rounds * PLD_VALUE_DISCRETIZATION,
                seconds=time.perf_counter() - started,
            )
        )
        if progress is not None:
            progress()
    return AccountantReport(checks=checks, prv_eps_error=prv_eps_error)


# ---------------------------------------------------------------------------------------------------------
# 3. Empirical audit
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditResult:
    """The outcome of a distinguishing attack on one central-DP round (q = 1)."""

    noise_multiplier: float
    clip_norm: float
    expected_clients_per_round: float
    other_clients: int
    canary_norm: float
    trials_per_world: int
    threshold: float
    false_positives: int
    false_negatives: int
    test_trials: int
    false_positive_rate: float
    false_negative_rate: float
    false_positive_rate_upper: float
    false_negative_rate_upper: float
    delta: float
    epsilon_lower_bound: float
    epsilon_rdp: float
    epsilon_pld: float
    confidence: float
    seconds: float

    @property
    def accounted_epsilon(self) -> float:
        """The tighter of the two accounted values: the bound must respect even that one."""
        return min(self.epsilon_rdp, self.epsilon_pld)

    @property
    def passed(self) -> bool:
        return self.epsilon_lower_bound <= self.accounted_epsilon


def _best_threshold(
    without: npt.NDArray[np.float64], with_canary: npt.NDArray[np.float64], *, delta: float, alpha: float
) -> float:
    """The threshold (predict "canary present" iff statistic > t) with the largest epsilon bound here."""
    values = np.unique(np.concatenate([without, with_canary]))
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    a, b = np.sort(without), np.sort(with_canary)
    false_positives = a.size - np.searchsorted(a, candidates, side="right")
    false_negatives = np.searchsorted(b, candidates, side="right")
    # Score by the point-estimate bound (cheap, vectorised), then keep the best few for the exact CP score.
    with np.errstate(divide="ignore", invalid="ignore"):
        fpr = (false_positives + 1) / (a.size + 2)
        fnr = (false_negatives + 1) / (b.size + 2)
        score = np.maximum(np.log((1 - delta - fpr) / fnr), np.log((1 - delta - fnr) / fpr))
    best_index = np.argsort(np.nan_to_num(score, nan=-np.inf))[-20:]
    best = max(
        best_index,
        key=lambda i: epsilon_lower_bound(
            false_positive_rate=clopper_pearson_upper(int(false_positives[i]), a.size, alpha=alpha),
            false_negative_rate=clopper_pearson_upper(int(false_negatives[i]), b.size, alpha=alpha),
            delta=delta,
        ),
    )
    return float(candidates[best])


def run_audit(
    *,
    trials: int,
    seed: int,
    noise_multiplier: float = 2.0,
    clip_norm: float = 1.0,
    other_clients: int = 5,
    dimension: int = 32,
    delta: float = 1e-5,
    progress: Callable[[int], None] | None = None,
) -> AuditResult:
    """Distinguish "canary in" from "canary out" on the server's central-DP release and bound epsilon.

    Each trial runs the server's path: ``wrap_central_dp(fedavg)``, one :class:`ClippedSumAccumulator`
    fed with every client's delta (weight 1, scale ``update_scale(norm)``), then ``noised_mean`` with a
    generator seeded from ``(seed, world, trial)``. The canary's delta is ``100 C u`` (clipped to ``C u``).
    """
    if trials < 20 or trials % 2:
        raise ValidationError(f"trials must be an even number of at least 20. Found {trials}.")
    started = time.perf_counter()
    data_rng = np.random.default_rng([seed, 100])
    # Fixed neighbouring inputs: honest clients with norms around C (some clipped), and the canary.
    honest = [
        {
            "w": (
                data_rng.normal(size=dimension)
                * clip_norm
                * data_rng.uniform(0.3, 2.0)
                / math.sqrt(dimension)
            ).astype(np.float32)
        }
        for _ in range(other_clients)
    ]
    direction = data_rng.normal(size=dimension)
    direction /= np.linalg.norm(direction)
    canary = {"w": (100.0 * clip_norm * direction).astype(np.float32)}
    expected = float(other_clients + 1)
    dp = dp_central.wrap_central_dp(
        build_strategy("fedavg", {}),
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        expected_clients_per_round=expected,
    )
    spec = ParameterSpec.from_parameters(honest[0])
    worlds = {0: honest, 1: [*honest, canary]}
    statistics = {0: np.empty(trials), 1: np.empty(trials)}
    done = 0
    round_dp = dp.for_state(dp.init_state(spec))
    for world, deltas in worlds.items():
        for trial in range(trials):
            accumulator = round_dp.accumulator(spec)
            for delta_i in deltas:
                norm = l2_norm(delta_i)
                accumulator.add(delta_i, round_dp.update_weight(1, norm), scale=round_dp.update_scale(norm))
            released = round_dp.noised_mean(
                accumulator.sum(), accumulator.count, np.random.default_rng([seed, 200 + world, trial])
            )
            statistics[world][trial] = float(np.dot(released["w"].astype(np.float64), direction))
            done += 1
            if progress is not None and done % 100 == 0:
                progress(100)
    half = trials // 2
    alpha = (1.0 - AUDIT_CONFIDENCE) / 2  # two upper bounds, union bound
    threshold = _best_threshold(statistics[0][:half], statistics[1][:half], delta=delta, alpha=alpha)
    test_without, test_with = statistics[0][half:], statistics[1][half:]
    test_trials = trials - half
    false_positives = int(np.sum(test_without > threshold))
    false_negatives = int(np.sum(test_with <= threshold))
    fpr_upper = clopper_pearson_upper(false_positives, test_trials, alpha=alpha)
    fnr_upper = clopper_pearson_upper(false_negatives, test_trials, alpha=alpha)
    event = round_event(mechanism="gaussian", noise_multiplier=noise_multiplier, sampling_probability=1.0)
    return AuditResult(
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        expected_clients_per_round=expected,
        other_clients=other_clients,
        canary_norm=float(l2_norm(canary)),
        trials_per_world=trials,
        threshold=threshold,
        false_positives=false_positives,
        false_negatives=false_negatives,
        test_trials=test_trials,
        false_positive_rate=false_positives / test_trials,
        false_negative_rate=false_negatives / test_trials,
        false_positive_rate_upper=fpr_upper,
        false_negative_rate_upper=fnr_upper,
        delta=delta,
        epsilon_lower_bound=epsilon_lower_bound(
            false_positive_rate=fpr_upper, false_negative_rate=fnr_upper, delta=delta
        ),
        epsilon_rdp=composed_epsilon([event], delta=delta, accountant="rdp"),
        epsilon_pld=composed_epsilon([event], delta=delta, accountant="pld"),
        confidence=AUDIT_CONFIDENCE,
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------------------
# 4. Distributed DP (Skellam)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedExample:
    """The worked example the distributed section calibrates and samples."""

    epsilon: float = 3.0
    delta: float = 1e-5
    rounds: int = 20
    agents: int = 10
    clip_norm: float = 1.0
    dimension: int = 1000
    bits: int = 20


@dataclass(frozen=True)
class DistributedAnalyticCheck:
    """One deterministic check of the Skellam accounting."""

    name: str
    expected: str
    observed: str
    passed: bool


@dataclass(frozen=True)
class DistributedReport:
    example: DistributedExample
    scale: float
    agent_mu: float
    statistical: list[MechanismCheck]
    analytic: list[DistributedAnalyticCheck]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.statistical) and all(c.passed for c in self.analytic)


def _skellam_tests(source: str, sample: npt.NDArray[np.int64], mu: float) -> list[Any]:
    """Variance z-test and chi-square goodness-of-fit of an integer sample against ``Sk(mu)``."""
    x = np.asarray(sample, dtype=np.float64).ravel()
    n = x.size
    variance = 2.0 * mu
    observed = float(np.var(x, ddof=1))
    z = (observed - variance) / math.sqrt((variance + 2.0 * variance * variance) / n)
    p_variance = float(2.0 * stats.norm.sf(abs(z)))
    reference = stats.skellam(mu, mu)
    # 50 bins of about equal probability: integer edges at the normal quantiles of the same variance
    # (scipy's Skellam ppf is a slow search at large mu); each bin's probability is Sk(mu)'s exact cdf.
    edges = np.unique(np.round(stats.norm.ppf(np.linspace(0.0, 1.0, 51)[1:-1]) * math.sqrt(variance)))
    probabilities = np.diff(np.concatenate([[0.0], reference.cdf(edges), [1.0]]))
    counts = np.bincount(np.searchsorted(edges, x, side="left"), minlength=probabilities.size)
    chi2 = stats.chisquare(counts, probabilities * n / probabilities.sum())
    distribution = f"Sk({mu:.4g})"
    return [
        (source, distribution, "variance z-test", n, math.sqrt(variance), math.sqrt(observed), z, p_variance),
        (
            source,
            distribution,
            f"chi-square, {probabilities.size} bins",
            n,
            math.sqrt(variance),
            math.sqrt(observed),
            float(chi2.statistic),
            float(chi2.pvalue),
        ),
    ]


def check_distributed(
    *, trials: int, seed: int, example: DistributedExample | None = None
) -> DistributedReport:
    """Calibrate the worked example, sample the summed shares of its agents and check the accounting."""
    if trials < 1:
        raise ValidationError(f"trials must be at least 1. Found {trials}.")
    ex = example or DistributedExample()
    parameters = calibrate_skellam(
        epsilon=ex.epsilon,
        delta=ex.delta,
        rounds=ex.rounds,
        noise_agents=ex.agents,
        summed_agents=ex.agents,
        clip_norm=ex.clip_norm,
        dimension=ex.dimension,
        bits=ex.bits,
    )
    zero = {"w": np.zeros(ex.dimension, np.float32)}
    sums = []
    for trial in range(trials):
        shares = [
            dp_skellam.skellam_encode(zero, parameters, np.random.default_rng([seed, 300, trial, agent]))
            for agent in range(ex.agents)
        ]
        sums.append(np.sum(shares, axis=0))
    total_mu = ex.agents * parameters.agent_mu
    rows = _skellam_tests(f"sum of {ex.agents} skellam_encode shares", np.concatenate(sums), total_mu)
    alpha = FAMILY_ALPHA / len(rows)
    statistical = [MechanismCheck(*row, alpha=alpha) for row in rows]

    spent = skellam_epsilon(parameters=parameters, noise_agents=ex.agents, rounds=ex.rounds, delta=ex.delta)
    less_noise = dp_skellam.SkellamParameters(
        **{**parameters.to_json(), "agent_mu": 0.99 * parameters.agent_mu}
    )
    overspent = skellam_epsilon(
        parameters=less_noise, noise_agents=ex.agents, rounds=ex.rounds, delta=ex.delta
    )
    event = skellam_round_event(parameters=parameters, noise_agents=ex.agents)
    one_by_one = composed_epsilon([event] * ex.rounds, delta=ex.delta, accountant="rdp")
    skellam_accountant, gaussian_accountant = RdpAccountant(), RdpAccountant()
    skellam_accountant.compose(event)
    gaussian_accountant.compose(
        dp_accounting.GaussianDpEvent(math.sqrt(2.0 * event.mu) / event.l2_sensitivity)
    )
    ratio = np.asarray(skellam_accountant._rdp) / np.asarray(gaussian_accountant._rdp)
    analytic = [
        DistributedAnalyticCheck(
            "epsilon of the calibrated mu (RDP, dp-accounting's conversion)",
            f"in [{ex.epsilon * (1 - 1e-3):.6g}, {ex.epsilon:g}]",
            f"{spent:.6f}",
            ex.epsilon * (1 - 1e-3) <= spent <= ex.epsilon,
        ),
        DistributedAnalyticCheck(
            "epsilon with 0.99 mu (the calibration is tight)",
            f"> {ex.epsilon:g}",
            f"{overspent:.6f}",
            overspent > ex.epsilon,
        ),
        DistributedAnalyticCheck(
            f"ledger: {ex.rounds} events composed one by one",
            f"{spent:.9f}",
            f"{one_by_one:.9f}",
            math.isclose(one_by_one, spent, rel_tol=1e-9),
        ),
        DistributedAnalyticCheck(
            "Skellam RDP / Gaussian RDP (same variance), min and max over orders",
            ">= 1 at every order",
            f"{float(ratio.min()):.6f} .. {float(ratio.max()):.6f}",
            bool(np.all(ratio >= 1.0 - 1e-12)),
        ),
    ]
    return DistributedReport(
        example=ex,
        scale=parameters.scale,
        agent_mu=parameters.agent_mu,
        statistical=statistical,
        analytic=analytic,
    )


# ---------------------------------------------------------------------------------------------------------
# --break-noise
# ---------------------------------------------------------------------------------------------------------
def _zero_noise(shape: tuple[int, ...], scale: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    return np.zeros(shape, dtype=np.float64)


def _zero_integer_noise(shape: tuple[int, ...], mu: float, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    return np.zeros(shape, dtype=np.int64)


@contextlib.contextmanager
def noise_switched_off() -> Iterator[None]:
    """Replace flcore's Gaussian, Laplace and Skellam samplers by zeros inside the block (this process only).

    Patches the module attributes that the mechanisms and :class:`CentralDp` look up at call time; the
    configured noise multiplier, and so the accounted epsilon, is unchanged: exactly the bug the checks
    must catch.
    """
    targets = [
        (dp_mechanisms, "gaussian_noise"),
        (dp_mechanisms, "laplace_noise"),
        (dp_central, "gaussian_noise"),
    ]
    saved = [(module, name, getattr(module, name)) for module, name in targets]
    saved.append((dp_skellam, "skellam_noise", dp_skellam.skellam_noise))
    try:
        for module, name in targets:
            setattr(module, name, _zero_noise)
        dp_skellam.skellam_noise = _zero_integer_noise  # type: ignore[assignment]
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


# ---------------------------------------------------------------------------------------------------------
# --table
# ---------------------------------------------------------------------------------------------------------
def epsilon_grid(
    *,
    sampling_probabilities: Sequence[float],
    noise_multipliers: Sequence[float],
    rounds: Sequence[int],
    delta: float,
    accountant: str,
    skip_above: float | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[tuple[float, float, int], float]:
    """Epsilon at ``delta`` of ``rounds`` Gaussian rounds at rate q with multiplier z, for every cell.

    With ``skip_above``, cells whose RDP epsilon exceeds it are NaN (no protection worth computing).
    """
    table: dict[tuple[float, float, int], float] = {}
    for count in rounds:
        for q in sampling_probabilities:
            for z in noise_multipliers:
                setting = AccountantSetting("gaussian", q, z, count, delta)
                if skip_above is not None and _our_epsilon(setting, "rdp") > skip_above:
                    table[(q, z, count)] = math.nan  # PLD of a huge epsilon is slow and meaningless
                else:
                    table[(q, z, count)] = _our_epsilon(setting, accountant)
                if progress is not None:
                    progress()
    return table


def distributed_epsilon_table(
    *,
    epsilon: float = 3.0,
    delta: float = 1e-5,
    planned_rounds: int = 20,
    agents: int = 20,
    clip_norm: float = 1.0,
    dimension: int = 4810,
    bits: int = 20,
    mu_factors: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 16.0),
    rounds: Sequence[int] = (1, 10, 20, 100),
) -> tuple[dp_skellam.SkellamParameters, list[dict[str, float]]]:
    """Epsilon against the per-agent ``mu`` for a worked example (``--distributed-table``).

    The scale and the reference ``mu`` are what a distributed budget of ``(epsilon, delta)`` over
    ``planned_rounds`` rounds with ``agents`` agents' noise counted calibrates to (the sum of up to
    ``agents + 4 sqrt(agents)`` shares in ``bits`` bits). Each row scales that ``mu`` and gives the Skellam
    epsilon after each count of ``rounds``, the effective noise multiplier ``sqrt(2 n mu) / Delta_2``
    (replace-one ``Delta_2``) and dp-accounting's Gaussian epsilon at the same variance and sensitivity.
    """
    reference = calibrate_skellam(
        epsilon=epsilon,
        delta=delta,
        rounds=planned_rounds,
        noise_agents=agents,
        summed_agents=math.ceil(agents + 4 * math.sqrt(agents)),
        clip_norm=clip_norm,
        dimension=dimension,
        bits=bits,
    )
    rows = []
    for factor in mu_factors:
        parameters = dp_skellam.SkellamParameters(
            **{**reference.to_json(), "agent_mu": factor * reference.agent_mu}
        )
        event = skellam_round_event(parameters=parameters, noise_agents=agents)
        z = math.sqrt(2.0 * event.mu) / event.l2_sensitivity
        row: dict[str, float] = {"factor": factor, "agent_mu": parameters.agent_mu, "noise_multiplier": z}
        for count in rounds:
            row[f"skellam_{count}"] = skellam_epsilon(
                parameters=parameters, noise_agents=agents, rounds=count, delta=delta
            )
            gaussian = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), count)
            row[f"gaussian_{count}"] = composed_epsilon([gaussian], delta=delta, accountant="rdp")
        rows.append(row)
    return reference, rows
