"""Garbage collection: pruned version blobs, old client-update blobs, orphan files, expired records.

One entry point, :func:`garbage_collect`, used by the beat task (``versioning.collect_garbage``) and by
``manage.py prune_blobs``; ``dry_run`` runs exactly the same code inside a transaction that is rolled back,
so its report is what the real run frees (and it deletes nothing: files go only after a commit).

Invariants:

- A row *names* a blob when ``ModelVersion.blob_name``, ``ModelVersion.state_blob_name``,
  ``ClientUpdate.blob_name`` or ``SecAggMessage.blob_name`` (a masked input) holds it. Pruning a row clears
  those columns (the row and its sha256, size and metrics stay; a version also gets ``blob_pruned_at``), in
  the same transaction that decides which of the blobs no row names any more.
- That decision is taken under the lock of each blob's registry row (``versioning.models.Blob``), which
  every writer takes too (``versioning.blobs.blob_registered``): a blob is *condemned* only when no row
  names it and no writer touched it within ``FEDSITE_BLOB_GRACE_HOURS``. Rows a writer holds are skipped
  (``SKIP LOCKED``), so the collector never waits for, or deadlocks with, an aggregation or an upload.
- Files are removed only after that transaction commits (``transaction.on_commit``), by a second
  transaction that locks the registry rows again and removes a file only if its blob is still condemned
  and still unnamed; a writer that revived it in between keeps it. A rolled-back transaction removes
  nothing; a crash between the two leaves condemned rows that the next run finishes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from fedsite.logs import log_event
from versioning.models import Blob, ModelVersion, Rollback
from versioning.retention import VersionFacts, metric_value, retention_metric, versions_to_keep

logger = logging.getLogger("versioning.garbage")
BATCH = 500
ACTOR = "system:retention"
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)  # registry rows made for files that are already gone
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class KindFreed:
    """What one kind of collection freed: rows pruned, blobs deleted and their bytes."""

    rows: int = 0
    blobs: int = 0
    bytes: int = 0


@dataclass
class CollectionReport:
    dry_run: bool
    versions: KindFreed = field(default_factory=KindFreed)
    updates: KindFreed = field(default_factory=KindFreed)
    orphans: KindFreed = field(default_factory=KindFreed)
    sessions: int = 0
    enrollment_keys: int = 0
    tasks: int = 0
    operator_tokens: int = 0
    outbox: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def bytes_freed(self) -> int:
        return self.versions.bytes + self.updates.bytes + self.orphans.bytes


class _DryRun(Exception):
    """Raised to roll the dry run's transaction back."""


def garbage_collect(
    *, dry_run: bool = False, training_id: Any = None, progress: Progress | None = None
) -> CollectionReport:
    """Prune what the retention rules allow and report it (``docs/versioning.md``, "Retention").

    ``training_id`` limits the run to one training's versions and update blobs (orphan files and the
    records of the whole site are left for a full run).
    """
    report = CollectionReport(dry_run=dry_run)
    tick = progress or (lambda stage, done, total: None)
    if not dry_run:
        _collect(report, training_id=training_id, tick=tick)
        return report
    try:
        with transaction.atomic():
            _collect(report, training_id=training_id, tick=tick)
            raise _DryRun
    except _DryRun:
        pass
    return report


def _collect(report: CollectionReport, *, training_id: Any, tick: Progress) -> None:
    from trainings.models import Training

    now = timezone.now()
    trainings = Training.objects.order_by("created_at")
    if training_id is not None:
        trainings = trainings.filter(pk=training_id)
    pks = list(trainings.values_list("pk", flat=True))
    for done, pk in enumerate(pks, 1):
        _prune_versions(pk, now=now, freed=report.versions)
        _prune_updates(pk, now=now, freed=report.updates)
        _prune_masked_inputs(pk, now=now, freed=report.updates)
        tick("trainings", done, len(pks))
    if training_id is None:
        _sweep_orphans(now=now, freed=report.orphans, tick=tick)
        report.sessions = _clear_sessions(now)
        report.enrollment_keys = _clear_enrollment_keys(now)
        report.tasks = _clear_tasks(now)
        report.operator_tokens = _clear_operator_tokens(now)
        report.outbox = _clear_outbox(now)
    log_event(logger, "garbage_collected", dry_run=report.dry_run, **_flat(report))


def _flat(report: CollectionReport) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for kind in ("versions", "updates", "orphans"):
        for key, value in asdict(getattr(report, kind)).items():
            flat[f"{kind}_{key}"] = value
    flat.update(
        sessions=report.sessions,
        enrollment_keys=report.enrollment_keys,
        tasks=report.tasks,
        operator_tokens=report.operator_tokens,
        outbox=report.outbox,
    )
    return flat


