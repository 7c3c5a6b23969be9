"""Create, read, compare, export and roll back global model versions.

Invariants: a version is never modified (a rollback writes a new version of origin ``rollback`` that
points at the target's blobs); every blob served is hashed in the same pass that reads it and refused
(with a critical alert) when its sha256 differs from the recorded one; every access and change is in
the audit log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from fedsite.errors import Conflict, NotFound, ServiceError, ValidationFailed
from fedsite.logs import log_event
from flcore.parameters import Parameters, ParameterSpec, from_bytes, to_bytes
from flcore.strategies import ServerState, Strategy
from versioning import policy
from versioning.blobs import SPOOL_CHUNK_BYTES, blob_local_path, blob_read, blob_save
from versioning.models import ModelVersion, Rollback

logger = logging.getLogger("versioning")
MAX_VERSION_NUMBER = 2**31 - 1  # the column's range


def version_create(
    *,
    training: Any,
    number: int,
    parameters: Parameters | None = None,
    data: bytes | None = None,
    origin: str = ModelVersion.Origin.AGGREGATION,
    parent: ModelVersion | None = None,
    metrics: dict[str, Any] | None = None,
    state: bytes | None = None,
) -> ModelVersion:
    """Write version ``number`` of a training; idempotent: an existing version of that number is returned."""
    existing = ModelVersion.objects.filter(training=training, number=number).first()
    if existing is not None:
        return existing
    if data is None:
        if parameters is None:
            raise ValueError("version_create needs parameters or data")
        data = to_bytes(parameters)
    spec = ParameterSpec.from_json(training.parameter_spec)
    name, sha256 = blob_save(data)
    state_name, state_sha256 = blob_save(state) if state is not None else ("", "")
    try:
        with transaction.atomic():
            return ModelVersion.objects.create(
                training=training,
                number=number,
                origin=origin,
                parent=parent,
                blob_name=name,
                blob_sha256=sha256,
                size_bytes=len(data),
                num_parameters=spec.num_parameters,
                metrics=metrics or {},
                state_blob_name=state_name,
                state_blob_sha256=state_sha256,
            )
    except IntegrityError:
        return ModelVersion.objects.get(training=training, number=number)


class VersionPruned(ServiceError):
    """The version's blobs were deleted by the retention policy; its metadata is all that is left."""

    status_code = 410
    default_code = "version_pruned"


def version_require_blob(version: ModelVersion, *, field: str = "version") -> None:
    """Raise :class:`VersionPruned` (410) if retention deleted the version's weights."""
    if version.blob_pruned_at is None:
        return
    raise VersionPruned(
        f"Version {version.number} of training {version.training_id} was pruned by its retention policy on "
        f"{version.blob_pruned_at.isoformat()}: its metrics, sha256 ({version.blob_sha256}) and parent are "
        "kept, its weights are not. Pin versions you will need (POST /api/v1/versions/<id>/pin/).",
        details={
            field: f"Version {version.number} was pruned.",
            "pruned_at": version.blob_pruned_at.isoformat(),
        },
    )


def version_read_bytes(version: ModelVersion) -> bytes:
    version_require_blob(version)
    return blob_read(version.blob_name)


def version_read_parameters(version: ModelVersion) -> Parameters:
    spec = ParameterSpec.from_json(version.training.parameter_spec)
    return from_bytes(version_read_bytes(version), spec=spec, max_bytes=settings.FEDSITE_MAX_UPDATE_BYTES * 4)


def version_read_state(version: ModelVersion, strategy: Strategy) -> ServerState:
    """The server optimizer state stored with a version, or the strategy's initial state if none."""
    spec = ParameterSpec.from_json(version.training.parameter_spec)
    version_require_blob(version)
    if not version.state_blob_name:
        return strategy.init_state(spec)
    return ServerState.from_bytes(blob_read(version.state_blob_name), spec)


# ---------------------------------------------------------------------------------------------------
# Lookups
# ---------------------------------------------------------------------------------------------------
def _training(training_id: Any, *, lock: bool = False) -> Any:
    from trainings.models import Training
    from trainings.state import lock_training

    try:
        return lock_training(training_id) if lock else Training.objects.get(pk=training_id)
    except (Training.DoesNotExist, ValueError, TypeError, DjangoValidationError) as exc:
        raise NotFound(f"No training with id {training_id!r}.", code="training_not_found") from exc


