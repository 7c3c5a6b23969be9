"""Anomaly detection on a round's updates, and the agents' contribution estimates.

Statistics per update, all taken without an extra read of the update blobs:

- ``update_norm``: the L2 norm measured when the upload was validated (``ClientUpdate.update_norm``);
- ``cosine``: cosine similarity to the *reference direction* ``g``, the step that produced the round's base
  version (its parameters minus its parent's: the direction the global model last moved). The dot products
  ``<u_i, g>`` are taken inside the aggregation pass (``Strategy.combine_measured``), while each chunk of an
  update is in cache. The cosine to the round's own aggregate would need either the Gram matrix of the
  updates (``<u_i, agg> = sum_j w_j <u_i, u_j> / W``: O(n^2 P) time and all updates at once) or a second
  pass once the aggregate is known; ``g`` is known before the pass, costs O(P) per update and one model of
  memory, and is the aggregate of the previous round up to the server optimizer. A round whose base
  version has no parent (round 1) has no reference: its cosine is null and not scored;
- ``train_loss``: the training loss the agent reported with the update (``metrics.train_loss``);
- ``loss_jump``: that loss minus the agent's reported loss in its previous round of this training.

Each statistic with at least ``FEDSITE_ANOMALY_MIN_UPDATES`` values in the round gets robust z-scores
(median/MAD, :func:`monitoring.analytics.robust_z_scores`, the spread floored by
``FEDSITE_ANOMALY_MIN_SPREAD``, see :func:`_spread_floor`); an update is flagged when a score passes its
threshold in the suspicious direction: ``update_norm`` either way (boosted or empty updates),
``cosine`` downwards, ``train_loss`` and ``loss_jump`` upwards.

Invariants: the analysis (:func:`round_analyse`) is pure given its inputs, so an aggregation retry
recomputes the same flags; it is stored (:func:`round_analysis_record`) in the transaction that commits the
round's version, one row per update (``update_or_create``), with the alert and any quarantine; an excluded
update is never part of the committed aggregate.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from monitoring.analytics import robust_z_scores
from monitoring.models import Alert, AuditLog, UpdateStatistics
from monitoring.services import alert_raise, alert_resolve, audit_record

STATISTICS = ("update_norm", "cosine", "train_loss", "loss_jump")
"""The statistics scored, in the order they are reported."""
DIRECTIONS = {"update_norm": "both", "cosine": "low", "train_loss": "high", "loss_jump": "high"}
"""Which side of the median is suspicious for each statistic."""
ACTIONS = ("flag", "exclude")
QUARANTINE_ACTOR = "system:anomaly-detector"


@dataclass(frozen=True)
class AnomalyPolicy:
    """A training's anomaly policy: thresholds per statistic, the action and the quarantine rule."""

    enabled: bool
    thresholds: Mapping[str, float]
    action: str = "flag"
    quarantine_after: int | None = None


def anomaly_policy_parse(value: Any) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Validate a training configuration's ``anomaly`` block; return it normalised and the errors.

    ``{"enabled": true, "threshold": 3.5, "thresholds": {"cosine": 3.0}, "action": "flag" | "exclude",
    "quarantine_after": 3}``, every key optional; ``null`` means the defaults. Error keys name the field
    (``anomaly.threshold``, ``anomaly.thresholds.cosine``, ...).
    """
    if value is None:
        return None, {}
    if not isinstance(value, dict):
        return None, {"anomaly": f"Must be a JSON object or null. Found {value!r}."}
    errors: dict[str, str] = {}
    known = {"enabled", "threshold", "thresholds", "action", "quarantine_after"}
    for key in sorted(set(value) - known):
        errors[f"anomaly.{key}"] = f"Unknown field. Known fields: {sorted(known)}."
    policy: dict[str, Any] = {
        "enabled": True,
        "threshold": settings.FEDSITE_ANOMALY_THRESHOLD,
        "thresholds": {},
        "action": settings.FEDSITE_ANOMALY_ACTION,
        "quarantine_after": None,
    }
    if "enabled" in value:
        if not isinstance(value["enabled"], bool):
            errors["anomaly.enabled"] = f"Must be true or false. Found {value['enabled']!r}."
        else:
            policy["enabled"] = value["enabled"]
    if "threshold" in value:
        threshold = value["threshold"]
        if _positive_number(threshold):
            policy["threshold"] = float(threshold)
        else:
            errors["anomaly.threshold"] = f"Must be a finite number above 0. Found {threshold!r}."
    if "thresholds" in value:
        thresholds = value["thresholds"]
        if not isinstance(thresholds, dict):
            errors["anomaly.thresholds"] = (
                f"Must be a JSON object of statistic to threshold, statistics {list(STATISTICS)}. "
                f"Found {thresholds!r}."
            )
        else:
            for name, threshold in thresholds.items():
                if name not in STATISTICS:
                    errors[f"anomaly.thresholds.{name}"] = f"Unknown statistic. Known: {list(STATISTICS)}."
                elif threshold is not None and not _positive_number(threshold):
                    errors[f"anomaly.thresholds.{name}"] = (
                        f"Must be a finite number above 0, or null to not score it. Found {threshold!r}."
                    )
                else:
                    policy["thresholds"][name] = None if threshold is None else float(threshold)
    if "action" in value:
        if value["action"] not in ACTIONS:
            errors["anomaly.action"] = f"Must be one of {list(ACTIONS)}. Found {value['action']!r}."
        else:
            policy["action"] = value["action"]
    if "quarantine_after" in value and value["quarantine_after"] is not None:
        count = value["quarantine_after"]
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1_000_000:
            errors["anomaly.quarantine_after"] = (
                f"Must be an integer of at least 1 (flags before the agent is quarantined), or null. "
                f"Found {count!r}."
            )
        else:
            policy["quarantine_after"] = count
    return (None if errors else policy), errors


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def anomaly_policy(block: Mapping[str, Any] | None) -> AnomalyPolicy:
    """The policy of a training from its configuration's (validated) ``anomaly`` block, or the settings."""
    block = block or {}
    enabled = bool(block.get("enabled", True)) and settings.FEDSITE_ANOMALY_DETECTION
    default = float(block.get("threshold", settings.FEDSITE_ANOMALY_THRESHOLD))
    given = block.get("thresholds") or {}
    thresholds = {name: given.get(name, default) for name in STATISTICS}
    return AnomalyPolicy(
        enabled=enabled,
        thresholds={k: float(v) for k, v in thresholds.items() if v is not None},
        action=str(block.get("action", settings.FEDSITE_ANOMALY_ACTION)),
        quarantine_after=block.get("quarantine_after"),
    )


