"""Garbage collection against the database and the blob store: what is pruned, what survives, dry runs.

Blobs younger than the grace period are never deleted; the tests age them (``_age``) rather than shorten
the grace, so the grace rule itself is exercised too.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from flcore.parameters import ParameterSpec
from monitoring.models import AuditLog
from versioning.blobs import blob_name_for, blob_read, blob_save
from versioning.garbage import garbage_collect
from versioning.models import Blob, ModelVersion
from versioning.retention import VersionFacts, metric_value
from versioning.services import training_rollback, version_create, version_pin
from versioning.tests.test_retention_policy import brute_force_keep

LONG_AGO = timezone.now() - timedelta(days=400)


def _age() -> None:
    """Every blob was last stored or re-used long ago (past the grace period), files included."""
    Blob.objects.update(touched_at=LONG_AGO)
    for name in _stored():
        path = default_storage.path(name)
        os.utime(path, (LONG_AGO.timestamp(), LONG_AGO.timestamp()))


def _stored() -> set[str]:
    root = default_storage.path("blobs")
    found = set()
    for directory, _, files in os.walk(root):
        for name in files:
            found.add(os.path.relpath(os.path.join(directory, name), default_storage.path("")))
    return found


def _history(make_training: Any, accuracies: list[float | None], **config: Any) -> Any:
    """A pending training with versions 1..n written as aggregation would write them."""
    training = make_training(start=False, **config)
    spec = ParameterSpec.from_json(training.parameter_spec)
    rng = np.random.default_rng(config.get("seed", 0) + 1000)
    parent = training.current_version
    for number, accuracy in enumerate(accuracies, 1):
        parameters = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}
        parent = version_create(
            training=training,
            number=number,
            parameters=parameters,
            parent=parent,
            metrics={} if accuracy is None else {"accuracy": accuracy},
            state=rng.standard_normal(4).astype(np.float32).tobytes(),
        )
    training.current_version = parent
    training.current_round = len(accuracies)
    training.save(update_fields=["current_version", "current_round"])
    return training


def _collect(capture: Any, **options: Any) -> Any:
    with capture(execute=True):
        return garbage_collect(**options)


@pytest.mark.django_db
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_histories_prune_exactly_what_brute_force_says(
    make_training: Any, django_capture_on_commit_callbacks: Any, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(6, 14))
    accuracies = [
        None if rng.random() < 0.2 else round(float(rng.choice([0.3, 0.6, 0.8, rng.random()])), 3)
        for _ in range(size)
    ]
    retention = {
        "keep_last": int(rng.integers(0, 4)),
        "keep_every": None if seed % 2 else int(rng.integers(2, 5)),
        "keep_best": bool(seed != 3),
    }
    training = _history(make_training, accuracies, retention=retention, seed=seed)
    for number in rng.choice(size, size=2, replace=False):
        version_pin(version_id=training.versions.get(number=int(number)).pk, pinned=True)
    target = int(rng.integers(0, size))
    training_rollback(training_id=training.pk, version=target)  # pending training: applied now
    training.refresh_from_db()
    _age()
    before = {v.number: (v.blob_name, v.state_blob_name) for v in training.versions.all()}
    metrics_before = {v.number: (v.metrics, v.blob_sha256, v.parent_id) for v in training.versions.all()}

    report = _collect(django_capture_on_commit_callbacks, training_id=training.pk)

    versions = list(training.versions.all())
    facts = [
        VersionFacts(
            number=v.number,
            metric=metric_value(v.metrics, "accuracy"),
            protected=v.pinned or v.pk == training.current_version_id or v.number == target,
        )
        for v in versions
    ]
    expected_kept = brute_force_keep(facts, {**retention, "keep_every": retention["keep_every"]}, "accuracy")
    assert {v.number for v in versions if v.blob_pruned_at is None} == expected_kept
    assert len(expected_kept) < len(versions)  # something was pruned
    assert report.versions.rows == len(versions) - len(expected_kept)
    still_named = {n for v in versions for n in (v.blob_name, v.state_blob_name) if n}
    for v in versions:
        if v.blob_pruned_at is not None:
            assert v.blob_name == "" and v.state_blob_name == ""
            assert (v.metrics, v.blob_sha256, v.parent_id) == metrics_before[v.number]  # metadata kept
    pruned_names = {n for number, names in before.items() for n in names if n and number not in expected_kept}
    for name in pruned_names - still_named:
        assert not default_storage.exists(name), name
    for name in still_named:
        assert default_storage.exists(name), name
    assert report.versions.blobs == len(pruned_names - still_named)
    assert AuditLog.objects.filter(action="version.prune", object_id=str(training.pk)).exists()
    # nothing changes a version's facts, so a second run prunes nothing more
    again = _collect(django_capture_on_commit_callbacks, training_id=training.pk)
    assert again.versions.rows == 0 and again.versions.blobs == 0


@pytest.mark.django_db
def test_a_shared_blob_survives_until_its_last_row_is_pruned(
    make_training: Any, django_capture_on_commit_callbacks: Any
) -> None:
    # the same seed gives the same version 0: one blob named by two trainings
    first = _history(make_training, [0.5, 0.6], retention={"keep_last": 1, "keep_best": False}, seed=7)
    second = make_training(start=False, seed=7)
    shared = first.versions.get(number=0).blob_name
    assert second.versions.get(number=0).blob_name == shared
    _age()
    report = _collect(django_capture_on_commit_callbacks)
    assert first.versions.get(number=0).blob_pruned_at is not None
    assert default_storage.exists(shared)  # the second training still names it
    assert Blob.objects.get(name=shared).condemned_at is None  # never even condemned
    assert report.versions.rows == 2 and report.versions.blobs == 2  # version 1's weights and state only
    assert hashlib.sha256(blob_read(shared)).hexdigest() == second.versions.get(number=0).blob_sha256

    # now the second training lets version 0 go too: the last row naming the blob is pruned
    second.config = {**second.config, "retention": {**first.config["retention"]}}
    second.save(update_fields=["config"])
    spec = ParameterSpec.from_json(second.parameter_spec)
    v1 = version_create(
        training=second,
        number=1,
        parameters={t.name: np.ones(t.shape, np.float32) for t in spec.tensors},
        parent=second.current_version,
        metrics={"accuracy": 0.1},
    )
    second.current_version = v1
    second.save(update_fields=["current_version"])
    _age()
    report = _collect(django_capture_on_commit_callbacks)
    assert second.versions.get(number=0).blob_pruned_at is not None
    assert not default_storage.exists(shared)
    assert not Blob.objects.filter(name=shared).exists()
    assert report.versions.blobs >= 1


@pytest.mark.django_db
def test_a_blob_touched_within_the_grace_period_is_kept(
    make_training: Any, django_capture_on_commit_callbacks: Any
) -> None:
    training = _history(make_training, [0.5, 0.6, 0.7], retention={"keep_last": 1, "keep_best": False})
    name = training.versions.get(number=1).blob_name
    _collect(django_capture_on_commit_callbacks)  # not aged: every blob was stored a moment ago
    assert training.versions.get(number=1).blob_pruned_at is not None  # the row lets it go ...
    assert default_storage.exists(name)  # ... but the file waits for the grace period
    _age()
    report = _collect(django_capture_on_commit_callbacks)  # the orphan sweep finds it
    assert not default_storage.exists(name)
    assert report.orphans.blobs >= 1


@pytest.mark.django_db
def test_a_writer_that_stores_a_condemned_blob_revives_it(
    make_training: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Condemned in the collector's transaction, stored again by a writer before the file is removed:
    the removal (after the commit) sees the writer's touch and keeps the file."""
    training = _history(make_training, [0.5, 0.6], retention={"keep_last": 1, "keep_best": False})
    version = training.versions.get(number=1)
    name, data = version.blob_name, blob_read(version.blob_name)
    _age()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        garbage_collect(training_id=training.pk)
    assert Blob.objects.get(name=name).condemned_at is not None
    assert blob_save(data) == (name, version.blob_sha256)  # a writer re-uses the content ...
    for callback in callbacks:
        callback()  # ... before the removal runs
    assert default_storage.exists(name)
    assert Blob.objects.get(name=name).condemned_at is None


