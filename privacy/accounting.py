"""Privacy accounting with Google's dp-accounting (no accountant of our own).

Each federated round is a ``PoissonSampledDpEvent`` (agents sampled independently with probability q)
over a Gaussian or Laplace event; the training's spend is the composition of every round's event, computed
by an RDP or PLD accountant. RDP cannot account Laplace with sampling, so Laplace requires PLD.

Distributed DP (the Skellam mechanism, :mod:`flcore.dp.skellam`) has no event in dp-accounting: a round is
a :class:`SkellamDpEvent`, and the RDP accountant (:class:`RdpAccountant`, dp-accounting's with one more
event type) adds the paper's RDP bound order by order, so composition, grouping, the ledger's conversion to
``(epsilon, delta)`` (dp-accounting's ``compute_epsilon``, Canonne, Kamath and Steinke 2020, Prop. 12) and
:func:`rounds_affordable` are the same code as for Gaussian rounds. A Skellam round is never amplified by
sampling (the server that runs secure aggregation knows who took part), so it is never wrapped in a
``PoissonSampledDpEvent``; PLD cannot account it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import attr
import dp_accounting
import numpy as np
from dp_accounting import pld, rdp
from dp_accounting.mechanism_calibration import ExplicitBracketInterval, calibrate_dp_mechanism
from dp_accounting.rdp import rdp_privacy_accountant
from scipy.stats import norm

from flcore.dp.skellam import SkellamParameters, aggregate_coordinate_bound, padded_dimension, skellam_rdp

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting logs every excluded RDP order

ACCOUNTANTS = ("rdp", "pld")
MECHANISMS = ("gaussian", "laplace")
PLD_VALUE_DISCRETIZATION = 1e-4


class AccountingError(ValueError):
    """An accounting request dp-accounting cannot answer (named parameters)."""


def round_event(
    *, mechanism: str, noise_multiplier: float, sampling_probability: float
) -> dp_accounting.DpEvent:
    """The DP event of one round: the mechanism on the clipped sum, under Poisson sampling at rate q."""
    if mechanism not in MECHANISMS:
        raise AccountingError(f"mechanism must be one of {MECHANISMS}. Found {mechanism!r}.")
    if not noise_multiplier > 0:
        raise AccountingError(f"noise_multiplier must be positive. Found {noise_multiplier}.")
    if not 0 < sampling_probability <= 1:
        raise AccountingError(f"sampling_probability must be in (0, 1]. Found {sampling_probability}.")
    base: dp_accounting.DpEvent = (
        dp_accounting.GaussianDpEvent(noise_multiplier)
        if mechanism == "gaussian"
        else dp_accounting.LaplaceDpEvent(noise_multiplier)
    )
    if sampling_probability >= 1:
        return base
    return dp_accounting.PoissonSampledDpEvent(sampling_probability, base)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SkellamDpEvent(dp_accounting.DpEvent):
    """One release of the Skellam mechanism: integer query plus ``Sk(mu)`` noise per coordinate.

    ``l1_sensitivity`` and ``l2_sensitivity`` are the query's (in integer units, after scaling and
    rounding); ``mu`` is the Poisson mean of the TOTAL noise (``n`` agents adding ``Sk(mu_i)``: ``sum mu_i``).
    """

    l1_sensitivity: float
    l2_sensitivity: float
    mu: float


class RdpAccountant(rdp.RdpAccountant):
    """dp-accounting's RDP accountant, which also composes :class:`SkellamDpEvent` (Agarwal et al. 2021,
    Theorem 3.5, :func:`flcore.dp.skellam.skellam_rdp`). Every other event is dp-accounting's own code."""

    def _maybe_compose(
        self, event: dp_accounting.DpEvent, count: int, do_compose: bool
    ) -> rdp.RdpAccountant.CompositionErrorDetails | None:
        if isinstance(event, SkellamDpEvent):
            if do_compose:
                self._rdp += count * skellam_rdp(
                    self._orders,
                    l1_sensitivity=event.l1_sensitivity,
                    l2_sensitivity=event.l2_sensitivity,
                    mu=event.mu,
                )
            return None
        return super()._maybe_compose(event, count, do_compose)


def make_accountant(name: str) -> dp_accounting.PrivacyAccountant:
    if name == "rdp":
        return RdpAccountant()
    if name == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    raise AccountingError(f"accountant must be one of {ACCOUNTANTS}. Found {name!r}.")