def _version_number(value: Any, field: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,10}", value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VERSION_NUMBER:
        raise ValidationFailed(
            f"{field} must be a version number (an integer at least 0). Found {value!r}.",
            details={field: "Must be an integer version number of this training."},
        )
    return value


def version_of_training(*, training: Any, number: Any, field: str = "version") -> ModelVersion:
    """Version ``number`` of a training, or a 404 that names the field and the versions that exist."""
    wanted = _version_number(number, field)
    version = ModelVersion.objects.filter(training=training, number=wanted).first()
    if version is None:
        latest = ModelVersion.objects.filter(training=training).aggregate(n=Max("number"))["n"]
        raise NotFound(
            f"{field}: training {training.pk} has no version {wanted}; its versions are 0 to {latest}.",
            code="version_not_found",
            details={field: f"No version {wanted}."},
        )
    return version


# ---------------------------------------------------------------------------------------------------
# Verified reads: the sha256 is computed in the same pass that reads the blob
# ---------------------------------------------------------------------------------------------------
class BlobCorrupted(Conflict):
    default_code = "blob_corrupted"


def _corrupted(version: ModelVersion, actual: str, *, blob: str, expected: str) -> BlobCorrupted:
    from monitoring.models import Alert
    from monitoring.services import alert_raise

    message = (
        f"The stored {blob} of version {version.number} of training {version.training_id} is corrupted: "
        f"its sha256 is {actual}, not the recorded {expected}. It is not served; restore the blob "
        f"{version.blob_name if blob == 'weights' else version.state_blob_name} from a backup."
    )
    # The alert must survive the refused request's transaction (ATOMIC_REQUESTS or a caller's block).
    alert_raise(
        kind=Alert.Kind.SYSTEM,
        severity=Alert.Severity.CRITICAL,
        training=version.training,
        message=message,
        details={"version": version.number, "blob": blob, "expected": expected, "actual": actual},
    )
    log_event(logger, "blob_corrupted", training_id=version.training_id, version=version.number)
    return BlobCorrupted(message, details={"version": version.number, "expected": expected, "actual": actual})


def _copy_verified(name: str, expected: str, target: IO[bytes]) -> str:
    """Copy blob ``name`` into ``target`` chunk by chunk; return its sha256 (compare with ``expected``)."""
    digest = hashlib.sha256()
    with default_storage.open(name, "rb") as handle:
        while chunk := handle.read(SPOOL_CHUNK_BYTES):
            digest.update(chunk)
            target.write(chunk)
    return digest.hexdigest()


def version_open_verified(*, version: ModelVersion, actor: Any, audit: bool = True) -> IO[bytes]:
    """An anonymous temporary file holding the version's weights, checked against its sha256, and (with
    ``audit``) a ``version.download`` row for ``actor``; a caller that audits the download itself, with
    more to say (the agent's model download: its task and round), passes ``audit=False``.

    Raises :class:`BlobCorrupted` (409, with a critical alert) when the stored bytes do not match.
    """
    from monitoring.services import audit_record

    version_require_blob(version)
    spooled = tempfile.TemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR)  # noqa: SIM115 (the response closes it)
    actual = _copy_verified(version.blob_name, version.blob_sha256, spooled)
    if actual != version.blob_sha256:
        spooled.close()
        raise _corrupted(version, actual, blob="weights", expected=version.blob_sha256)
    spooled.seek(0)
    if audit:
        audit_record(actor=actor, action="version.download", obj=version)
    return spooled