@pytest.mark.django_db
def test_a_row_that_names_a_condemned_blob_before_its_removal_keeps_it(
    make_training: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """The removal after the commit counts the rows naming the blob again (a rollback version, for one,
    copies its target's names without storing anything)."""
    training = _history(make_training, [0.5, 0.6], retention={"keep_last": 1, "keep_best": False})
    name = training.versions.get(number=1).blob_name
    _age()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        garbage_collect(training_id=training.pk)
    assert Blob.objects.get(name=name).condemned_at is not None
    ModelVersion.objects.filter(training=training, number=2).update(state_blob_name=name)
    for callback in callbacks:
        callback()
    assert default_storage.exists(name)


@pytest.mark.django_db
def test_a_writer_re_writes_a_blob_whose_file_was_removed(
    make_training: Any, django_capture_on_commit_callbacks: Any
) -> None:
    training = _history(make_training, [0.5, 0.6], retention={"keep_last": 1, "keep_best": False})
    version = training.versions.get(number=1)
    name, data = version.blob_name, blob_read(version.blob_name)
    _age()
    _collect(django_capture_on_commit_callbacks)
    assert not default_storage.exists(name)
    assert blob_save(data)[0] == name
    assert blob_read(name) == data


@pytest.mark.django_db
def test_spooled_uploads_stored_together_revive_re_write_and_share_in_one_upsert(
    make_training: Any, django_capture_on_commit_callbacks: Any, settings: Any, tmp_path: Any
) -> None:
    """``blobs_save_spooled`` (a batch of uploads): a blob condemned and removed by the collector is
    revived and re-written, a new blob is stored once for two identical uploads, a live one is touched;
    the registry rows in one statement."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from versioning.blobs import BlobSpoolWriter, blobs_save_spooled

    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path)
    training = _history(make_training, [0.5, 0.6], retention={"keep_last": 1, "keep_best": False})
    removed, alive = training.versions.get(number=1).blob_name, training.versions.get(number=2).blob_name
    removed_data, alive_data, fresh = blob_read(removed), blob_read(alive), os.urandom(64)
    _age()
    _collect(django_capture_on_commit_callbacks)
    assert not default_storage.exists(removed)
    touched_before = Blob.objects.get(name=alive).touched_at
    writers = []
    for body in (removed_data, alive_data, fresh, fresh):
        writer = BlobSpoolWriter(max_bytes=len(body))
        writer.write(body)
        writers.append(writer)
    try:
        with CaptureQueriesContext(connection) as context:
            names = blobs_save_spooled([writer.finish() for writer in writers])
    finally:
        for writer in writers:
            writer.discard()
    fresh_name = blob_name_for(hashlib.sha256(fresh).hexdigest())
    assert names == [removed, alive, fresh_name, fresh_name]
    assert (blob_read(removed), blob_read(alive), blob_read(fresh_name)) == (removed_data, alive_data, fresh)
    assert sum('INTO "versioning_blob"' in q["sql"] for q in context.captured_queries) == 1
    assert Blob.objects.get(name=alive).touched_at > touched_before
    assert Blob.objects.get(name=fresh_name).size_bytes == len(fresh)
    assert not Blob.objects.filter(name__in=names).exclude(condemned_at=None).exists()


@pytest.mark.django_db(transaction=True)
def test_no_blob_is_removed_when_the_collecting_transaction_rolls_back(make_training: Any) -> None:
    training = _history(make_training, [0.5, 0.6, 0.7], retention={"keep_last": 1, "keep_best": False})
    _age()
    stored = _stored()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic():
        report = garbage_collect()
        assert report.versions.rows == 3 and report.versions.blobs >= 3
        raise Boom
    assert _stored() == stored
    assert not training.versions.exclude(blob_pruned_at=None).exists()
    assert not Blob.objects.exclude(condemned_at=None).exists()
    # committed for real, the same run frees them
    report = garbage_collect()
    assert report.versions.rows == 3
    assert len(_stored()) == len(stored) - report.versions.blobs


@pytest.mark.django_db
def test_update_blobs_go_after_their_round_and_their_retention(
    make_agent: Any,
    make_training: Any,
    run_round: Any,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    tokens = [make_agent()[1], make_agent()[1]]
    quick = make_training(max_rounds=2, retention={"update_blobs_hours": 0})
    default = make_training(max_rounds=2)
    run_round(quick, tokens, [0.1, 0.2])
    run_round(default, tokens, [0.3, 0.4])  # other bytes: no blob shared with the quick training
    # an update's bytes are also a version's: the blob is shared across kinds
    shared_update = quick.rounds.get(number=1).updates.first()
    number = quick.versions.count()
    version = version_create(
        training=quick, number=number + 5, data=blob_read(shared_update.blob_name), origin="upload"
    )
    version_pin(version_id=version.pk, pinned=True)
    open_round_updates = set(quick.rounds.exclude(number=1).values_list("updates__blob_name", flat=True))
    _age()
    report = _collect(django_capture_on_commit_callbacks)
    quick_updates = list(quick.rounds.get(number=1).updates.all())
    assert quick_updates and all(u.blob_name == "" and u.blob_sha256 for u in quick_updates)
    assert report.updates.rows == len(quick_updates)
    assert default_storage.exists(version.blob_name)  # the version still names the shared blob
    others = [u for u in quick_updates if u.blob_sha256 != shared_update.blob_sha256]
    assert others and not any(default_storage.exists(blob_name_for(u.blob_sha256)) for u in others)
    # the open round's updates (not aggregated yet) keep their blobs; so does the site-default training
    assert all(default_storage.exists(n) for n in open_round_updates if n)
    assert all(u.blob_name for u in default.rounds.get(number=1).updates.all())
    settings.FEDSITE_UPDATE_BLOB_RETENTION_HOURS = 0
    _collect(django_capture_on_commit_callbacks)
    assert not any(u.blob_name for u in default.rounds.get(number=1).updates.all())


@pytest.mark.django_db
def test_orphan_files_older_than_the_grace_period_are_deleted(
    make_training: Any, django_capture_on_commit_callbacks: Any
) -> None:
    make_training(start=False)
    orphan, _ = blob_save(b"not named by any row")
    fresh = default_storage.save("blobs/ff/left-by-a-crash.part", __import__("io").BytesIO(b"x" * 10))
    _age()
    os.utime(default_storage.path(fresh))  # just written: inside the grace period
    report = _collect(django_capture_on_commit_callbacks)
    assert not default_storage.exists(orphan)
    assert default_storage.exists(fresh)
    assert report.orphans.blobs == 1 and report.orphans.bytes == len(b"not named by any row")
    named = {v.blob_name for v in ModelVersion.objects.all()}
    assert named and all(default_storage.exists(n) for n in named)


def _busy_site(make_agent: Any, make_training: Any, run_round: Any) -> dict[str, Any]:
    """Pruned versions, old updates, an orphan, an expired session, dead keys and an old task."""
    from django.contrib.sessions.backends.db import SessionStore

    from clients.models import EnrollmentKey
    from clients.services import enrollment_key_create
    from trainings.models import Task
    from trainings.services import training_stop

    history = _history(make_training, [0.2, 0.9, 0.3, 0.4], retention={"keep_last": 1}, seed=3)
    tokens = [make_agent()[1], make_agent()[1]]
    trained = make_training(max_rounds=3, retention={"update_blobs_hours": 0})
    run_round(trained, tokens, [0.3, 0.1])
    training_stop(training_id=trained.pk)
    old = timezone.now() - timedelta(days=90)
    Task.objects.filter(round__training=trained).exclude(status="completed").update(created_at=old)
    cancelled = Task.objects.filter(round__training=trained, status="cancelled").count()
    blob_save(b"an orphan")
    session = SessionStore()
    session["x"] = 1
    session.set_expiry(-10)
    session.save()
    dead, _ = enrollment_key_create(label="old revoked")
    live, _ = enrollment_key_create(label="live")
    EnrollmentKey.objects.filter(pk=dead.pk).update(revoked=True, created_at=old)
    EnrollmentKey.objects.filter(pk=live.pk).update(created_at=old)
    _age()
    return {"history": history, "trained": trained, "cancelled": cancelled, "live_key": live}


@pytest.mark.django_db
def test_a_dry_run_deletes_nothing_and_reports_what_the_real_run_frees(
    make_agent: Any,
    make_training: Any,
    run_round: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from django.contrib.sessions.models import Session

    from clients.models import EnrollmentKey
    from trainings.models import ClientUpdate, Task

    site = _busy_site(make_agent, make_training, run_round)
    stored = {name: default_storage.size(name) for name in _stored()}
    rows = (
        ModelVersion.objects.filter(blob_pruned_at=None).count(),
        ClientUpdate.objects.exclude(blob_name="").count(),
    )
    counts = (Session.objects.count(), EnrollmentKey.objects.count(), Task.objects.count())

    dry = _collect(django_capture_on_commit_callbacks, dry_run=True)
    assert dry.dry_run
    assert {n: default_storage.size(n) for n in _stored()} == stored
    assert (
        ModelVersion.objects.filter(blob_pruned_at=None).count(),
        ClientUpdate.objects.exclude(blob_name="").count(),
    ) == rows
    assert (Session.objects.count(), EnrollmentKey.objects.count(), Task.objects.count()) == counts
    assert not Blob.objects.exclude(condemned_at=None).exists()
    assert dry.versions.rows == 3 and dry.updates.rows == 2 and dry.orphans.blobs == 1
    assert dry.sessions == 1 and dry.enrollment_keys == 1 and dry.tasks == site["cancelled"] > 0

    real = _collect(django_capture_on_commit_callbacks)
    assert {**real.as_dict(), "dry_run": True} == dry.as_dict()
    left = _stored()
    freed = sum(size for name, size in stored.items() if name not in left)
    assert real.bytes_freed == freed > 0
    assert EnrollmentKey.objects.filter(pk=site["live_key"].pk).exists()
    assert Task.objects.filter(round__training=site["trained"], status="completed").count() == 2


@pytest.mark.django_db
def test_prune_blobs_reports_per_kind_and_its_dry_run_matches(
    make_training: Any, django_capture_on_commit_callbacks: Any
) -> None:
    import io
    import json

    _history(make_training, [0.5, 0.6, 0.7], retention={"keep_last": 1, "keep_best": False})
    _age()
    out = io.StringIO()
    call_command("prune_blobs", "--dry-run", stdout=out)
    assert "would free" in out.getvalue() and "version blobs" in out.getvalue()
    out = io.StringIO()
    call_command("prune_blobs", "--dry-run", "--json", stdout=out)
    dry = json.loads(out.getvalue())
    assert dry["versions"]["rows"] == 3 and dry["versions"]["bytes"] > 0
    out = io.StringIO()
    with django_capture_on_commit_callbacks(execute=True):
        call_command("prune_blobs", "--json", stdout=out)
    assert {**json.loads(out.getvalue()), "dry_run": True} == dry
    with pytest.raises(Exception, match="--training"):
        call_command("prune_blobs", "--training", "not-a-training")


@pytest.mark.django_db
def test_pinned_current_and_rollback_targets_are_never_pruned(
    make_training: Any, django_capture_on_commit_callbacks: Any
) -> None:
    training = _history(
        make_training, [0.9, 0.1, 0.2, 0.3, 0.4], retention={"keep_last": 0, "keep_best": False}
    )
    version_pin(version_id=training.versions.get(number=2).pk, pinned=True)
    training_rollback(training_id=training.pk, version=3)
    _age()
    _collect(django_capture_on_commit_callbacks)
    kept = set(training.versions.filter(blob_pruned_at=None).values_list("number", flat=True))
    assert kept == {2, 3, 6}  # pinned, rollback target, current (the rollback's copy of 3)
    version_pin(version_id=training.versions.get(number=2).pk, pinned=False)
    _collect(django_capture_on_commit_callbacks)
    assert set(training.versions.filter(blob_pruned_at=None).values_list("number", flat=True)) == {3, 6}


@pytest.mark.django_db
def test_records_still_useful_are_kept(
    make_agent: Any, make_training: Any, run_round: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from clients.models import EnrollmentKey
    from clients.services import enrollment_key_create
    from trainings.models import Task

    tokens = [make_agent()[1], make_agent()[1]]
    running = make_training(max_rounds=3)
    run_round(running, tokens, [0.3, 0.1])
    old = timezone.now() - timedelta(days=90)
    Task.objects.filter(round__training=running).update(created_at=old)
    Task.objects.filter(round__training=running, status="pending").update(status="cancelled")
    recent_revoked, _ = enrollment_key_create(label="revoked yesterday")
    EnrollmentKey.objects.filter(pk=recent_revoked.pk).update(revoked=True)
    unlimited, _ = enrollment_key_create(label="old but valid", expires_at=timezone.now() + timedelta(days=1))
    EnrollmentKey.objects.filter(pk=unlimited.pk).update(created_at=old)
    tasks = Task.objects.count()

    report = _collect(django_capture_on_commit_callbacks)

    assert report.tasks == 0 and Task.objects.count() == tasks  # the training still runs
    assert report.enrollment_keys == 0
    assert EnrollmentKey.objects.filter(pk__in=[recent_revoked.pk, unlimited.pk]).count() == 2


@pytest.mark.django_db
def test_expired_operator_tokens_and_old_aggregation_intents_are_deleted(
    make_agent: Any,
    make_training: Any,
    run_round: Any,
    staff_client: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from knox.models import AuthToken

    from clients.services import operator_token_create
    from trainings.models import AggregationOutbox

    def token(days: float) -> Any:
        return operator_token_create(username=staff_client.user.username, expires_in_days=days, actor="t")[0]

    expired, valid, forever = token(1), token(1), token(0)
    AuthToken.objects.filter(pk=expired.pk).update(expiry=timezone.now() - timedelta(seconds=1))
    assert forever.expiry is None

    tokens = [make_agent()[1], make_agent()[1]]
    training = make_training(max_rounds=4)
    for _ in range(3):
        run_round(training, tokens, [0.3, 0.1])
    intents = list(AggregationOutbox.objects.filter(round__training=training).order_by("round__number"))
    assert len(intents) == 3 and all(row.completed_at is not None for row in intents)
    old = timezone.now() - timedelta(days=8)  # past the 7-day default
    AggregationOutbox.objects.filter(pk=intents[0].pk).update(completed_at=old)
    AggregationOutbox.objects.filter(pk=intents[1].pk).update(completed_at=None, created_at=old)  # in flight

    dry = _collect(django_capture_on_commit_callbacks, dry_run=True)
    assert (dry.operator_tokens, dry.outbox) == (1, 1)
    assert AuthToken.objects.count() == 3 and AggregationOutbox.objects.count() == 3

    real = _collect(django_capture_on_commit_callbacks)
    assert (real.operator_tokens, real.outbox) == (1, 1)
    assert set(AuthToken.objects.values_list("pk", flat=True)) == {valid.pk, forever.pk}
    left = set(AggregationOutbox.objects.values_list("pk", flat=True))
    assert left == {intents[1].pk, intents[2].pk}  # the in-flight one and the recent one stay


@pytest.mark.django_db
def test_masked_inputs_of_ended_secure_rounds_are_pruned_and_named_until_then(
    make_agent: Any, make_training: Any, run_round: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from trainings.models import Round, SecAggMessage, SecAggSession

    (agent, token), (_, other) = make_agent(), make_agent()
    training = make_training(max_rounds=3, retention={"update_blobs_hours": 1})
    run_round(training, [token, other], [0.3, 0.1])
    ended = Round.objects.get(training=training, number=1)
    old = timezone.now() - timedelta(hours=2)
    Round.objects.filter(pk=ended.pk).update(completed_at=old)
    running = Round.objects.get(training=training, number=2)  # opened by the first round's end
    assert running.status not in (Round.Status.COMPLETED, Round.Status.FAILED, Round.Status.CANCELLED)

    def masked(round_: Round, payload: bytes) -> SecAggMessage:
        session = SecAggSession.objects.create(
            round=round_, attempt=1, setup={}, parties={"1": str(agent.pk)}, deadline=timezone.now()
        )
        name, sha = blob_save(payload)
        return SecAggMessage.objects.create(
            session=session, agent=agent, party_id=1, phase="masked_input", blob_name=name, blob_sha256=sha
        )

    done, live = masked(ended, b"masked input of an ended round"), masked(running, b"masked, still needed")
    _age()
    report = _collect(django_capture_on_commit_callbacks)
    done.refresh_from_db()
    live.refresh_from_db()
    assert done.blob_name == "" and done.blob_sha256  # the row keeps its hash
    assert live.blob_name and default_storage.exists(live.blob_name)  # named: not an orphan
    assert report.updates.rows >= 1 and report.orphans.blobs == 0
    assert blob_name_for(hashlib.sha256(b"masked input of an ended round").hexdigest()) not in _stored()
