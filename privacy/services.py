"""Privacy budgets: creation (with calibrated noise), the guard before each round, the ledger after it."""

from __future__ import annotations

import logging
from typing import Any

import dp_accounting

from fedsite.errors import ValidationFailed
from fedsite.logs import log_event
from monitoring.models import Alert
from monitoring.services import alert_raise, audit_record
from privacy.accounting import (
    AccountingError,
    calibrate_noise_multiplier,
    check_supported,
    composed_epsilon,
    event_to_json,
    round_event,
)
from privacy.models import PrivacyBudget, PrivacyLedgerEntry

logger = logging.getLogger("privacy")

ALERT_FRACTIONS = (0.5, 0.8, 0.95)


def event_parameters(budget: PrivacyBudget, sampling_probability: float) -> tuple[float, float]:
    """The (noise multiplier, sampling probability) of the DP event one round is.

    Central DP: the server adds noise of standard deviation z*C to a sum in which one agent moves at most C,
    and samples agents in secret with probability q: the event is Gaussian(z) under Poisson(q).
    Local DP: the adversary is the server itself, which knows who was sampled, so there is no amplification
    (q = 1); and any two inputs of one agent are neighbours, so a clipped update moves by up to 2C against
    noise z*C: the event is Gaussian(z / 2) (Laplace: scale z*C against an L1 sensitivity of 2C).
    """
    if budget.mode == PrivacyBudget.Mode.LOCAL:
        return budget.noise_multiplier / 2.0, 1.0
    return budget.noise_multiplier, sampling_probability


def budget_events(budget: PrivacyBudget) -> list[dp_accounting.DpEvent]:
    """The ledger's events, rebuilt from their parameters, in round order."""
    return [
        round_event(
            mechanism=e.mechanism,
            noise_multiplier=e.noise_multiplier,
            sampling_probability=e.sampling_probability,
        )
        for e in budget.ledger.order_by("round_number")
    ]


def budget_create(
    *, training: Any, settings_: dict[str, Any], planned_rounds: int, expected_clients: int, population: int
) -> PrivacyBudget:
    """Create the budget of a training; calibrate the noise multiplier if the operator gave none.

    ``settings_`` is the validated privacy section of the training configuration.
    """
    local = settings_["mode"] == PrivacyBudget.Mode.LOCAL
    q = 1.0 if local else min(1.0, expected_clients / max(population, 1))
    noise = settings_.get("noise_multiplier")
    try:
        if noise is None:
            noise = calibrate_noise_multiplier(
                epsilon=settings_["epsilon"],
                delta=settings_["delta"],
                rounds=planned_rounds,
                sampling_probability=q,
                mechanism=settings_["mechanism"],
                accountant=settings_["accountant"],
            )
            if local:  # the calibrated value is the event's multiplier, z / 2 (see event_parameters)
                noise *= 2.0
        multiplier = noise / 2.0 if local else noise
        check_supported(
            settings_["accountant"],
            round_event(
                mechanism=settings_["mechanism"], noise_multiplier=multiplier, sampling_probability=q
            ),
        )
        if settings_.get("adaptive_clipping"):
            _check_adaptive(noise, expected_clients, settings_)
    except AccountingError as exc:
        raise ValidationFailed(str(exc), details={"privacy": str(exc)}) from exc
    budget = PrivacyBudget.objects.create(
        training=training,
        mode=settings_["mode"],
        level=settings_.get("level") or "",
        mechanism=settings_["mechanism"],
        accountant=settings_["accountant"],
        epsilon=settings_["epsilon"],
        delta=settings_["delta"],
        noise_multiplier=noise,
        clip_norm=settings_["clip_norm"],
        adaptive_clipping=bool(settings_.get("adaptive_clipping", False)),
        target_quantile=settings_.get("target_quantile", 0.5),
        clip_learning_rate=settings_.get("clip_learning_rate", 0.2),
        expected_clients_per_round=expected_clients,
        population=population,
        planned_rounds=planned_rounds,
    )
    audit_record(
        actor="system",
        action="privacy.budget_create",
        obj=budget,
        details={"epsilon": budget.epsilon, "delta": budget.delta, "noise_multiplier": noise},
    )
    return budget