# ---------------------------------------------------------------------------------------------------
# Comparison (streamed tensor by tensor)
# ---------------------------------------------------------------------------------------------------
@contextmanager
def _blob_path(name: str) -> Iterator[str]:
    """A file-system path for a blob: the blob itself when local, else a temporary copy."""
    local = blob_local_path(name)
    if local is not None:
        yield local
        return
    with tempfile.NamedTemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR, suffix=".safetensors") as copy:
        with default_storage.open(name, "rb") as handle:
            while chunk := handle.read(SPOOL_CHUNK_BYTES):
                copy.write(chunk)
        copy.flush()
        yield copy.name


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _difference(sq_diff: float, sq_a: float, sq_b: float, dot: float, max_abs: float) -> dict[str, Any]:
    norm_a, norm_b = math.sqrt(sq_a), math.sqrt(sq_b)
    return {
        "l2_distance": math.sqrt(sq_diff),
        "relative_change": math.sqrt(sq_diff) / norm_a if norm_a > 0 else None,
        "cosine_similarity": _finite_or_none(dot / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else None,
        "max_abs_difference": max_abs,
    }


def _metric_deltas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float]]:
    deltas = {}
    for key in sorted(set(a) & set(b)):
        va, vb = a[key], b[key]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (va, vb))
        if numeric and math.isfinite(va) and math.isfinite(vb):
            deltas[key] = {"a": float(va), "b": float(vb), "delta": float(vb) - float(va)}
    return deltas


def version_compare(*, training_id: Any, a: Any, b: Any, actor: Any = "system") -> dict[str, Any]:
    """Per-tensor and whole-model differences between versions ``a`` and ``b`` of a training.

    For each tensor (and for the whole model): the L2 distance ``||b - a||``, the relative change
    ``||b - a|| / ||a||`` (null when ``a`` is zero), the cosine similarity (null when either is zero) and
    the largest absolute difference; plus ``b - a`` for every numeric metric both versions report.
    The blobs are memory-mapped and read one tensor at a time (memory O(largest tensor)); sums are in
    float64.
    """
    from safetensors import safe_open

    from monitoring.services import audit_record

    training = _training(training_id)
    version_a = version_of_training(training=training, number=a, field="a")
    version_b = version_of_training(training=training, number=b, field="b")
    version_require_blob(version_a, field="a")
    version_require_blob(version_b, field="b")
    spec = ParameterSpec.from_json(training.parameter_spec)
    tensors = []
    total = {"sq_diff": 0.0, "sq_a": 0.0, "sq_b": 0.0, "dot": 0.0, "max_abs": 0.0}
    with (
        _blob_path(version_a.blob_name) as path_a,
        _blob_path(version_b.blob_name) as path_b,
        safe_open(path_a, framework="numpy") as file_a,
        safe_open(path_b, framework="numpy") as file_b,
    ):
        for tensor in spec.tensors:
            ta = np.asarray(file_a.get_tensor(tensor.name), dtype=np.float64)
            tb = np.asarray(file_b.get_tensor(tensor.name), dtype=np.float64)
            diff = tb - ta
            sums = {
                "sq_diff": float(np.dot(diff.ravel(), diff.ravel())),
                "sq_a": float(np.dot(ta.ravel(), ta.ravel())),
                "sq_b": float(np.dot(tb.ravel(), tb.ravel())),
                "dot": float(np.dot(ta.ravel(), tb.ravel())),
                "max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
            }
            del ta, tb, diff
            for key, value in sums.items():
                total[key] = max(total[key], value) if key == "max_abs" else total[key] + value
            tensors.append(
                {
                    "name": tensor.name,
                    "shape": list(tensor.shape),
                    **_difference(sums["sq_diff"], sums["sq_a"], sums["sq_b"], sums["dot"], sums["max_abs"]),
                }
            )
    audit_record(
        actor=actor,
        action="version.compare",
        obj=training,
        details={"a": version_a.number, "b": version_b.number},
    )
    return {
        "training": str(training.pk),
        "a": _version_summary(version_a),
        "b": _version_summary(version_b),
        "overall": _difference(
            total["sq_diff"], total["sq_a"], total["sq_b"], total["dot"], total["max_abs"]
        ),
        "tensors": tensors,
        "metric_deltas": _metric_deltas(version_a.metrics or {}, version_b.metrics or {}),
    }


def _version_summary(version: ModelVersion) -> dict[str, Any]:
    return {
        "id": str(version.pk),
        "number": version.number,
        "origin": version.origin,
        "parent_number": version.parent.number if version.parent_id else None,
        "sha256": version.blob_sha256,
        "metrics": version.metrics,
    }


