"""Pinning over REST and the admin, pruned versions answering 410, and the beat entry of the collector."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings

from monitoring.models import AuditLog
from versioning.models import ModelVersion
from versioning.tests.test_retention_gc import _age, _collect, _history


@pytest.fixture
def pruned(make_training: Any, django_capture_on_commit_callbacks: Any) -> Any:
    training = _history(make_training, [0.5, 0.6, 0.7], retention={"keep_last": 2, "keep_best": False})
    _age()
    _collect(django_capture_on_commit_callbacks)
    version = training.versions.get(number=1)
    assert version.blob_pruned_at is not None
    return version


@pytest.mark.django_db
@pytest.mark.parametrize("what", ["download", "export"])
def test_a_pruned_version_answers_410_with_a_clear_message(staff_client: Any, pruned: Any, what: str) -> None:
    response = staff_client.get(f"/api/v1/versions/{pruned.pk}/{what}/")
    assert response.status_code == 410, response.content
    error = response.json()["error"]
    assert error["code"] == "version_pruned"
    assert "pruned by its retention policy" in error["message"] and pruned.blob_sha256 in error["message"]
    # its metadata is still there
    listed = staff_client.get(f"/api/v1/versions/{pruned.pk}/").json()
    assert listed["blob_pruned_at"] and listed["blob_sha256"] == pruned.blob_sha256
    assert listed["metrics"] == {"accuracy": 0.5}


@pytest.mark.django_db
def test_comparing_with_a_pruned_version_answers_410_naming_it(staff_client: Any, pruned: Any) -> None:
    url = f"/api/v1/trainings/{pruned.training_id}/versions/compare"
    response = staff_client.get(url, {"a": 1, "b": 3})
    assert response.status_code == 410, response.content
    assert response.json()["error"]["details"]["a"] == "Version 1 was pruned."
    assert staff_client.get(url, {"a": 2, "b": 3}).status_code == 200


@pytest.mark.django_db
def test_pin_and_unpin_over_rest_are_staff_only_and_audited(
    staff_client: Any, client: Any, make_training: Any, pruned: Any
) -> None:
    version = ModelVersion.objects.get(training_id=pruned.training_id, number=2)
    response = staff_client.post(f"/api/v1/versions/{version.pk}/pin/")
    assert response.status_code == 200, response.content
    assert response.json()["pinned"] is True and response.json()["pinned_by"] == "operator"
    assert AuditLog.objects.filter(action="version.pin", object_id=str(version.pk)).exists()
    response = staff_client.post(f"/api/v1/versions/{version.pk}/unpin/")
    assert response.status_code == 200 and response.json()["pinned"] is False
    assert AuditLog.objects.filter(action="version.unpin", object_id=str(version.pk)).exists()
    # a pruned version cannot be pinned back: its weights are gone
    response = staff_client.post(f"/api/v1/versions/{pruned.pk}/pin/")
    assert response.status_code == 410
    staff_client.logout()
    assert client.post(f"/api/v1/versions/{version.pk}/pin/").status_code in (401, 403)
    version.refresh_from_db()
    assert version.pinned is False


@pytest.mark.django_db
def test_the_admin_action_pins_the_selected_versions(admin_client: Any, make_training: Any) -> None:
    training = make_training(start=False)
    version = training.versions.get(number=0)
    response = admin_client.post(
        "/admin/versioning/modelversion/",
        {"action": "pin_versions", "_selected_action": [str(version.pk)]},
        follow=True,
    )
    assert response.status_code == 200
    version.refresh_from_db()
    assert version.pinned and version.pinned_by == "admin"


def test_the_beat_runs_the_collector_and_the_task_is_registered() -> None:
    from fedsite.celery import app

    app.loader.import_default_modules()
    entries = [e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"] == "versioning.collect_garbage"]
    assert len(entries) == 1 and entries[0]["schedule"] > 0
    assert "versioning.collect_garbage" in app.tasks


@pytest.mark.django_db
def test_the_beat_task_collects(make_training: Any, django_capture_on_commit_callbacks: Any) -> None:
    from versioning.tasks import collect_garbage

    training = _history(make_training, [0.5, 0.6], retention={"keep_last": 1, "keep_best": False})
    _age()
    with django_capture_on_commit_callbacks(execute=True):
        report = collect_garbage.apply().get()
    assert report["versions"]["rows"] == 2 and report["dry_run"] is False
    assert training.versions.exclude(blob_pruned_at=None).count() == 2


@pytest.mark.django_db
def test_the_admin_lists_pruned_and_pinned_versions_and_the_blob_registry(
    admin_client: Any, pruned: Any
) -> None:
    page = admin_client.get("/admin/versioning/modelversion/", {"blob_pruned_at__isempty": "0"})
    assert page.status_code == 200
    assert page.context["cl"].result_count == 2  # versions 0 and 1 were pruned
    blobs = admin_client.get("/admin/versioning/blob/")
    assert blobs.status_code == 200 and blobs.context["cl"].result_count > 0
