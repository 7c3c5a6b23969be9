"""Read side of the update statistics: a training's anomalies, the leaderboards, selection weights.

The contribution score is the running cosine estimator of Xu et al. (2021) stored per round by
:func:`monitoring.anomalies.round_analysis_record`; reading it costs one query over the statistics rows
(no blob is read). Orders are validated here, so a view maps a bad ``?order=`` to a 400 naming it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from django.conf import settings
from django.db.models import Count, Q, QuerySet

from fedsite.errors import ValidationFailed
from monitoring.models import UpdateStatistics

TRAINING_ORDERS = ("contribution", "participation", "reliability", "flags", "agent_id")
AGENT_ORDERS = ("contribution", "participation", "reliability", "flags", "trainings", "agent_id")


def training_anomalies(
    *, training: Any, round_number: int | None = None, flagged_only: bool = True
) -> QuerySet[UpdateStatistics]:
    """A training's update statistics (the flagged ones by default), by round then agent."""
    rows = UpdateStatistics.objects.filter(training=training).select_related("agent")
    if round_number is not None:
        rows = rows.filter(round_number=round_number)
    if flagged_only:
        rows = rows.filter(flagged=True)
    return rows.order_by("round_number", "agent__agent_id")


def statistics_to_dict(row: UpdateStatistics) -> dict[str, Any]:
    return {
        "round": row.round_number,
        "agent_id": row.agent.agent_id,
        "update_id": row.update_id,
        "num_examples": row.num_examples,
        "statistics": {
            "update_norm": row.update_norm,
            "cosine": row.cosine,
            "train_loss": row.train_loss,
            "loss_jump": row.loss_jump,
        },
        "scores": row.scores,
        "reasons": row.reasons,
        "flagged": row.flagged,
        "action": row.action,
        "contribution": row.contribution,
        "created_at": row.created_at.isoformat(),
    }


def parse_order(text: str | None, allowed: Sequence[str], default: str) -> tuple[str, bool]:
    """``?order=key`` (ascending) or ``?order=-key`` (descending) among ``allowed``."""
    value = text or default
    key, descending = (value[1:], True) if value.startswith("-") else (value, False)
    if key not in allowed:
        raise ValidationFailed(
            f"order must be one of {list(allowed)}, optionally prefixed with '-' for descending. "
            f"Found {value!r}.",
            details={"order": f"Unknown key {key!r}."},
        )
    return key, descending


def _sorted(rows: list[dict[str, Any]], key: str, descending: bool) -> list[dict[str, Any]]:
    """Sort by ``key``; rows without a value (``None``) come last either way; ties by agent id."""
    rows = sorted(rows, key=lambda r: r["agent_id"])
    known = [r for r in rows if r[key] is not None]
    unknown = [r for r in rows if r[key] is None]
    return sorted(known, key=lambda r: r[key], reverse=descending) + unknown


def _latest_contributions(rows: Iterable[tuple[Any, Any, int, float | None]]) -> dict[tuple[Any, Any], float]:
    """``(agent, training) -> contribution`` of the latest round that has one."""
    latest: dict[tuple[Any, Any], tuple[int, float]] = {}
    for agent_pk, training_pk, round_number, contribution in rows:
        if contribution is None:
            continue
        key = (agent_pk, training_pk)
        if key not in latest or round_number > latest[key][0]:
            latest[key] = (round_number, contribution)
    return {key: value for key, (_, value) in latest.items()}


def training_leaderboard(*, training: Any, order: str | None = None) -> dict[str, Any]:
    """Every agent that had a task in the training: participation, reliability, contribution, flags."""
    from clients.models import Agent
    from trainings.models import Round, Task  # (trainings imports this app)

    key, descending = parse_order(order, TRAINING_ORDERS, "-contribution")
    status = Task.Status
    tasks = {
        row["agent_id"]: row
        for row in Task.objects.filter(round__training=training)
        .values("agent_id")
        .annotate(
            assigned=Count("id"),
            completed=Count("id", filter=Q(status=status.COMPLETED)),
            failed=Count("id", filter=Q(status=status.FAILED)),
            expired=Count("id", filter=Q(status=status.EXPIRED)),
        )
    }
    rounds_completed = Round.objects.filter(training=training, status=Round.Status.COMPLETED).count()
    statistics = list(
        UpdateStatistics.objects.filter(training=training).values_list(
            "agent_id", "training_id", "round_number", "contribution", "flagged", "action", "cosine"
        )
    )
    contributions = _latest_contributions((a, t, r, c) for a, t, r, c, *_ in statistics)
    aggregated: dict[Any, int] = defaultdict(int)
    flags: dict[Any, int] = defaultdict(int)
    excluded: dict[Any, int] = defaultdict(int)
    cosines: dict[Any, list[float]] = defaultdict(list)
    for agent_pk, _, _, _, flagged, action, cosine in statistics:
        aggregated[agent_pk] += action != UpdateStatistics.Action.EXCLUDED
        flags[agent_pk] += bool(flagged)
        excluded[agent_pk] += action == UpdateStatistics.Action.EXCLUDED
        if cosine is not None:
            cosines[agent_pk].append(cosine)
    agents = {a.pk: a for a in Agent.objects.filter(pk__in=list(tasks))}
    rows = []
    for agent_pk, counts in tasks.items():
        finished = counts["completed"] + counts["failed"] + counts["expired"]
        rows.append(
            {
                "agent_id": agents[agent_pk].agent_id,
                "status": agents[agent_pk].status,
                "tasks": counts["assigned"],
                "completed": counts["completed"],
                "failed": counts["failed"],
                "expired": counts["expired"],
                "updates_aggregated": aggregated[agent_pk],
                "participation": aggregated[agent_pk] / rounds_completed if rounds_completed else None,
                # Beta(1, 1) prior, as Agent.reliability, over this training's tasks only
                "reliability": (counts["completed"] + 1) / (finished + 2),
                "contribution": contributions.get((agent_pk, training.pk)),
                "mean_cosine": sum(cosines[agent_pk]) / len(cosines[agent_pk]) if cosines[agent_pk] else None,
                "flags": flags[agent_pk],
                "excluded": excluded[agent_pk],
            }
        )
    return {
        "training_id": str(training.pk),
        "rounds_completed": rounds_completed,
        "order": f"{'-' if descending else ''}{key}",
        "method": CONTRIBUTION_METHOD,
        "agents": _sorted(rows, key, descending),
    }