# ---------------------------------------------------------------------------------------------------
# Rollback
# ---------------------------------------------------------------------------------------------------
def _rollback_apply(*, training: Any, rollback: Rollback) -> ModelVersion:
    """Write the rollback version (the target's blobs) and make it current; ``training`` is locked.

    The new version takes the next free number. On a running (or pending) training the round counter
    moves to it too, so the next round (``current_round + 1``) writes the number after it: round n writes
    version n.
    """
    from monitoring.events import event_broadcast_on_commit
    from monitoring.services import audit_record
    from trainings.models import Training

    target = rollback.target
    number = (ModelVersion.objects.filter(training=training).aggregate(n=Max("number"))["n"] or 0) + 1
    version = ModelVersion.objects.create(
        training=training,
        number=number,
        origin=ModelVersion.Origin.ROLLBACK,
        parent=target,
        blob_name=target.blob_name,
        blob_sha256=target.blob_sha256,
        size_bytes=target.size_bytes,
        num_parameters=target.num_parameters,
        metrics={**(target.metrics or {}), "rollback_of": target.number},
        state_blob_name=target.state_blob_name,
        state_blob_sha256=target.state_blob_sha256,
    )
    training.current_version = version
    fields = ["current_version"]
    if training.status in (Training.Status.PENDING, Training.Status.RUNNING):  # rounds still to come
        training.current_round = max(training.current_round, number)
        fields.append("current_round")
    training.save(update_fields=fields)
    rollback.version = version
    rollback.status = Rollback.Status.APPLIED
    rollback.applied_at = timezone.now()
    rollback.save(update_fields=["version", "status", "applied_at"])
    audit_record(
        actor=rollback.actor or "system",
        action="training.rollback_applied",
        obj=training,
        details={"target": target.number, "version": number, "trigger": rollback.trigger},
    )
    event_broadcast_on_commit(
        training_id=training.pk,
        event="training.rolled_back",
        payload={
            "target_version": target.number,
            "version": number,
            "trigger": rollback.trigger,
            "reason": rollback.reason,
        },
    )
    log_event(
        logger,
        "training_rolled_back",
        training_id=training.pk,
        target=target.number,
        version=number,
        trigger=rollback.trigger,
    )
    return version


def training_rollback(
    *,
    training_id: Any,
    version: Any,
    actor: Any = "system",
    reason: str = "",
    trigger: str = Rollback.Trigger.MANUAL,
) -> Rollback:
    """Make version ``version`` of a training current again.

    A finished (or pending) training: applied now. A running synchronous training: recorded as pending
    and applied when the round in flight commits, so the next round starts from the target's weights
    and server-optimizer state. A running asynchronous training is refused (409): stop it first.
    """
    from monitoring.services import audit_record
    from trainings.models import Training

    if not isinstance(reason, str) or len(reason) > 500:
        raise ValidationFailed(
            "reason must be a string of at most 500 characters.", details={"reason": "Too long or not text."}
        )
    with transaction.atomic():
        training = _training(training_id, lock=True)
        target = version_of_training(training=training, number=version)
        running = training.status == Training.Status.RUNNING
        if running and training.algorithm in ("fedbuff", "fedasync"):
            raise Conflict(
                f"Training {training.pk} is an asynchronous ({training.algorithm}) training that is "
                "running; its next step is already open. Stop it first, then roll back.",
                code="rollback_asynchronous_running",
            )
        superseded = Rollback.objects.filter(training=training, status=Rollback.Status.PENDING).update(
            status=Rollback.Status.SUPERSEDED
        )
        rollback = Rollback.objects.create(
            training=training,
            target=target,
            trigger=trigger,
            actor=_actor_name(actor),
            reason=reason,
        )
        audit_record(
            actor=actor,
            action="training.rollback",
            obj=training,
            details={
                "target": target.number,
                "trigger": trigger,
                "reason": reason,
                "when": "next_round" if running else "now",
                "superseded": superseded,
            },
        )
        if not running:
            _rollback_apply(training=training, rollback=rollback)
    return rollback


def _actor_name(actor: Any) -> str:
    if hasattr(actor, "get_username"):
        return str(actor.get_username())[:150]
    return str(actor or "system")[:150]