# ---------------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------------
def versions_protected(training: Any) -> set[Any]:
    """Ids of the versions of ``training`` that no policy may prune (see ``versioning.retention``)."""
    from trainings.models import Round, Task

    finished = [Round.Status.COMPLETED, Round.Status.FAILED, Round.Status.CANCELLED]
    protected = set(ModelVersion.objects.filter(training=training, pinned=True).values_list("pk", flat=True))
    protected |= set(Rollback.objects.filter(training=training).values_list("target_id", flat=True))
    if training.current_version_id:
        protected.add(training.current_version_id)
    in_progress = Round.objects.filter(training=training).exclude(status__in=finished)
    protected |= set(in_progress.values_list("base_version_id", flat=True))
    protected |= set(
        Task.objects.filter(round__in=in_progress)
        .exclude(base_version=None)
        .values_list("base_version_id", flat=True)
    )
    return protected


def _prune_versions(training_pk: Any, *, now: datetime, freed: KindFreed) -> None:
    from monitoring.services import audit_record
    from trainings.state import lock_training

    with transaction.atomic():
        training = lock_training(training_pk)
        config = training.config or {}
        retention = config.get("retention")
        if retention is None:
            return
        metric = retention_metric(config)
        protected = versions_protected(training)
        rows = list(
            ModelVersion.objects.filter(training=training).values_list(
                "pk", "number", "metrics", "blob_pruned_at", "blob_name", "state_blob_name"
            )
        )
        facts = [
            VersionFacts(number=number, metric=metric_value(metrics, metric), protected=pk in protected)
            for pk, number, metrics, _, _, _ in rows
        ]
        keep = versions_to_keep(facts, retention, metric=metric)
        prune = [row for row in rows if row[1] not in keep and row[3] is None]
        if not prune:
            return
        ModelVersion.objects.filter(pk__in=[row[0] for row in prune]).update(
            blob_name="", state_blob_name="", blob_pruned_at=now
        )
        numbers = sorted(row[1] for row in prune)
        audit_record(
            actor=ACTOR,
            action="version.prune",
            obj=training,
            details={"versions": numbers, "retention": retention, "metric": metric},
        )
        freed.rows += len(prune)
        _condemn([name for row in prune for name in row[4:6]], now=now, freed=freed)
        log_event(logger, "versions_pruned", training_id=training.pk, versions=len(numbers))


# ---------------------------------------------------------------------------------------------------
# Client updates
# ---------------------------------------------------------------------------------------------------
def update_retention_hours(config: dict[str, Any]) -> float:
    hours = (config.get("retention") or {}).get("update_blobs_hours")
    return float(settings.FEDSITE_UPDATE_BLOB_RETENTION_HOURS if hours is None else hours)


def _prune_updates(training_pk: Any, *, now: datetime, freed: KindFreed) -> None:
    """Clear the blobs of updates whose round ended (aggregated, failed or cancelled) long enough ago."""
    from trainings.models import ClientUpdate

    _prune_round_blobs(
        ClientUpdate.objects.filter(round__training_id=training_pk),
        round_path="round__",
        started="round__created_at",
        training_pk=training_pk,
        action="update.prune",
        noun="updates",
        now=now,
        freed=freed,
    )


def _prune_masked_inputs(training_pk: Any, *, now: datetime, freed: KindFreed) -> None:
    """Clear the masked-input blobs of secure-aggregation rounds that ended long enough ago.

    The same retention as plain updates (a masked input is the update of a secure round, though no one
    can read it alone); the ``SecAggMessage`` row keeps its sha256 and size.
    """
    from trainings.models import SecAggMessage

    _prune_round_blobs(
        SecAggMessage.objects.filter(session__round__training_id=training_pk),
        round_path="session__round__",
        started="session__created_at",
        training_pk=training_pk,
        action="masked_input.prune",
        noun="masked_inputs",
        now=now,
        freed=freed,
    )