def _check_adaptive(noise: float, expected_clients: int, settings_: dict[str, Any]) -> None:
    """Adaptive clipping spends part of the noise on the clipped count: z must stay below 2 sigma_b."""
    from flcore.dp.central import CentralDp
    from flcore.errors import ConfigError

    try:
        CentralDp(
            noise_multiplier=noise,
            clip_norm=settings_["clip_norm"],
            expected_clients_per_round=float(expected_clients),
            adaptive_clipping=True,
            target_quantile=settings_.get("target_quantile", 0.5),
            clip_learning_rate=settings_.get("clip_learning_rate", 0.2),
        )
    except ConfigError as exc:
        raise AccountingError(
            f"{exc} With adaptive clipping the noise multiplier ({noise:.3f}) must be below "
            f"expected_clients_per_round / 10 ({expected_clients / 10:.3f}): raise max_clients_per_round, "
            "lower the noise (a larger epsilon), or turn adaptive clipping off."
        ) from exc


def budget_next_event(budget: PrivacyBudget, *, eligible: int) -> tuple[dp_accounting.DpEvent, float]:
    """The event the next round would be, for ``eligible`` agents (q = expected / eligible)."""
    q = min(1.0, budget.expected_clients_per_round / max(eligible, 1))
    multiplier, q_event = event_parameters(budget, q)
    event = round_event(mechanism=budget.mechanism, noise_multiplier=multiplier, sampling_probability=q_event)
    return event, q


def budget_allows(budget: PrivacyBudget, event: dp_accounting.DpEvent) -> tuple[bool, float]:
    """Compose the next round's event hypothetically: may it run without overspending? Returns the epsilon
    the ledger would reach."""
    epsilon = composed_epsilon(
        [*budget_events(budget), event], delta=budget.delta, accountant=budget.accountant
    )
    return epsilon <= budget.epsilon, epsilon


def ledger_record(
    *, budget: PrivacyBudget, round_number: int, sampling_probability: float
) -> PrivacyLedgerEntry:
    """Record a released round (idempotent per round) and raise the 50/80/95% alerts once each."""
    existing = budget.ledger.filter(round_number=round_number).first()
    if existing is not None:
        return existing
    multiplier, q_event = event_parameters(budget, sampling_probability)
    event = round_event(mechanism=budget.mechanism, noise_multiplier=multiplier, sampling_probability=q_event)
    epsilon = composed_epsilon(
        [*budget_events(budget), event], delta=budget.delta, accountant=budget.accountant
    )
    entry = PrivacyLedgerEntry.objects.create(
        budget=budget,
        round_number=round_number,
        mechanism=budget.mechanism,
        noise_multiplier=multiplier,
        sampling_probability=q_event,
        event=event_to_json(event),
        epsilon_after=epsilon,
    )
    budget.spent_epsilon = epsilon
    fraction = epsilon / budget.epsilon
    alerted = list(budget.alerted_fractions)
    for threshold in ALERT_FRACTIONS:
        if fraction >= threshold and threshold not in alerted:
            alerted.append(threshold)
            alert_raise(
                kind=Alert.Kind.PRIVACY_BUDGET,
                training=budget.training,
                round_number=round_number,
                severity=Alert.Severity.CRITICAL if threshold >= 0.95 else Alert.Severity.WARNING,
                message=(
                    f"{threshold:.0%} of the privacy budget is spent: epsilon {epsilon:.3f} of "
                    f"{budget.epsilon} (delta {budget.delta})."
                ),
                details={"spent_epsilon": epsilon, "budget_epsilon": budget.epsilon, "fraction": fraction},
            )
    budget.alerted_fractions = alerted
    budget.save(update_fields=["spent_epsilon", "alerted_fractions"])
    log_event(
        logger,
        "privacy_spent",
        training_id=budget.training_id,
        round=round_number,
        epsilon=f"{epsilon:.4f}",
        budget=budget.epsilon,
    )
    return entry