def rollback_policy_check(*, training: Any, round_number: int) -> str:
    """After a round's version and metrics are recorded (``training`` locked by the caller).

    Applies a pending manual rollback, then the training's automatic rollback policy. Returns what
    happened: ``"none"``, ``"applied"`` (a pending rollback), ``"rolled_back"`` or ``"stopped"``.
    """
    pending = (
        Rollback.objects.select_related("target")
        .filter(training=training, status=Rollback.Status.PENDING)
        .order_by("-created_at")
        .first()
    )
    if pending is not None:
        _rollback_apply(training=training, rollback=pending)
        return "applied"
    settings_ = (training.config or {}).get("rollback")
    if not settings_ or not settings_.get("enabled"):
        return "none"
    return _policy_step(training=training, settings_=settings_, round_number=round_number)


def _policy_step(*, training: Any, settings_: dict[str, Any], round_number: int) -> str:
    from trainings.models import Training

    if training.status != Training.Status.RUNNING:
        return "none"
    metric = settings_["metric"]
    last = (
        Rollback.objects.filter(training=training, status=Rollback.Status.APPLIED)
        .exclude(version=None)
        .order_by("-version__number")
        .values_list("version__number", flat=True)
        .first()
    )
    aggregated = [
        v
        for v in ModelVersion.objects.filter(training=training, origin=ModelVersion.Origin.AGGREGATION)
        .only("pk", "number", "metrics")
        .order_by("number")
        if _metric(v, metric) is not None
    ]
    if not aggregated:
        return "none"
    best_value = policy.best_of([_metric(v, metric) for v in aggregated], metric)  # type: ignore[misc]
    since = [v for v in aggregated if last is None or v.number > last]
    streak = since[-settings_["consecutive_degradations"] :]
    if len(streak) < settings_["consecutive_degradations"] or not all(
        policy.is_degraded(
            _metric(v, metric),  # type: ignore[arg-type]
            best_value,
            threshold=settings_["performance_threshold"],
            metric=metric,
        )
        for v in streak
    ):
        return "none"
    done = Rollback.objects.filter(
        training=training, trigger=Rollback.Trigger.AUTOMATIC, status=Rollback.Status.APPLIED
    ).count()
    description = (
        f"{metric} was worse than the best ({best_value:.4g}) by more than "
        f"{settings_['performance_threshold']:.0%} for {len(streak)} consecutive rounds "
        f"(rounds {streak[0].number} to {streak[-1].number})"
    )
    if done >= settings_["max_rollbacks"]:
        _policy_stop(
            training=training,
            round_number=round_number,
            reason=(
                f"rollback policy: {description}, "
                f"and all max_rollbacks ({settings_['max_rollbacks']}) were used"
            ),
        )
        return "stopped"
    if settings_["rollback_to_best"]:
        best = [v for v in aggregated if _metric(v, metric) == best_value][-1]
        target = ModelVersion.objects.get(pk=best.pk)
    else:
        target = (
            ModelVersion.objects.filter(training=training, number__lt=streak[0].number)
            .order_by("-number")
            .first()
        )
    assert target is not None  # version 0 precedes every aggregated version
    rollback = Rollback.objects.create(
        training=training,
        target=target,
        trigger=Rollback.Trigger.AUTOMATIC,
        actor="system:rollback-policy",
        reason=f"{description}; rolled back to version {target.number}",
    )
    from monitoring.services import audit_record

    audit_record(
        actor="system:rollback-policy",
        action="training.rollback",
        obj=training,
        details={"target": target.number, "trigger": "automatic", "reason": rollback.reason},
    )
    _rollback_apply(training=training, rollback=rollback)
    return "rolled_back"