def _prune_round_blobs(
    rows_of_training: QuerySet[Any],
    *,
    round_path: str,
    started: str,
    training_pk: Any,
    action: str,
    noun: str,
    now: datetime,
    freed: KindFreed,
) -> None:
    """Clear ``blob_name`` of the rows whose round (at ``round_path``) ended past the update retention,
    in batches, each audited, and condemn the blobs no row names any more."""
    from monitoring.services import audit_record
    from trainings.models import Round, Training

    config = Training.objects.filter(pk=training_pk).values_list("config", flat=True).first() or {}
    cutoff = now - timedelta(hours=update_retention_hours(config))
    finished = [Round.Status.COMPLETED, Round.Status.FAILED, Round.Status.CANCELLED]
    due = (
        rows_of_training.filter(**{f"{round_path}status__in": finished})
        .exclude(blob_name="")
        .alias(ended=Coalesce(f"{round_path}completed_at", f"{round_path}closed_at", started))
        .filter(ended__lt=cutoff)
        .order_by("pk")
    )
    while True:
        with transaction.atomic():
            locked = due.select_for_update(of=("self",))
            rows = list(locked.values_list("pk", "blob_name", f"{round_path}number")[:BATCH])
            if not rows:
                return
            rows_of_training.model.objects.filter(pk__in=[row[0] for row in rows]).update(blob_name="")
            audit_record(
                actor=ACTOR,
                action=action,
                object_type="trainings.training",
                object_id=str(training_pk),
                details={noun: len(rows), "rounds": sorted({row[2] for row in rows})},
            )
            freed.rows += len(rows)
            _condemn([row[1] for row in rows], now=now, freed=freed)


# ---------------------------------------------------------------------------------------------------
# Orphan files and leftovers
# ---------------------------------------------------------------------------------------------------
def _stored_blob_names() -> Iterator[str]:
    if not default_storage.exists("blobs"):
        return
    directories, files = default_storage.listdir("blobs")
    yield from (f"blobs/{name}" for name in files)
    for directory in directories:
        _, files = default_storage.listdir(f"blobs/{directory}")
        yield from (f"blobs/{directory}/{name}" for name in files)


def names_referenced(names: Iterable[str]) -> set[str]:
    """Which of ``names`` a row names (a version's weights or optimizer state, a client update, or the
    masked input of a secure-aggregation round)."""
    from trainings.models import ClientUpdate, SecAggMessage

    names = list(names)
    found: set[str] = set()
    for start in range(0, len(names), BATCH):
        batch = names[start : start + BATCH]
        for blob_name, state_name in ModelVersion.objects.filter(
            Q(blob_name__in=batch) | Q(state_blob_name__in=batch)
        ).values_list("blob_name", "state_blob_name"):
            found.update((blob_name, state_name))
        found.update(ClientUpdate.objects.filter(blob_name__in=batch).values_list("blob_name", flat=True))
        found.update(SecAggMessage.objects.filter(blob_name__in=batch).values_list("blob_name", flat=True))
    return found & set(names)


def _sweep_orphans(*, now: datetime, freed: KindFreed, tick: Progress) -> None:
    """Files in the blob store that no row names and nobody touched within the grace period."""
    cutoff = now - timedelta(hours=settings.FEDSITE_BLOB_GRACE_HOURS)
    stored = list(_stored_blob_names())
    leftovers = set(Blob.objects.exclude(condemned_at=None).values_list("name", flat=True))
    candidates: list[str] = []
    for start in range(0, len(stored), BATCH):
        batch = stored[start : start + BATCH]
        named = names_referenced(batch)
        candidates.extend(name for name in batch if name not in named and _modified(name) < cutoff)
        tick("orphan scan", min(start + BATCH, len(stored)), len(stored))
    _condemn(sorted(set(candidates) | leftovers), now=now, freed=freed)


def _modified(name: str) -> datetime:
    try:
        return default_storage.get_modified_time(name)
    except (FileNotFoundError, NotImplementedError, OSError):
        return LONG_AGO


# ---------------------------------------------------------------------------------------------------
# Reference counting under the registry lock, then removal after commit
# ---------------------------------------------------------------------------------------------------
def _registry_ensure(names: list[str]) -> None:
    """Registry rows for blobs stored before the registry existed (touched = the file's time)."""
    known = set(Blob.objects.filter(name__in=names).values_list("name", flat=True))
    missing = []
    for name in names:
        if name in known:
            continue
        exists = default_storage.exists(name)
        missing.append(
            Blob(
                name=name,
                sha256=name.rsplit("/", 1)[-1].split(".", 1)[0][:64],
                size_bytes=default_storage.size(name) if exists else 0,
                touched_at=_modified(name) if exists else LONG_AGO,
            )
        )
    Blob.objects.bulk_create(missing, ignore_conflicts=True)