@dataclass(frozen=True)
class UpdateMeasurement:
    """The statistics of one update (``None``: not available in this round)."""

    update_id: int
    agent_pk: Any
    num_examples: int
    update_norm: float
    cosine: float | None
    train_loss: float | None
    loss_jump: float | None

    def value(self, name: str) -> float | None:
        value = getattr(self, name)
        return None if value is None else float(value)


@dataclass(frozen=True)
class RoundAnalysis:
    """The statistics, scores and decisions of one round, in the order of ``measurements``."""

    measurements: list[UpdateMeasurement]
    scores: list[dict[str, float]]
    reasons: list[list[str]]
    policy: AnomalyPolicy
    reference_norm: float | None
    excluded: frozenset[int] = field(default_factory=frozenset)

    @property
    def flagged(self) -> list[UpdateMeasurement]:
        return [m for m, why in zip(self.measurements, self.reasons, strict=True) if why]

    def with_exclusions(self, update_ids: frozenset[int]) -> RoundAnalysis:
        return RoundAnalysis(
            self.measurements, self.scores, self.reasons, self.policy, self.reference_norm, update_ids
        )

    def metrics(self) -> dict[str, float]:
        """The round metrics the analysis adds (``anomaly_flagged``, ``anomaly_excluded``)."""
        return {"anomaly_flagged": float(len(self.flagged)), "anomaly_excluded": float(len(self.excluded))}


def measurements_build(
    *,
    updates: Sequence[Any],
    dots: Sequence[float] | None,
    reference_norm: float | None,
    previous_losses: Mapping[Any, float],
) -> list[UpdateMeasurement]:
    """Turn a round's updates (``ClientUpdate`` rows), their reference dots and the agents' previous
    reported losses into measurements. ``dots[i]`` is ``<u_i, g>``; the cosine is null where ``g`` or the
    update is zero."""
    out: list[UpdateMeasurement] = []
    for i, update in enumerate(updates):
        cosine = None
        if dots is not None and reference_norm and update.update_norm > 0:
            cosine = max(-1.0, min(1.0, float(dots[i]) / (update.update_norm * reference_norm)))
        loss = update.metrics.get("train_loss")
        loss = float(loss) if isinstance(loss, int | float) and math.isfinite(loss) else None
        previous = previous_losses.get(update.agent_id)
        out.append(
            UpdateMeasurement(
                update_id=update.pk,
                agent_pk=update.agent_id,
                num_examples=update.num_examples,
                update_norm=float(update.update_norm),
                cosine=cosine,
                train_loss=loss,
                loss_jump=None if loss is None or previous is None else loss - previous,
            )
        )
    return out


