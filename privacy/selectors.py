"""The privacy report of a training: budget, spend by dp-accounting, what is left, and the ledger."""

from __future__ import annotations

from typing import Any

from clients.selectors import agents_eligible
from privacy.accounting import rounds_affordable
from privacy.models import PrivacyBudget
from privacy.services import budget_events, budget_next_event


def privacy_report(training: Any) -> dict[str, Any]:
    budget = PrivacyBudget.objects.filter(training=training).first()
    if budget is None:
        return {"training_id": str(training.pk), "enabled": False}
    events = budget_events(budget)
    eligible = agents_eligible().count() or budget.population
    next_event, q = budget_next_event(budget, eligible=eligible)
    affordable = rounds_affordable(
        events,
        next_event,
        epsilon=budget.epsilon,
        delta=budget.delta,
        accountant=budget.accountant,
        limit=10_000,
    )
    return {
        "training_id": str(training.pk),
        "enabled": True,
        "mode": budget.mode,
        "level": budget.level or None,
        "mechanism": budget.mechanism,
        "accountant": budget.accountant,
        "budget": {"epsilon": budget.epsilon, "delta": budget.delta},
        "noise_multiplier": budget.noise_multiplier,
        "clip_norm": budget.clip_norm,
        "adaptive_clipping": (
            {"target_quantile": budget.target_quantile, "clip_learning_rate": budget.clip_learning_rate}
            if budget.adaptive_clipping
            else None
        ),
        "expected_clients_per_round": budget.expected_clients_per_round,
        "distributed": (
            {
                "bits": budget.bits,
                "scale": budget.skellam_scale,
                "agent_mu": budget.skellam_agent_mu,
                "noise_agents": budget.noise_agents,
                "dimension": budget.dimension,
                "rounding_beta": budget.rounding_beta,
            }
            if budget.mode == PrivacyBudget.Mode.DISTRIBUTED
            else None
        ),
        "spent_epsilon": budget.spent_epsilon,
        "remaining_epsilon": max(0.0, budget.epsilon - budget.spent_epsilon),
        "fraction_spent": budget.spent_epsilon / budget.epsilon,
        "rounds_affordable": affordable,
        "next_round_sampling_probability": q,
        "ledger": [
            {
                "round": e.round_number,
                "mechanism": e.mechanism,
                "noise_multiplier": e.noise_multiplier,
                "sampling_probability": e.sampling_probability,
                "epsilon_after": e.epsilon_after,
                "event": e.event,
                "created_at": e.created_at.isoformat(),
            }
            for e in budget.ledger.order_by("round_number")
        ],
    }