def _condemn(names: Iterable[str], *, now: datetime, freed: KindFreed) -> None:
    """Condemn the blobs among ``names`` that no row names and no writer touched within the grace period;
    their files are removed after the enclosing transaction commits. Call inside that transaction."""
    cutoff = now - timedelta(hours=settings.FEDSITE_BLOB_GRACE_HOURS)
    unique = sorted({name for name in names if name})
    for start in range(0, len(unique), BATCH):
        batch = unique[start : start + BATCH]
        with transaction.atomic():
            _registry_ensure(batch)
            rows = list(
                Blob.objects.select_for_update(skip_locked=True).filter(name__in=batch).order_by("name")
            )
            named = names_referenced(row.name for row in rows)
            dead = [
                row
                for row in rows
                if row.name not in named
                and row.touched_at < cutoff
                and not (row.condemned_at and row.condemned_at >= now)  # condemned earlier in this run
            ]
            if not dead:
                continue
            Blob.objects.filter(name__in=[row.name for row in dead]).update(condemned_at=now)
            freed.blobs += len(dead)
            freed.bytes += sum(row.size_bytes for row in dead)
            transaction.on_commit(partial(blobs_remove_condemned, [row.name for row in dead]), robust=True)


def blobs_remove_condemned(names: list[str]) -> int:
    """Remove the files of blobs still condemned and unnamed (each checked under its row lock)."""
    removed = 0
    for start in range(0, len(names), BATCH):
        with transaction.atomic():
            rows = list(
                Blob.objects.select_for_update(skip_locked=True)
                .filter(name__in=names[start : start + BATCH])
                .exclude(condemned_at=None)
            )
            named = names_referenced(row.name for row in rows)
            gone = [row.name for row in rows if row.name not in named]
            for name in gone:
                default_storage.delete(name)
            Blob.objects.filter(name__in=gone).delete()
            removed += len(gone)
    if removed:
        log_event(logger, "blobs_removed", blobs=removed)
    return removed


# ---------------------------------------------------------------------------------------------------
# Records: sessions, enrolment keys, tasks, operator tokens, aggregation outbox
# ---------------------------------------------------------------------------------------------------
def _clear_sessions(now: datetime) -> int:
    """Expired sessions (what ``manage.py clearsessions`` removes, for the database backends)."""
    from django.contrib.sessions.models import Session

    if "db" not in settings.SESSION_ENGINE:
        return 0  # cache and signed-cookie sessions expire by themselves
    deleted, _ = Session.objects.filter(expire_date__lt=now).delete()
    return deleted


def _clear_enrollment_keys(now: datetime) -> int:
    """Enrolment keys that can no longer enrol (revoked, expired, used up) for longer than the retention."""
    from django.db.models import F

    from clients.models import EnrollmentKey

    cutoff = now - timedelta(days=settings.FEDSITE_ENROLLMENT_KEY_RETENTION_DAYS)
    dead = EnrollmentKey.objects.filter(created_at__lt=cutoff).filter(
        Q(revoked=True) | Q(expires_at__lt=cutoff) | Q(max_uses__isnull=False, uses__gte=F("max_uses"))
    )
    deleted, _ = dead.delete()
    return deleted


def _clear_tasks(now: datetime) -> int:
    """Tasks that ended without an update (expired, failed, cancelled) in finished trainings, once old.

    Completed tasks are kept: their ``ClientUpdate`` row is the record of a contribution (agent, round,
    num_examples, metrics, norm, sha256). Agents' reliability lives in their own counters.
    """
    from trainings.models import Task, Training

    cutoff = now - timedelta(days=settings.FEDSITE_TASK_RETENTION_DAYS)
    done = 0
    while True:
        pks = list(
            Task.objects.filter(
                status__in=[Task.Status.EXPIRED, Task.Status.FAILED, Task.Status.CANCELLED],
                created_at__lt=cutoff,
                round__training__status__in=list(Training.TERMINAL),
                update__isnull=True,
            ).values_list("pk", flat=True)[:BATCH]
        )
        if not pks:
            return done
        _, by_model = Task.objects.filter(pk__in=pks).delete()
        done += by_model.get(Task._meta.label, 0)


def _clear_operator_tokens(now: datetime) -> int:
    """Operator tokens (knox) past their expiry: they authenticate nothing any more.

    knox deletes an expired token only when that very token is presented again, so tokens that are simply
    forgotten would stay for ever. Tokens that never expire (``expiry`` NULL) are kept.
    """
    from knox.models import AuthToken

    deleted, _ = AuthToken.objects.filter(expiry__lt=now).delete()
    return deleted


def _clear_outbox(now: datetime) -> int:
    """Aggregation intents of rounds that left ``aggregating`` more than the outbox retention ago.

    A row with ``completed_at`` set is never relayed again (the beat check skips it); it stays only as
    a record of sends, failures and runs, which the round's own timestamps and the logs keep as well.
    Rows of rounds still aggregating (``completed_at`` NULL) are never touched.
    """
    from trainings.models import AggregationOutbox

    cutoff = now - timedelta(days=settings.FEDSITE_OUTBOX_RETENTION_DAYS)
    deleted, _ = AggregationOutbox.objects.filter(completed_at__lt=cutoff).delete()
    return deleted