def round_analyse(
    measurements: Sequence[UpdateMeasurement], policy: AnomalyPolicy, *, reference_norm: float | None
) -> RoundAnalysis:
    """Score every statistic with robust z-scores and flag the updates past a threshold (pure)."""
    scores: list[dict[str, float]] = [{} for _ in measurements]
    reasons: list[list[str]] = [[] for _ in measurements]
    for name in STATISTICS:
        present = [(i, m.value(name)) for i, m in enumerate(measurements) if m.value(name) is not None]
        if len(present) < settings.FEDSITE_ANOMALY_MIN_UPDATES:
            continue
        values = [v for _, v in present if v is not None]
        z = robust_z_scores(values, min_scale=_spread_floor(name, values, measurements))
        threshold = policy.thresholds.get(name)
        for (i, _), score in zip(present, z, strict=True):
            scores[i][name] = score
            if threshold is None or not policy.enabled:
                continue
            direction = DIRECTIONS[name]
            suspicious = {"both": abs(score), "low": -score, "high": score}[direction]
            if suspicious > threshold:
                reasons[i].append(name)
    return RoundAnalysis(list(measurements), scores, reasons, policy, reference_norm)


def _spread_floor(name: str, values: Sequence[float], measurements: Sequence[UpdateMeasurement]) -> float:
    """The smallest spread a statistic's z-scores divide by: ``FEDSITE_ANOMALY_MIN_SPREAD`` (m) in cosine
    units for ``cosine`` (bounded in [-1, 1]), else m times the round's median magnitude of the statistic
    (for ``loss_jump``, of the reported loss). Honest updates of a converging model agree closely, so
    their MAD alone is tiny and would turn ordinary differences into large scores."""
    m = settings.FEDSITE_ANOMALY_MIN_SPREAD
    if name == "cosine":
        return float(m)
    if name == "loss_jump":
        losses = [x.train_loss for x in measurements if x.train_loss is not None]
        return float(m * abs(statistics.median(losses))) if losses else 0.0
    return float(m * abs(statistics.median(values)))


def previous_losses(*, training: Any, round_number: int, agent_pks: Sequence[Any]) -> dict[Any, float]:
    """Each agent's reported ``train_loss`` in its latest earlier round of this training (one query)."""
    from trainings.models import ClientUpdate  # (trainings imports this app)

    latest: dict[Any, float] = {}
    rows = (
        ClientUpdate.objects.filter(
            round__training=training, round__number__lt=round_number, agent_id__in=list(agent_pks)
        )
        .order_by("agent_id", "-round__number")
        .values_list("agent_id", "metrics")
    )
    for agent_pk, metrics in rows:
        loss = (metrics or {}).get("train_loss")
        if agent_pk not in latest and isinstance(loss, int | float) and math.isfinite(loss):
            latest[agent_pk] = float(loss)
    return latest


def _previous_contributions(
    *, training: Any, round_number: int, agent_pks: Sequence[Any]
) -> dict[Any, float]:
    latest: dict[Any, float] = {}
    rows = (
        UpdateStatistics.objects.filter(
            training=training, round_number__lt=round_number, agent_id__in=list(agent_pks)
        )
        .exclude(contribution=None)
        .order_by("agent_id", "-round_number")
        .values_list("agent_id", "contribution")
    )
    for agent_pk, value in rows:
        latest.setdefault(agent_pk, float(value))
    return latest


def contribution_next(previous: float | None, psi: float | None, *, decay: float) -> float | None:
    """One step of the running contribution estimate ``r <- decay * r + (1 - decay) * psi``.

    Xu, Lyu, Ma, Miao, Foo and Low (2021), "Gradient-Driven Rewards to Guarantee Fairness in Collaborative
    Machine Learning", NeurIPS: an agent's per-round contribution is the cosine similarity of its update to
    the federation's direction, ``psi_i = cos(u_i, g)`` (they show it approximates the agent's Shapley
    value for a linearised utility), accumulated as a moving average. The first measured round starts it at
    ``psi``; a round without a reference leaves it unchanged.
    """
    if psi is None:
        return previous
    if previous is None:
        return psi
    return decay * previous + (1.0 - decay) * psi


#: What a round's analysis writes in each update's statistics row (all but the update and its creation).
STATISTICS_FIELDS = [
    "training",
    "round_number",
    "agent",
    "num_examples",
    "update_norm",
    "cosine",
    "train_loss",
    "loss_jump",
    "scores",
    "reasons",
    "flagged",
    "action",
    "contribution",
]


