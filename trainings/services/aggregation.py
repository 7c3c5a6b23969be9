"""Aggregation (runs in a Celery worker, queue ``aggregation``): a closed round becomes a version.

Invariants:

- Idempotent under retry: nothing is written unless the round is still ``aggregating`` when re-checked
  under its row lock; versions are unique per (training, number) and blobs are content-addressed.
- The new parameters are finite, or the attempt raises and nothing is written; after the last retry
  ``round_mark_aggregation_failed`` fails the round and the training with a critical alert.
- Central DP: only the noised mean leaves ``_central_dp_step``, its noise comes from the OS's
  cryptographic source, and the round's event is recorded in the privacy ledger in the same transaction
  as the version.
- The version, the round's completion, the metrics and the next round (or the training's end) commit
  together; events are broadcast after commit.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import numpy as np
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from fedsite.logs import log_event
from flcore.dp.central import wrap_central_dp
from flcore.errors import FlcoreError
from flcore.parameters import Parameters, ParameterSpec, l2_norm, subtract
from flcore.strategies import Strategy
from monitoring.anomalies import (
    RoundAnalysis,
    anomaly_policy,
    measurements_build,
    previous_losses,
    round_analyse,
    round_analysis_record,
)
from monitoring.events import event_broadcast_on_commit
from monitoring.models import Alert
from monitoring.services import alert_raise, metrics_record
from privacy.models import PrivacyBudget
from privacy.services import ledger_record
from trainings.configuration import TrainingConfiguration
from trainings.models import ClientUpdate, Round, Training
from trainings.outbox import aggregation_intent_complete
from trainings.services.asynchronous import _asynchronous_step, _enqueue_if_aggregating
from trainings.services.rounds import _round_open_next
from trainings.services.trainings import (
    _broadcast_training_finished,
    _cancel_open_training_tasks,
    _configuration,
    is_asynchronous,
)
from trainings.services.updates import _update_views
from trainings.state import lock_round, lock_training, transition_round, transition_training
from versioning.blobs import blob_local_path
from versioning.models import ModelVersion
from versioning.services import (
    rollback_policy_check,
    version_create,
    version_read_parameters,
    version_read_state,
)

logger = logging.getLogger("trainings")

TS, RS = Training.Status, Round.Status


def round_aggregate(*, round_id: int) -> str:
    """Aggregate a closed round into a new version, record metrics, then finish or open the next round.

    Streaming rules and small models are combined here; rules that need all updates at once on large
    models are split into coordinate chunks combined by parallel Celery tasks (``trainings.chunked``),
    whose join calls :func:`round_finish`.
    """
    started = time.time()
    round_ = Round.objects.select_related("training", "base_version").filter(pk=round_id).first()
    if round_ is None or round_.status != RS.AGGREGATING:
        return "skipped"
    training = round_.training
    config = _configuration(training)
    if config.secure_aggregation is not None:  # only the masked sum exists (trainings/services/secagg.py)
        from trainings.services.secagg import secagg_aggregate

        return secagg_aggregate(round_id=round_id, started=started)
    strategy = config.strategy()
    spec = ParameterSpec.from_json(training.parameter_spec)
    if strategy.asynchronous:
        previous = Round.objects.filter(training=training, number=round_.number - 1).first()
        if previous is not None and previous.status == RS.AGGREGATING:
            return "deferred"  # the previous step finishes first; it enqueues this one when done
        # an asynchronous step applies to whatever version is newest now, not the one the round opened on
        current_id = Training.objects.values_list("current_version", flat=True).get(pk=training.pk)
        parent = ModelVersion.objects.get(pk=current_id)
        updates = list(
            ClientUpdate.objects.filter(round=round_)
            .select_related("agent", "task__base_version", "round__base_version")
            .order_by("created_at", "pk")
        )
        new_parameters, new_state, delta, combination_metrics = _asynchronous_step(
            strategy, spec, parent, updates
        )
        return _round_commit(
            round_id,
            parent=parent,
            updates=updates,
            new_parameters=new_parameters,
            new_state=new_state,
            delta=delta,
            combination_metrics=combination_metrics,
            started=started,
        )
    updates = round_updates(round_)
    budget = PrivacyBudget.objects.filter(training=training, mode=PrivacyBudget.Mode.CENTRAL).first()
    if budget is not None:
        new_parameters, new_state, delta, combination_metrics = _central_dp_step(
            strategy, budget, spec, round_.base_version, updates
        )
        return _round_commit(
            round_id,
            parent=round_.base_version,
            updates=updates,
            new_parameters=new_parameters,
            new_state=new_state,
            delta=delta,
            combination_metrics=combination_metrics,
            started=started,
        )
    if not updates and budget is None and PrivacyBudget.objects.filter(training=training).exists():
        # Local DP, empty Poisson sample: no agent released anything, so the version repeats its parent
        # (no server-optimizer step on a zero delta); _round_commit still records the round's event.
        return _round_commit(
            round_id,
            parent=round_.base_version,
            updates=[],
            new_parameters=version_read_parameters(round_.base_version),
            new_state=version_read_state(round_.base_version, strategy),
            delta=spec.zeros(),
            combination_metrics={"num_updates": 0.0},
            started=started,
        )
    if not strategy.streaming and _use_chunked_aggregation(spec, len(updates)):
        from trainings.chunked import dispatch_chunked_aggregation

        dispatch_chunked_aggregation(round_id=round_id, started=started)
        return "dispatched"
    reference, reference_norm = _reference_direction(round_.base_version)
    delta, combination_metrics, dots = _combine_updates(strategy, spec, updates, reference=reference)
    analysis = _round_analysis(training, round_, config, updates, dots, reference_norm)
    if analysis.excluded:
        # Drop them before the strategy's result counts: the round is combined again without them (a second
        # pass over the kept updates, only in a round that excludes something).
        kept = [update for update in updates if update.pk not in analysis.excluded]
        delta, combination_metrics, _ = _combine_updates(strategy, spec, kept)
    return round_finish(
        round_id=round_id,
        delta=delta,
        combination_metrics=combination_metrics,
        started=started,
        analysis=analysis,
    )


def _reference_direction(base: ModelVersion) -> tuple[Parameters | None, float | None]:
    """The step that produced ``base`` (its parameters minus its parent's) and its norm; ``None`` for a
    version without a parent or a zero step. The cosine statistic of monitoring/anomalies.py is to it."""
    if base.parent_id is None:
        return None, None
    step = subtract(version_read_parameters(base), version_read_parameters(base.parent))
    norm = l2_norm(step)
    if not (norm > 0 and np.isfinite(norm)):
        return None, None
    return step, norm


def _round_analysis(
    training: Training,
    round_: Round,
    config: TrainingConfiguration,
    updates: list[ClientUpdate],
    dots: list[float] | None,
    reference_norm: float | None,
) -> RoundAnalysis:
    """Score the round's updates (monitoring/anomalies.py) and decide the exclusions the policy asks for.

    Exclusion never leaves the strategy with fewer updates than it needs: then the updates stay, flagged.
    """
    policy = anomaly_policy(config.anomaly)
    losses = previous_losses(
        training=training, round_number=round_.number, agent_pks=[u.agent_id for u in updates]
    )
    measurements = measurements_build(
        updates=updates, dots=dots, reference_norm=reference_norm, previous_losses=losses
    )
    analysis = round_analyse(measurements, policy, reference_norm=reference_norm)
    if policy.action != "exclude" or not analysis.flagged:
        return analysis
    excluded = frozenset(m.update_id for m in analysis.flagged)
    try:
        config.strategy().check_num_updates(len(updates) - len(excluded))
    except FlcoreError:
        log_event(
            logger,
            "anomaly_exclusion_skipped",
            level=logging.WARNING,
            training_id=training.pk,
            round=round_.number,
            flagged=len(excluded),
            updates=len(updates),
        )
        return analysis
    return analysis.with_exclusions(excluded)


def _central_dp_step(
    strategy: Strategy,
    budget: PrivacyBudget,
    spec: ParameterSpec,
    parent: ModelVersion,
    updates: list[ClientUpdate],
) -> tuple[Any, Any, Any, dict[str, float]]:
    """Client-level central DP (McMahan et al. 2018): clip every stored delta to C, sum them unweighted,
    add N(0, (zC)^2) to the sum, divide by the expected number of agents, then the inner rule's step.

    Only the noised mean ever leaves this function; the noise comes from a generator seeded by the OS's
    cryptographic source, never from the training's seed.
    """
    dp = wrap_central_dp(
        strategy,
        noise_multiplier=budget.noise_multiplier,
        clip_norm=budget.clip_norm,
        expected_clients_per_round=float(budget.expected_clients_per_round),
        adaptive_clipping=budget.adaptive_clipping,
        target_quantile=budget.target_quantile,
        clip_learning_rate=budget.clip_learning_rate,
    )
    state = version_read_state(parent, dp)
    round_dp = dp.for_state(state)
    rng = np.random.default_rng(secrets.randbits(128))
    accumulator = round_dp.accumulator(spec)
    unclipped = 0
    for update in updates:
        scale = round_dp.update_scale(update.update_norm)
        unclipped += round_dp.unclipped_indicator(update.update_norm)
        path = blob_local_path(update.blob_name)
        if path is not None:
            accumulator.add_file(path, 1.0, scale=scale, verified=True)
        else:
            accumulator.add(_update_views(update, spec), 1.0, scale=scale)
    summed = accumulator.sum() if updates else spec.zeros()
    delta = round_dp.noised_mean(summed, len(updates), rng)
    base = version_read_parameters(parent)
    new_parameters, new_state = round_dp.apply(base, delta, state)
    new_state, _ = round_dp.adapt_clip_norm(new_state, unclipped, len(updates), rng)
    # Only DP-safe figures: the exact count of clipped updates is not noised, so it is not published.
    metrics = round_dp.round_metrics(len(updates))
    return new_parameters, new_state, delta, metrics


def _use_chunked_aggregation(spec: ParameterSpec, num_updates: int) -> bool:
    """Split across workers when the updates of a round exceed the configured size (and a worker pool
    exists: eager Celery runs everything in one process anyway)."""
    return num_updates * spec.nbytes > settings.FEDSITE_CHUNKED_AGGREGATION_BYTES


def round_updates(round_: Round) -> list[ClientUpdate]:
    """A synchronous round's updates in a fixed order (by agent id), with their agents."""
    return list(ClientUpdate.objects.filter(round=round_).select_related("agent").order_by("agent__agent_id"))


def round_finish(
    *,
    round_id: int,
    delta: Any,
    combination_metrics: dict[str, float],
    started: float,
    analysis: RoundAnalysis | None = None,
    extra_metrics: dict[str, float] | None = None,
) -> str:
    """Apply the server optimizer step to a synchronous round's combined delta and commit the version.

    ``analysis``: the round's anomaly statistics (stored with the version); updates it excludes are not
    part of ``delta`` and are left out of the round's metrics. ``extra_metrics`` replace the round's
    metrics of the same name (a secure-aggregation round has no individual updates to count).
    """
    round_ = Round.objects.select_related("training", "base_version").get(pk=round_id)
    if round_.status != RS.AGGREGATING:
        return "skipped"
    strategy = _configuration(round_.training).strategy()
    parent = round_.base_version
    updates = round_updates(round_)
    if analysis is not None and analysis.excluded:
        updates = [update for update in updates if update.pk not in analysis.excluded]
    base = version_read_parameters(parent)
    state = version_read_state(parent, strategy)
    new_parameters, new_state = strategy.apply(base, delta, state)
    return _round_commit(
        round_id,
        parent=parent,
        updates=updates,
        new_parameters=new_parameters,
        new_state=new_state,
        delta=delta,
        combination_metrics=combination_metrics,
        started=started,
        analysis=analysis,
        extra_metrics=extra_metrics,
    )


def _round_commit(
    round_id: int,
    *,
    parent: ModelVersion,
    updates: list[ClientUpdate],
    new_parameters: Any,
    new_state: Any,
    delta: Any,
    combination_metrics: dict[str, float],
    started: float,
    analysis: RoundAnalysis | None = None,
    extra_metrics: dict[str, float] | None = None,
) -> str:
    """Write the new version, metrics and events; then finish the training or open the next round."""
    round_ = Round.objects.select_related("training").get(pk=round_id)
    training = round_.training
    config = _configuration(training)
    asynchronous = is_asynchronous(training)
    if not all(np.isfinite(t).all() for t in new_parameters.values()):
        raise FlcoreError("the aggregated model has non-finite values")
    metrics = _round_metrics(updates, delta_norm=l2_norm(delta))
    metrics.update({f"strategy_{key}": value for key, value in combination_metrics.items()})
    metrics.update(_central_evaluation(config, training, new_parameters))
    if analysis is not None:
        metrics.update(analysis.metrics())
    metrics.update(extra_metrics or {})
    metrics["aggregation_seconds"] = time.time() - started

    with transaction.atomic():
        round_ = lock_round(round_id)
        if round_.status != RS.AGGREGATING:
            return "skipped"
        training = lock_training(round_.training_id)
        budget = PrivacyBudget.objects.select_for_update().filter(training=training).first()
        if budget is not None:
            q = float(round_.metrics.get("privacy_sampling_probability", 1.0))
            entry = ledger_record(budget=budget, round_number=round_.number, sampling_probability=q)
            metrics["privacy_sampling_probability"] = q
            metrics["privacy_epsilon_spent"] = entry.epsilon_after
        version = version_create(
            training=training,
            number=round_.number,
            parameters=new_parameters,
            origin=ModelVersion.Origin.AGGREGATION,
            parent=parent,
            metrics=metrics,
            state=new_state.to_bytes(),
        )
        if round_.opened_at is not None:
            metrics["round_seconds"] = (timezone.now() - round_.opened_at).total_seconds()
        round_.metrics = metrics
        round_.save(update_fields=["metrics"])
        transition_round(round_, RS.COMPLETED)
        aggregation_intent_complete(round_)
        metrics_record(training=training, round_number=round_.number, values=metrics)
        if analysis is not None:
            round_analysis_record(training=training, round_number=round_.number, analysis=analysis)
        training.current_version = version
        accuracy = metrics.get("accuracy", metrics.get("federated_accuracy"))
        if accuracy is not None and (training.best_accuracy is None or accuracy > training.best_accuracy):
            training.best_accuracy = accuracy
        training.save(update_fields=["current_version", "best_accuracy"])
        event_broadcast_on_commit(
            training_id=training.pk,
            event="round_completed",
            payload={"round": round_.number, "version": version.number, "metrics": metrics},
        )
        log_event(
            logger,
            "round_completed",
            training_id=training.pk,
            round=round_.number,
            updates=len(updates),
            accuracy=accuracy,
        )
        rollback_policy_check(training=training, round_number=round_.number)
        if asynchronous:
            for update in updates:
                ClientUpdate.objects.filter(pk=update.pk).update(staleness=update.staleness)
            next_number = round_.number + 1
            training_pk = training.pk
            transaction.on_commit(lambda: _enqueue_if_aggregating(training_pk, next_number))
        if training.status != TS.RUNNING:
            return "completed_after_stop"
        reason = ""
        if config.target_accuracy is not None and accuracy is not None and accuracy >= config.target_accuracy:
            reason = f"reached target accuracy {config.target_accuracy} (accuracy {accuracy:.4f})"
        elif round_.number >= config.max_rounds:
            reason = f"reached max_rounds {config.max_rounds}"
        if reason:
            transition_training(training, TS.COMPLETED, reason=reason)
            for open_round in Round.objects.select_for_update().filter(
                training=training, status__in=[RS.WAITING, RS.COLLECTING]
            ):
                transition_round(open_round, RS.CANCELLED, error=reason)
            _cancel_open_training_tasks(training)
            _broadcast_training_finished(training)
            log_event(logger, "training_completed", training_id=training.pk, reason=repr(reason))
            return "training_completed"
        if not asynchronous:  # an asynchronous training opened its next round when this one closed
            _round_open_next(training)
    return "next_round"


def _combine_updates(
    strategy: Strategy,
    spec: ParameterSpec,
    updates: list[ClientUpdate],
    *,
    reference: Parameters | None = None,
) -> tuple[Any, dict[str, float], list[float] | None]:
    """Combine a round's stored deltas into one pseudo-gradient with the training's strategy.

    Streaming rules read one update at a time into one accumulator (memory O(model)); rules that need
    all updates at once combine coordinate chunks of memory-mapped updates (memory O(n x chunk)). With a
    ``reference``, the same pass also returns each update's dot product with it (else ``None``).
    """
    strategy.check_num_updates(len(updates))
    if strategy.streaming:
        accumulator = strategy.accumulator(spec)
        if reference is not None:
            accumulator.set_reference(reference)
        clipped = 0
        for update in updates:
            weight = strategy.update_weight(update.num_examples, update.update_norm)
            scale = strategy.update_scale(update.update_norm)
            clipped += int(scale < 1.0)
            path = blob_local_path(update.blob_name)
            if path is not None:
                accumulator.add_file(path, weight, scale=scale, verified=True)  # validated at upload
            else:
                accumulator.add(_update_views(update, spec), weight, scale=scale)
        metrics = {"num_updates": float(len(updates))}
        if strategy.needs_norms:
            metrics["num_clipped"] = float(clipped)
        return accumulator.result(), metrics, accumulator.reference_dots if reference is not None else None
    deltas = [_update_views(update, spec) for update in updates]
    counts = [update.num_examples for update in updates]
    if reference is None:
        return (*strategy.combine(deltas, counts), None)
    return strategy.combine_measured(deltas, counts, reference)


def _round_metrics(updates: list[ClientUpdate], *, delta_norm: float) -> dict[str, float]:
    """Weighted means of what agents reported (federated evaluation of the round's base version)."""
    metrics: dict[str, float] = {
        "num_agents_reporting": float(len(updates)),
        "num_examples": float(sum(u.num_examples for u in updates)),
        "update_norm_mean": float(np.mean([u.update_norm for u in updates])) if updates else 0.0,
        "global_update_norm": delta_norm,
    }
    eval_weight = sum(u.metrics.get("eval_num_examples", 0.0) for u in updates)
    if eval_weight > 0:
        for key, target in (("eval_accuracy", "federated_accuracy"), ("eval_loss", "federated_loss")):
            pairs = [
                (u.metrics[key], u.metrics.get("eval_num_examples", 0.0)) for u in updates if key in u.metrics
            ]
            weight = sum(w for _, w in pairs)
            if weight > 0:
                metrics[target] = sum(v * w for v, w in pairs) / weight
    train_weight = sum(u.num_examples for u in updates if "train_loss" in u.metrics)
    if train_weight:
        metrics["train_loss"] = (
            sum(u.metrics["train_loss"] * u.num_examples for u in updates if "train_loss" in u.metrics)
            / train_weight
        )
    return metrics


def _central_evaluation(
    config: TrainingConfiguration, training: Training, parameters: Any
) -> dict[str, float]:
    """Server-side evaluation on a public test split, when the training names one."""
    if not config.evaluation_dataset:
        return {}
    from trainings.evaluation import evaluate_on_dataset

    loss, accuracy = evaluate_on_dataset(training.model_spec, parameters, config.evaluation_dataset)
    return {"loss": loss, "accuracy": accuracy}


def round_mark_aggregation_failed(*, round_id: int, error: str) -> None:
    """After the last retry: fail the round and the training, with a critical alert."""
    with transaction.atomic():
        round_ = lock_round(round_id)
        if round_.status != RS.AGGREGATING:
            return
        transition_round(round_, RS.FAILED, error=error[:2000])
        aggregation_intent_complete(round_)
        alert_raise(
            kind=Alert.Kind.AGGREGATION_FAILED,
            severity=Alert.Severity.CRITICAL,
            training=round_.training,
            round_number=round_.number,
            message=f"Aggregation of round {round_.number} failed: {error[:500]}",
        )
        training = lock_training(round_.training_id)
        if training.status == TS.RUNNING:
            transition_training(training, TS.FAILED, reason=f"aggregation of round {round_.number} failed")
            _broadcast_training_finished(training)
