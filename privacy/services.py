"""Privacy budgets: creation (with calibrated noise), the guard before each round, the ledger after it."""

from __future__ import annotations

import logging
import math
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fedsite.errors import ValidationFailed
from fedsite.logs import log_event
from flcore.dp.skellam import SkellamParameters
from flcore.parameters import ParameterSpec
from monitoring.models import Alert
from monitoring.services import alert_raise, audit_record
from privacy.models import PrivacyBudget, PrivacyLedgerEntry

if TYPE_CHECKING:
    import dp_accounting

logger = logging.getLogger("privacy")

ALERT_FRACTIONS = (0.5, 0.8, 0.95)


def _accounting() -> ModuleType:
    """``privacy.accounting``, imported when first needed: it loads dp-accounting and SciPy (about a second
    of every process's start), which only a training with a privacy budget uses."""
    import privacy.accounting

    return privacy.accounting


def event_parameters(budget: PrivacyBudget, sampling_probability: float) -> tuple[float, float]:
    """The (noise multiplier, sampling probability) of the DP event one round is.

    Central DP: the server adds noise of standard deviation z*C to a sum in which one agent moves at most C,
    and samples agents in secret with probability q: the event is Gaussian(z) under Poisson(q).
    Local DP: the adversary is the server itself, which knows who was sampled, so there is no amplification
    (q = 1); and any two inputs of one agent are neighbours, so a clipped update moves by up to 2C against
    noise z*C: the event is Gaussian(z / 2) (Laplace: scale z*C against an L1 sensitivity of 2C).
    Distributed DP (Skellam): q = 1 for the same reason as local DP; the event is
    :func:`skellam_event` (the multiplier returned here is the effective one, for the ledger's column).
    """
    if budget.mode == PrivacyBudget.Mode.LOCAL:
        return budget.noise_multiplier / 2.0, 1.0
    if budget.mode == PrivacyBudget.Mode.DISTRIBUTED:
        return budget.noise_multiplier, 1.0
    return budget.noise_multiplier, sampling_probability


def skellam_parameters(budget: PrivacyBudget, *, rotation_seed: int = 0) -> SkellamParameters:
    """The Skellam parameters of a distributed-DP budget (what each agent's share is computed with)."""
    return SkellamParameters(
        clip_norm=budget.clip_norm,
        scale=float(budget.skellam_scale or 0.0),
        agent_mu=float(budget.skellam_agent_mu or 0.0),
        bits=int(budget.bits or 0),
        dimension=int(budget.dimension or 0),
        beta=float(budget.rounding_beta if budget.rounding_beta is not None else 0.0),
        rotation_seed=rotation_seed,
    )


def skellam_event(budget: PrivacyBudget) -> dp_accounting.DpEvent:
    """One round of a distributed-DP budget: the Skellam event with ``noise_agents`` agents' noise counted
    and replace-one sensitivities (the same every round: the parameters are fixed at creation)."""
    return _accounting().skellam_round_event(
        parameters=skellam_parameters(budget), noise_agents=int(budget.noise_agents or 0)
    )


def _round_event(budget: PrivacyBudget, sampling_probability: float) -> dp_accounting.DpEvent:
    if budget.mode == PrivacyBudget.Mode.DISTRIBUTED:
        return skellam_event(budget)
    multiplier, q_event = event_parameters(budget, sampling_probability)
    return _accounting().round_event(
        mechanism=budget.mechanism, noise_multiplier=multiplier, sampling_probability=q_event
    )