def round_analysis_record(
    *, training: Any, round_number: int, analysis: RoundAnalysis
) -> list[UpdateStatistics]:
    """Store a round's statistics, raise or resolve the training's anomaly alert, quarantine repeat offenders.

    Runs inside the transaction that commits the round's version. The alert (kind ``update_anomaly``,
    subject ``training:<id>/anomaly``) is one open alert per training: each round with flags counts a
    repeat; a round analysed without a flag resolves it.
    """
    from clients.models import Agent

    measurements = analysis.measurements
    agent_pks = [m.agent_pk for m in measurements]
    before = _previous_contributions(training=training, round_number=round_number, agent_pks=agent_pks)
    decay = settings.FEDSITE_CONTRIBUTION_DECAY
    rows: list[UpdateStatistics] = []
    for measurement, scores, reasons in zip(measurements, analysis.scores, analysis.reasons, strict=True):
        if not reasons:
            action = UpdateStatistics.Action.NONE
        elif measurement.update_id in analysis.excluded:
            action = UpdateStatistics.Action.EXCLUDED
        else:
            action = UpdateStatistics.Action.FLAGGED
        rows.append(
            UpdateStatistics(
                update_id=measurement.update_id,
                training=training,
                round_number=round_number,
                agent_id=measurement.agent_pk,
                num_examples=measurement.num_examples,
                update_norm=measurement.update_norm,
                cosine=measurement.cosine,
                train_loss=measurement.train_loss,
                loss_jump=measurement.loss_jump,
                scores=scores,
                reasons=reasons,
                flagged=bool(reasons),
                action=action,
                contribution=contribution_next(
                    before.get(measurement.agent_pk), measurement.cosine, decay=decay
                ),
            )
        )
    # One statement for the round's rows (a retried commit of the round overwrites them, as before).
    UpdateStatistics.objects.bulk_create(
        rows, update_conflicts=True, unique_fields=["update"], update_fields=STATISTICS_FIELDS
    )
    flagged = [row for row in rows if row.flagged]
    subject = f"training:{training.pk}/anomaly"
    if flagged:
        names = dict(Agent.objects.filter(pk__in=[r.agent_id for r in flagged]).values_list("pk", "agent_id"))
        described = ", ".join(
            f"{names[r.agent_id]} ({', '.join(f'{k} z={r.scores[k]:+.1f}' for k in r.reasons)})"
            for r in flagged
        )
        excluded = sum(r.action == UpdateStatistics.Action.EXCLUDED for r in flagged)
        alert_raise(
            kind=Alert.Kind.UPDATE_ANOMALY,
            severity=Alert.Severity.WARNING,
            training=training,
            round_number=round_number,
            subject=subject,
            message=(
                f"Round {round_number}: {len(flagged)} anomalous update(s), {excluded} excluded from the "
                f"aggregate: {described}."
            ),
            details={
                "round": round_number,
                "flagged": [names[r.agent_id] for r in flagged],
                "excluded": excluded,
                "action": analysis.policy.action,
            },
        )
        _quarantine_repeat_offenders(training=training, policy=analysis.policy, rows=flagged, names=names)
    elif any(row.scores for row in rows):
        alert_resolve(
            kind=Alert.Kind.UPDATE_ANOMALY,
            subject=subject,
            resolution=f"Round {round_number} had no anomalous update.",
        )
    return rows


def _quarantine_repeat_offenders(
    *, training: Any, policy: AnomalyPolicy, rows: Sequence[UpdateStatistics], names: Mapping[Any, str]
) -> None:
    """Quarantine an agent once it has ``quarantine_after`` flags in this training since it was last
    activated (an operator's ``POST /api/v1/agents/{id}/activate`` starts the count again)."""
    from clients.models import Agent
    from clients.services import agent_set_status

    if policy.quarantine_after is None:
        return
    for row in rows:
        agent = Agent.objects.select_for_update().get(pk=row.agent_id)
        if agent.status != Agent.Status.ACTIVE:
            continue
        activated = (
            AuditLog.objects.filter(
                object_type="clients.agent", object_id=str(agent.pk), action="agent.active"
            )
            .order_by("-created_at")
            .values_list("created_at", flat=True)
            .first()
        )
        flags = UpdateStatistics.objects.filter(training=training, agent=agent, flagged=True)
        if activated is not None:
            flags = flags.filter(created_at__gt=activated)
        count = flags.count()
        if count < policy.quarantine_after:
            continue
        agent_set_status(agent=agent, status=Agent.Status.QUARANTINED, actor=QUARANTINE_ACTOR)
        audit_record(
            actor=QUARANTINE_ACTOR,
            action="agent.quarantine_anomalies",
            obj=agent,
            details={"training_id": str(training.pk), "flags": count, "after": policy.quarantine_after},
        )
        alert_raise(
            kind=Alert.Kind.AGENT_QUARANTINED,
            severity=Alert.Severity.WARNING,
            training=training,
            subject=f"agent:{names.get(agent.pk, agent.agent_id)}",
            message=(
                f"Agent {agent.agent_id} was quarantined after {count} anomalous updates in training "
                f"{training.pk}; it is out of selection until an operator activates it "
                f"(POST /api/v1/agents/{agent.agent_id}/activate)."
            ),
            details={"training_id": str(training.pk), "flags": count},
        )