def _metric(version: ModelVersion, metric: str) -> float | None:
    value = (version.metrics or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _policy_stop(*, training: Any, round_number: int, reason: str) -> None:
    """Stop a running training (locked by the caller) whose policy has no rollback left."""
    from monitoring.events import event_broadcast_on_commit
    from monitoring.models import Alert
    from monitoring.services import alert_raise, audit_record
    from trainings.models import Round, Task, Training
    from trainings.state import transition_round, transition_task, transition_training

    transition_training(training, Training.Status.STOPPED, reason=reason)
    for open_round in Round.objects.select_for_update().filter(
        training=training, status__in=[Round.Status.WAITING, Round.Status.COLLECTING]
    ):
        transition_round(open_round, Round.Status.CANCELLED, error=reason)
    for task in Task.objects.select_for_update().filter(round__training=training, status__in=list(Task.OPEN)):
        transition_task(task, Task.Status.CANCELLED, reason=reason)
    alert_raise(
        kind=Alert.Kind.TRAINING_FAILED,
        severity=Alert.Severity.CRITICAL,
        training=training,
        round_number=round_number,
        message=f"Training {training.name!r} stopped: {reason}.",
    )
    audit_record(
        actor="system:rollback-policy", action="training.stop", obj=training, details={"reason": reason}
    )
    version = training.current_version
    event_broadcast_on_commit(
        training_id=training.pk,
        event="training_completed",
        payload={
            "status": training.status,
            "reason": training.stop_reason,
            "rounds": training.current_round,
            "best_accuracy": training.best_accuracy,
            "version": version.number if version else None,
        },
    )


def training_rollback_configure(*, training_id: Any, rollback: Any, actor: Any = "system") -> dict[str, Any]:
    """Set (or clear, with ``None``) a training's rollback policy; validated like the configuration."""
    from monitoring.services import audit_record
    from trainings.configuration import TrainingConfiguration
    from trainings.models import Training

    if isinstance(rollback, policy.RollbackConfig):
        rollback = rollback.to_dict()
    with transaction.atomic():
        training = _training(training_id, lock=True)
        if training.status in Training.TERMINAL:
            raise Conflict(
                f"Training {training.pk} is {training.status}; a rollback policy applies to rounds still "
                "to come.",
                code="training_finished",
            )
        configuration = TrainingConfiguration.from_dict({**training.config, "rollback": rollback})
        training.config = configuration.to_dict()
        training.save(update_fields=["config"])
        audit_record(
            actor=actor, action="training.rollback_configure", obj=training, details={"rollback": rollback}
        )
    return dict(training.config.get("rollback") or {})


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------
def _parent_chain(version: ModelVersion) -> list[dict[str, Any]]:
    chain, seen, current = [], set(), version.parent
    while current is not None and current.pk not in seen:
        seen.add(current.pk)
        chain.append({"number": current.number, "origin": current.origin, "sha256": current.blob_sha256})
        current = current.parent
    return chain


def version_model_card(version: ModelVersion) -> dict[str, Any]:
    """What a downloaded model needs to be understood and rebuilt, as JSON."""
    from privacy.models import PrivacyBudget
    from trainings.models import Round

    training = version.training
    round_ = Round.objects.filter(training=training, number=version.number).first()
    card: dict[str, Any] = {
        "format": "fedsite-model-card/1",
        "training": {
            "id": str(training.pk),
            "name": training.name,
            "algorithm": training.algorithm,
            "status": training.status,
            "config": training.config,
        },
        "version": {
            "id": str(version.pk),
            "number": version.number,
            "origin": version.origin,
            "created_at": version.created_at.isoformat(),
            "sha256": version.blob_sha256,
            "size_bytes": version.size_bytes,
            "num_parameters": version.num_parameters,
            "metrics": version.metrics,
        },
        "round": (
            {"number": round_.number, "status": round_.status, "metrics": round_.metrics}
            if round_ is not None and version.origin == ModelVersion.Origin.AGGREGATION
            else None
        ),
        "parent_chain": _parent_chain(version),
        "parameter_spec": training.parameter_spec,
        "weights_file": "weights.safetensors",
    }
    budget = PrivacyBudget.objects.filter(training=training).first()
    if budget is not None:
        spent = version.metrics.get("privacy_epsilon_spent") if version.metrics else None
        card["privacy"] = {
            "mode": budget.mode,
            "epsilon_budget": budget.epsilon,
            "delta": budget.delta,
            "epsilon_spent": spent if spent is not None else 0.0,
        }
    if training.model_spec:
        card["model"] = {
            "spec": training.model_spec,
            "rebuild": (
                "from flcore.models import ModelSpec, build_model; "
                "from flcore.parameters import load_file; "
                "model = build_model(ModelSpec.from_json(card['model']['spec'])); "
                "parameters = load_file('weights.safetensors', spec=model.parameter_spec(), max_bytes=2**31)"
            ),
        }
    return card


def version_export(*, version: ModelVersion, actor: Any) -> IO[bytes]:
    """A zip (anonymous temporary file) of the weights and a JSON model card.

    The weights are hashed while they are copied into the zip; a mismatch with the recorded sha256
    raises :class:`BlobCorrupted` (409, with a critical alert) and nothing is served.
    """
    from monitoring.services import audit_record

    version_require_blob(version)
    archive = tempfile.TemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR)  # noqa: SIM115 (the response closes it)
    try:
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            with bundle.open("weights.safetensors", "w", force_zip64=True) as member:
                actual = _copy_verified(version.blob_name, version.blob_sha256, member)
            if actual != version.blob_sha256:
                raise _corrupted(version, actual, blob="weights", expected=version.blob_sha256)
            bundle.writestr("model_card.json", json.dumps(version_model_card(version), indent=2, default=str))
    except BaseException:
        archive.close()
        raise
    archive.seek(0)
    audit_record(actor=actor, action="version.export", obj=version)
    return archive