def budget_events(budget: PrivacyBudget) -> list[dp_accounting.DpEvent]:
    """The ledger's events, rebuilt from their parameters, in round order."""
    if budget.mode == PrivacyBudget.Mode.DISTRIBUTED:
        return [skellam_event(budget) for _ in range(budget.ledger.count())]
    return [
        _accounting().round_event(
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
    if settings_["mode"] == PrivacyBudget.Mode.DISTRIBUTED:
        return _budget_create_distributed(
            training=training,
            settings_=settings_,
            planned_rounds=planned_rounds,
            expected_clients=expected_clients,
            population=population,
        )
    local = settings_["mode"] == PrivacyBudget.Mode.LOCAL
    q = 1.0 if local else min(1.0, expected_clients / max(population, 1))
    noise = settings_.get("noise_multiplier")
    try:
        if noise is None:
            noise = _accounting().calibrate_noise_multiplier(
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
        _accounting().check_supported(
            settings_["accountant"],
            _accounting().round_event(
                mechanism=settings_["mechanism"], noise_multiplier=multiplier, sampling_probability=q
            ),
        )
        if settings_.get("adaptive_clipping"):
            _check_adaptive(noise, expected_clients, settings_)
    except _accounting().AccountingError as exc:
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


def _budget_create_distributed(
    *, training: Any, settings_: dict[str, Any], planned_rounds: int, expected_clients: int, population: int
) -> PrivacyBudget:
    """Create a distributed-Skellam budget: choose the scale and calibrate each agent's ``mu``.

    The accounting counts the noise of ``min_agents`` agents only (the smallest sum the server may
    release); the modulus is sized for the sum of up to ``expected + 4 sqrt(expected)`` agents (a Poisson
    sample of mean ``expected`` rarely exceeds it; a wrap costs accuracy, never privacy).
    """
    dimension = ParameterSpec.from_json(training.parameter_spec).num_parameters
    noise_agents = int(settings_["min_agents"])
    summed = max(noise_agents, math.ceil(expected_clients + 4.0 * math.sqrt(expected_clients)))
    try:
        parameters = _accounting().calibrate_skellam(
            epsilon=settings_["epsilon"],
            delta=settings_["delta"],
            rounds=planned_rounds,
            noise_agents=noise_agents,
            summed_agents=summed,
            clip_norm=settings_["clip_norm"],
            dimension=dimension,
            bits=settings_["bits"],
            beta=settings_["rounding_beta"],
        )
    except _accounting().AccountingError as exc:
        raise ValidationFailed(str(exc), details={"privacy.bits": str(exc)}) from exc
    # The noise standard deviation of the released sum, in model units, over the clip norm.
    effective = math.sqrt(2.0 * noise_agents * parameters.agent_mu) / parameters.scale / parameters.clip_norm
    budget = PrivacyBudget.objects.create(
        training=training,
        mode=PrivacyBudget.Mode.DISTRIBUTED,
        level=settings_.get("level") or "",
        mechanism=PrivacyBudget.Mechanism.SKELLAM,
        accountant=PrivacyBudget.Accountant.RDP,
        epsilon=settings_["epsilon"],
        delta=settings_["delta"],
        noise_multiplier=effective,
        clip_norm=settings_["clip_norm"],
        expected_clients_per_round=expected_clients,
        population=population,
        planned_rounds=planned_rounds,
        bits=parameters.bits,
        skellam_scale=parameters.scale,
        skellam_agent_mu=parameters.agent_mu,
        noise_agents=noise_agents,
        dimension=dimension,
        rounding_beta=parameters.beta,
    )
    audit_record(
        actor="system",
        action="privacy.budget_create",
        obj=budget,
        details={
            "epsilon": budget.epsilon,
            "delta": budget.delta,
            "mechanism": "skellam",
            "agent_mu": parameters.agent_mu,
            "scale": parameters.scale,
            "bits": parameters.bits,
            "noise_agents": noise_agents,
        },
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
        raise _accounting().AccountingError(
            f"{exc} With adaptive clipping the noise multiplier ({noise:.3f}) must be below "
            f"expected_clients_per_round / 10 ({expected_clients / 10:.3f}): raise max_clients_per_round, "
            "lower the noise (a larger epsilon), or turn adaptive clipping off."
        ) from exc


def budget_next_event(budget: PrivacyBudget, *, eligible: int) -> tuple[dp_accounting.DpEvent, float]:
    """The event the next round would be, for ``eligible`` agents (q = expected / eligible)."""
    q = min(1.0, budget.expected_clients_per_round / max(eligible, 1))
    return _round_event(budget, q), q


def budget_allows(budget: PrivacyBudget, event: dp_accounting.DpEvent) -> tuple[bool, float]:
    """Compose the next round's event hypothetically: may it run without overspending? Returns the epsilon
    the ledger would reach."""
    epsilon = _accounting().composed_epsilon(
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
    event = _round_event(budget, sampling_probability)
    epsilon = _accounting().composed_epsilon(
        [*budget_events(budget), event], delta=budget.delta, accountant=budget.accountant
    )
    entry = PrivacyLedgerEntry.objects.create(
        budget=budget,
        round_number=round_number,
        mechanism=budget.mechanism,
        noise_multiplier=multiplier,
        sampling_probability=q_event,
        event=_accounting().event_to_json(event),
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