def agents_leaderboard(*, order: str | None = None) -> dict[str, Any]:
    """Every agent across trainings: global reliability, participation, mean contribution, flags."""
    from clients.models import Agent
    from trainings.models import Task

    key, descending = parse_order(order, AGENT_ORDERS, "-contribution")
    statistics = list(
        UpdateStatistics.objects.values_list(
            "agent_id", "training_id", "round_number", "contribution", "flagged", "action"
        )
    )
    contributions = _latest_contributions((a, t, r, c) for a, t, r, c, *_ in statistics)
    per_agent: dict[Any, list[float]] = defaultdict(list)
    for (agent_pk, _), value in contributions.items():
        per_agent[agent_pk].append(value)
    aggregated: dict[Any, int] = defaultdict(int)
    flags: dict[Any, int] = defaultdict(int)
    trainings: dict[Any, set[Any]] = defaultdict(set)
    for agent_pk, training_pk, _, _, flagged, action in statistics:
        aggregated[agent_pk] += action != UpdateStatistics.Action.EXCLUDED
        flags[agent_pk] += bool(flagged)
        trainings[agent_pk].add(training_pk)
    assigned = dict(Task.objects.values("agent_id").annotate(n=Count("id")).values_list("agent_id", "n"))
    rows = []
    for agent in Agent.objects.all():
        values = per_agent.get(agent.pk, [])
        rows.append(
            {
                "agent_id": agent.agent_id,
                "status": agent.status,
                "tasks": assigned.get(agent.pk, 0),
                "updates_aggregated": aggregated[agent.pk],
                "participation": aggregated[agent.pk] / assigned[agent.pk]
                if assigned.get(agent.pk)
                else None,
                "reliability": agent.reliability,
                "contribution": sum(values) / len(values) if values else None,
                "trainings": len(trainings[agent.pk]),
                "flags": flags[agent.pk],
            }
        )
    return {
        "order": f"{'-' if descending else ''}{key}",
        "method": CONTRIBUTION_METHOD,
        "agents": _sorted(rows, key, descending),
    }


def contribution_weights(*, training: Any, agents: Sequence[Any]) -> dict[Any, float]:
    """Selection factor per agent: ``(1 - W) + W * max(contribution, 0)``, floored at 0.01 so that every
    eligible agent keeps a chance; an agent not measured yet in this training gets the neutral
    contribution 0.5 (``W = FEDSITE_SELECTION_CONTRIBUTION_WEIGHT``)."""
    weight = settings.FEDSITE_SELECTION_CONTRIBUTION_WEIGHT
    rows = UpdateStatistics.objects.filter(training=training, agent__in=list(agents)).values_list(
        "agent_id", "training_id", "round_number", "contribution"
    )
    latest = _latest_contributions(rows)
    factors = {}
    for agent in agents:
        contribution = latest.get((agent.pk, training.pk), 0.5)
        factors[agent.pk] = max(0.01, (1.0 - weight) + weight * max(contribution, 0.0))
    return factors


CONTRIBUTION_METHOD = (
    "running cosine similarity of each update to the previous global step, r <- d*r + (1-d)*cos "
    "(Xu et al. 2021, NeurIPS); see docs/monitoring.md"
)


def agent_contributions(*, agent: Any) -> dict[str, Any]:
    """One agent's contribution per training (the latest running estimate of each) and their mean, which
    is the ``contribution`` of its row in :func:`agents_leaderboard`; with updates aggregated and flags."""
    from trainings.models import Training

    statistics = list(
        UpdateStatistics.objects.filter(agent=agent).values_list(
            "agent_id", "training_id", "round_number", "contribution", "flagged", "action"
        )
    )
    latest = _latest_contributions((a, t, r, c) for a, t, r, c, *_ in statistics)
    per_training: dict[Any, dict[str, Any]] = {}
    for _, training_pk, round_number, _, flagged, action in statistics:
        entry = per_training.setdefault(
            training_pk, {"updates": 0, "aggregated": 0, "flags": 0, "excluded": 0, "last_round": 0}
        )
        entry["updates"] += 1
        entry["aggregated"] += action != UpdateStatistics.Action.EXCLUDED
        entry["excluded"] += action == UpdateStatistics.Action.EXCLUDED
        entry["flags"] += bool(flagged)
        entry["last_round"] = max(entry["last_round"], round_number)
    names = dict(Training.objects.filter(pk__in=list(per_training)).values_list("pk", "name"))
    trainings = [
        {
            "training_id": str(training_pk),
            "training_name": names.get(training_pk, ""),
            "contribution": latest.get((agent.pk, training_pk)),
            **entry,
        }
        for training_pk, entry in per_training.items()
    ]
    trainings.sort(key=lambda row: (row["training_name"], row["training_id"]))
    values = [row["contribution"] for row in trainings if row["contribution"] is not None]
    return {
        "contribution": sum(values) / len(values) if values else None,
        "flags": sum(row["flags"] for row in trainings),
        "updates_aggregated": sum(row["aggregated"] for row in trainings),
        "trainings": trainings,
        "method": CONTRIBUTION_METHOD,
    }