def _has_skellam(event: dp_accounting.DpEvent) -> bool:
    if isinstance(event, SkellamDpEvent):
        return True
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return any(_has_skellam(inner) for inner in event.events)
    inner = getattr(event, "event", None)
    return isinstance(inner, dp_accounting.DpEvent) and _has_skellam(inner)


def check_supported(accountant: str, event: dp_accounting.DpEvent) -> None:
    if not make_accountant(accountant).supports(event):
        if _has_skellam(event):
            raise AccountingError(
                f"The {accountant} accountant cannot account SkellamDpEvent events: the Skellam mechanism is "
                "accounted by its RDP bound (Agarwal et al. 2021), without amplification by sampling; use "
                "accountant 'rdp'."
            )
        raise AccountingError(
            f"The {accountant} accountant cannot account {type(event).__name__} events "
            "(RDP does not support Laplace with sampling); use accountant 'pld'."
        )


def composed_epsilon(events: Sequence[dp_accounting.DpEvent], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (0 for none)."""
    if not events:
        return 0.0
    if not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1). Found {delta}.")
    acc = make_accountant(accountant)
    composed = group_events(events)
    check_supported(accountant, composed)
    acc.compose(composed)
    return float(acc.get_epsilon(delta))


def group_events(events: Sequence[dp_accounting.DpEvent]) -> dp_accounting.DpEvent:
    """Compose ``events`` with identical rounds grouped into one ``SelfComposedDpEvent`` each.

    Composition is commutative, so this is the same privacy loss; accountants handle a k-fold
    self-composition in one step, so a long ledger of mostly identical rounds costs almost nothing.
    """
    counts: dict[dp_accounting.DpEvent, int] = {}
    for event in events:
        counts[event] = counts.get(event, 0) + 1
    return dp_accounting.ComposedDpEvent(
        [
            event if count == 1 else dp_accounting.SelfComposedDpEvent(event, count)
            for event, count in counts.items()
        ]
    )


def calibrate_noise_multiplier(
    *, epsilon: float, delta: float, rounds: int, sampling_probability: float, mechanism: str, accountant: str
) -> float:
    """The smallest noise multiplier for which ``rounds`` rounds spend at most ``epsilon`` at ``delta``."""
    if not epsilon > 0:
        raise AccountingError(f"epsilon must be positive. Found {epsilon}.")
    if rounds < 1:
        raise AccountingError(f"rounds must be at least 1. Found {rounds}.")
    check_supported(
        accountant,
        round_event(mechanism=mechanism, noise_multiplier=1.0, sampling_probability=sampling_probability),
    )

    def event_for(noise_multiplier: float) -> dp_accounting.DpEvent:
        one = round_event(
            mechanism=mechanism, noise_multiplier=noise_multiplier, sampling_probability=sampling_probability
        )
        return dp_accounting.SelfComposedDpEvent(one, rounds)

    try:
        value = calibrate_dp_mechanism(
            lambda: make_accountant(accountant),
            event_for,
            epsilon,
            delta,
            bracket_interval=ExplicitBracketInterval(1e-3, 1e4),
            tol=1e-4,
        )
    except Exception as exc:  # dp-accounting raises plain errors when no value in the bracket works
        raise AccountingError(
            f"No noise multiplier in [0.001, 10000] gives epsilon {epsilon} at delta {delta} over {rounds} "
            f"rounds with sampling probability {sampling_probability}: {exc}"
        ) from exc
    return float(value)


def rounds_affordable(
    events: Sequence[dp_accounting.DpEvent],
    next_event: dp_accounting.DpEvent,
    *,
    epsilon: float,
    delta: float,
    accountant: str,
    limit: int = 100_000,
) -> int:
    """How many more rounds like ``next_event`` fit in the budget after ``events`` (bisection)."""

    if accountant == "rdp":
        # RDP adds up order by order: compute the ledger's and one round's RDP curves once, then each
        # candidate count is a vector sum and one conversion (same numbers as composing the events).
        ledger_accountant = make_accountant("rdp")
        if events:
            ledger_accountant.compose(group_events(events))
        round_accountant = make_accountant("rdp")
        round_accountant.compose(next_event)
        orders = ledger_accountant._orders  # dp-accounting exposes no public getter for these
        ledger_rdp = np.asarray(ledger_accountant._rdp, dtype=np.float64)
        round_rdp = np.asarray(round_accountant._rdp, dtype=np.float64)

        def fits(count: int) -> bool:
            if not events and count == 0:
                return True
            total = ledger_rdp + count * round_rdp if count else ledger_rdp  # inf * 0 would be nan
            value, _ = rdp_privacy_accountant.compute_epsilon(orders, total, delta)
            return float(value) <= epsilon
    else:

        def fits(count: int) -> bool:
            extra = [dp_accounting.SelfComposedDpEvent(next_event, count)] if count else []
            return composed_epsilon([*events, *extra], delta=delta, accountant=accountant) <= epsilon

    if not fits(0):
        return 0
    low, high = 0, 1
    while high <= limit and fits(high):
        low, high = high, high * 2
    if high > limit:
        return limit
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def event_to_json(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """dp-accounting's named-tuple form, as plain JSON (for the ledger and audits)."""

    def convert(value: Any) -> Any:
        if hasattr(value, "_asdict"):
            return {key: convert(item) for key, item in value._asdict().items()}
        if isinstance(value, list | tuple):
            return [convert(item) for item in value]
        return value

    return convert(event.to_named_tuple())


# ---------------------------------------------------------------------------------------------------------
# Distributed DP: the Skellam mechanism
# ---------------------------------------------------------------------------------------------------------
OVERFLOW_PROBABILITY = 1e-3
"""Chance (union bound over coordinates, Gaussian approximation) that a round's modular sum wraps."""

_RTOL = 1e-6
_MAX_STEPS = 200


def skellam_round_event(
    *, parameters: SkellamParameters, noise_agents: int, replace_one: bool = True
) -> SkellamDpEvent:
    """The event of one distributed-Skellam round whose sum carries the noise of ``noise_agents`` agents.

    ``replace_one`` (the default, and what the ledger uses): neighbouring inputs are any two updates of one
    agent, so the sum moves by the difference of two rounded vectors, up to ``2 Delta_2`` (L2) and
    ``2 Delta_1`` (L1), as for local DP (the server knows who took part). ``False`` gives the paper's
    sensitivities ``Delta_2, Delta_1`` (one agent's vector against none).
    """
    if isinstance(noise_agents, bool) or not isinstance(noise_agents, int) or noise_agents < 1:
        raise AccountingError(f"noise_agents must be a positive integer. Found {noise_agents!r}.")
    factor = 2.0 if replace_one else 1.0
    return SkellamDpEvent(
        l1_sensitivity=factor * parameters.l1_sensitivity,
        l2_sensitivity=factor * parameters.l2_sensitivity,
        mu=noise_agents * parameters.agent_mu,
    )


def skellam_epsilon(
    *, parameters: SkellamParameters, noise_agents: int, rounds: int, delta: float, replace_one: bool = True
) -> float:
    """Epsilon at ``delta`` of ``rounds`` distributed-Skellam rounds (RDP, dp-accounting's conversion)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise AccountingError(f"rounds must be a positive integer. Found {rounds!r}.")
    event = skellam_round_event(parameters=parameters, noise_agents=noise_agents, replace_one=replace_one)
    return composed_epsilon([dp_accounting.SelfComposedDpEvent(event, rounds)], delta=delta, accountant="rdp")


def _with_mu(parameters: SkellamParameters, agent_mu: float) -> SkellamParameters:
    return SkellamParameters(**{**parameters.to_json(), "agent_mu": agent_mu})


def calibrate_skellam_mu(
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    noise_agents: int,
    clip_norm: float,
    scale: float,
    dimension: int,
    bits: int = 32,
    beta: float | None = None,
    replace_one: bool = True,
) -> float:
    """The smallest per-agent ``mu`` (relative 1e-6) for which ``rounds`` rounds spend at most ``epsilon``.

    Bisection on ``log mu``; the upper end of the final bracket is returned, so the spend at the returned
    value never exceeds ``epsilon`` (epsilon decreases as ``mu`` grows). The inverse is
    :func:`skellam_epsilon`.
    """
    if not epsilon > 0:
        raise AccountingError(f"epsilon must be positive. Found {epsilon}.")
    base = SkellamParameters(
        clip_norm=clip_norm,
        scale=scale,
        agent_mu=1.0,
        bits=bits,
        dimension=dimension,
        **({} if beta is None else {"beta": beta}),
    )

    def spent(mu: float) -> float:
        return skellam_epsilon(
            parameters=_with_mu(base, mu),
            noise_agents=noise_agents,
            rounds=rounds,
            delta=delta,
            replace_one=replace_one,
        )

    low = high = 1.0
    for _ in range(_MAX_STEPS):
        if spent(high) <= epsilon:
            break
        low, high = high, high * 4.0
    else:
        raise AccountingError(f"No per-agent mu up to {high:.3g} gives epsilon {epsilon} at delta {delta}.")
    if low == high:
        for _ in range(_MAX_STEPS):
            low = low / 4.0
            if spent(low) > epsilon:
                break
            high = low
        else:
            return high  # epsilon met with vanishing noise (a huge budget)
    while high / low - 1.0 > _RTOL:
        middle = math.sqrt(low * high)
        if spent(middle) <= epsilon:
            high = middle
        else:
            low = middle
    return high


def overflow_stddevs(dimension: int, probability: float = OVERFLOW_PROBABILITY) -> float:
    """``k`` such that a Gaussian coordinate exceeds ``k`` standard deviations in any of ``d'`` coordinates
    with probability at most ``probability`` (union bound): ``Phi^-1(1 - probability / (2 d'))``."""
    return float(norm.isf(probability / (2.0 * padded_dimension(dimension))))


def calibrate_skellam(
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    noise_agents: int,
    summed_agents: int,
    clip_norm: float,
    dimension: int,
    bits: int,
    beta: float | None = None,
) -> SkellamParameters:
    """Choose the scale ``s`` and the per-agent ``mu`` of a distributed-Skellam training.

    For each candidate ``s``, ``mu(s)`` is :func:`calibrate_skellam_mu` (``noise_agents`` agents' noise
    counted, replace-one sensitivity); the largest ``s`` is kept for which the sum of ``summed_agents``
    shares stays within ``k`` standard deviations of the modulus's centred range
    (:func:`flcore.dp.skellam.aggregate_coordinate_bound` with :func:`overflow_stddevs`), found by
    bisection on ``log s``. A larger ``s`` means less rounding error relative to the signal, so this is the
    most accurate setting that fits ``bits``.

    Raises
    ------
    AccountingError
        If even a vanishing scale overflows ``bits`` (the rounding noise alone is too wide: more bits).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 62:
        raise AccountingError(f"bits must be an integer in [2, 62]. Found {bits!r}.")
    stddevs = overflow_stddevs(dimension)
    half_range = float(1 << (bits - 1))

    def mu_for(scale: float) -> float:
        return calibrate_skellam_mu(
            epsilon=epsilon,
            delta=delta,
            rounds=rounds,
            noise_agents=noise_agents,
            clip_norm=clip_norm,
            scale=scale,
            dimension=dimension,
            bits=bits,
            beta=beta,
        )

    def fits(scale: float) -> tuple[bool, float]:
        mu = mu_for(scale)
        bound = aggregate_coordinate_bound(
            num_agents=summed_agents,
            clip_norm=clip_norm,
            scale=scale,
            dimension=dimension,
            agent_mu=mu,
            stddevs=stddevs,
        )
        return bound <= half_range, mu

    low = 1e-3 / clip_norm  # c s = 0.001: the clipped update is almost all rounding noise
    ok, mu_low = fits(low)
    if not ok:
        raise AccountingError(
            f"bits {bits} cannot hold the sum of {summed_agents} agents' Skellam shares of a "
            f"{dimension}-parameter model at epsilon {epsilon} over {rounds} rounds even at a vanishing "
            "scale: raise bits."
        )
    high = low
    best = (low, mu_low)
    for _ in range(_MAX_STEPS):
        high = high * 4.0
        ok, mu = fits(high)
        if not ok:
            break
        best, low = (high, mu), high
    while high / low - 1.0 > 1e-3:
        middle = math.sqrt(low * high)
        ok, mu = fits(middle)
        if ok:
            best, low = (middle, mu), middle
        else:
            high = middle
    scale, mu = best
    return SkellamParameters(
        clip_norm=clip_norm,
        scale=scale,
        agent_mu=mu,
        bits=bits,
        dimension=dimension,
        **({} if beta is None else {"beta": beta}),
    )
