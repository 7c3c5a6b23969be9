"""Privacy accounting with Google's dp-accounting (no accountant of our own).

Each federated round is a ``PoissonSampledDpEvent`` (agents sampled independently with probability q)
over a Gaussian or Laplace event; the training's spend is the composition of every round's event, computed
by an RDP or PLD accountant. RDP cannot account Laplace with sampling, so Laplace requires PLD.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp
from dp_accounting.mechanism_calibration import ExplicitBracketInterval, calibrate_dp_mechanism
from dp_accounting.rdp import rdp_privacy_accountant

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


def make_accountant(name: str) -> dp_accounting.PrivacyAccountant:
    if name == "rdp":
        return rdp.RdpAccountant()
    if name == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    raise AccountingError(f"accountant must be one of {ACCOUNTANTS}. Found {name!r}.")


def check_supported(accountant: str, event: dp_accounting.DpEvent) -> None:
    if not make_accountant(accountant).supports(event):
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