def version_create_from_parameters(
    *, training_id: Any, parameters: Any, metrics: dict[str, Any] | None = None, actor: Any = "system"
) -> ModelVersion:
    """Store operator-supplied weights as the next version (origin ``upload``) and make it current.

    Refused (409) while the training runs: the round in flight owns the next number. The tensors are
    checked against the training's parameter spec (names, shapes, finite float32).
    """
    from monitoring.services import audit_record
    from trainings.models import Training

    if metrics is not None and not isinstance(metrics, dict):
        raise ValidationFailed("metrics must be a JSON object.", details={"metrics": "Must be an object."})
    with transaction.atomic():
        training = _training(training_id, lock=True)
        if training.status == Training.Status.RUNNING:
            raise Conflict(
                f"Training {training.pk} is running; its rounds write its versions. Stop it first, or roll "
                "back to an existing version.",
                code="training_running",
            )
        spec = ParameterSpec.from_json(training.parameter_spec)
        try:
            data = to_bytes(dict(parameters))
            checked = from_bytes(data, spec=spec, max_bytes=settings.FEDSITE_MAX_UPDATE_BYTES * 4)
        except Exception as exc:
            raise ValidationFailed(
                f"parameters do not fit the training's model: {exc}",
                details={"parameters": "Must map every tensor of the model to a finite array."},
            ) from exc
        number = (ModelVersion.objects.filter(training=training).aggregate(n=Max("number"))["n"] or 0) + 1
        version = version_create(
            training=training,
            number=number,
            parameters=checked,
            origin=ModelVersion.Origin.UPLOAD,
            parent=training.current_version,
            metrics=metrics or {},
        )
        training.current_version = version
        fields = ["current_version"]
        if training.status == Training.Status.PENDING:
            training.current_round = number
            fields.append("current_round")
        training.save(update_fields=fields)
        audit_record(actor=actor, action="version.create", obj=version, details={"number": number})
    return version


# ---------------------------------------------------------------------------------------------------
# Pinning (a pinned version is never pruned)
# ---------------------------------------------------------------------------------------------------
def version_pin(*, version_id: Any, pinned: bool, actor: Any = "system") -> ModelVersion:
    """Pin (or unpin) a version, under its training's lock so a running collection sees it or not at all.

    Pinning a version whose blobs were already pruned is refused (410): the weights cannot come back.
    """
    from monitoring.services import audit_record

    try:
        training_id = ModelVersion.objects.values_list("training_id", flat=True).get(pk=version_id)
    except (ModelVersion.DoesNotExist, ValueError, TypeError, DjangoValidationError) as exc:
        raise NotFound(f"No model version {version_id!r}.", code="version_not_found") from exc
    with transaction.atomic():
        _training(training_id, lock=True)
        version = ModelVersion.objects.select_for_update().get(pk=version_id)
        if pinned:
            version_require_blob(version)
        if version.pinned != pinned:
            version.pinned = pinned
            version.pinned_by = _actor_name(actor) if pinned else ""
            version.pinned_at = timezone.now() if pinned else None
            version.save(update_fields=["pinned", "pinned_by", "pinned_at"])
            audit_record(
                actor=actor,
                action="version.pin" if pinned else "version.unpin",
                obj=version,
                details={"training": str(training_id), "number": version.number},
            )
    return version
