"""Every model's admin renders; system-written rows are view-only; alerts are acknowledged with an audit."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from clients.models import Agent, EnrollmentKey
from clients.services import enrollment_key_create
from monitoring.models import Alert, AuditLog, Metric
from monitoring.tests.factories import make_agent, make_alert, make_round, make_training
from trainings.models import ClientUpdate, Round, Task, Training
from versioning.models import ModelVersion

pytestmark = pytest.mark.django_db

MODELS = [Agent, EnrollmentKey, Training, Round, Task, ClientUpdate, ModelVersion, Metric, Alert, AuditLog]


@pytest.fixture
def one_of_each(admin_user):
    training = make_training("admin-pages")
    agent = make_agent("agent-1", seen_seconds_ago=5)
    enrollment_key_create(label="pilot", created_by=admin_user)
    round_ = make_round(training, 1, Round.Status.COLLECTING, {"accuracy": 0.5})
    task = Task.objects.create(round=round_, agent=agent, deadline=timezone.now() + timedelta(minutes=5))
    ClientUpdate.objects.create(
        task=task,
        round=round_,
        agent=agent,
        blob_name="blobs/aa/x.safetensors",
        blob_sha256="a" * 64,
        size_bytes=10,
        num_examples=5,
        update_norm=0.1,
        metrics={"train_loss": 0.3},
    )
    make_alert(training)
    return {model: model.objects.first() for model in MODELS}


def _url(model, view, *args):
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_changelist_and_change_page_render_for_staff(admin_client, one_of_each, model):
    obj = one_of_each[model]
    assert obj is not None, f"the fixture made no {model.__name__}"

    changelist = admin_client.get(_url(model, "changelist"))
    change = admin_client.get(_url(model, "change", obj.pk))

    assert changelist.status_code == 200
    assert change.status_code == 200
    assert _url(model, "change", obj.pk) in changelist.content.decode()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_admin_needs_a_staff_login(client, one_of_each, model):
    response = client.get(_url(model, "changelist"))

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


@pytest.mark.parametrize(
    "model", [Round, Task, ClientUpdate, ModelVersion, Metric, AuditLog], ids=lambda m: m.__name__
)
def test_system_written_rows_cannot_be_added_changed_or_deleted(admin_client, one_of_each, model):
    obj = one_of_each[model]

    add = admin_client.get(_url(model, "add"))
    post = admin_client.post(_url(model, "change", obj.pk), {})
    delete = admin_client.post(_url(model, "delete", obj.pk), {"post": "yes"})

    assert add.status_code == 403
    assert post.status_code == 403
    assert delete.status_code == 403
    assert model.objects.filter(pk=obj.pk).exists()


@pytest.mark.parametrize("model", [Agent, Training, Alert], ids=lambda m: m.__name__)
def test_objects_changed_only_by_actions_have_a_view_only_page(admin_client, one_of_each, model):
    obj = one_of_each[model]

    page = admin_client.get(_url(model, "change", obj.pk))
    post = admin_client.post(_url(model, "change", obj.pk), {"status": "disabled"})

    assert 'name="_save"' not in page.content.decode()
    assert post.status_code == 403


def test_acknowledge_action_marks_open_alerts_and_audits_each(admin_client, admin_user):
    training = make_training("alerts")
    first, second = make_alert(training, message="one"), make_alert(training, message="two")
    done = make_alert(training, message="old", acknowledged=True)
    untouched = make_alert(training, message="not selected")

    response = admin_client.post(
        _url(Alert, "changelist"),
        {"action": "acknowledge", "_selected_action": [first.pk, second.pk, done.pk]},
        follow=True,
    )

    assert response.status_code == 200
    for alert in (first, second):
        alert.refresh_from_db()
        assert alert.acknowledged_at is not None
        assert alert.acknowledged_by == admin_user.get_username()
    done.refresh_from_db()
    untouched.refresh_from_db()
    assert done.acknowledged_by == "someone"
    assert untouched.acknowledged_at is None
    audits = AuditLog.objects.filter(action="alert.acknowledge")
    assert sorted(audits.values_list("object_id", flat=True)) == sorted([str(first.pk), str(second.pk)])
    assert set(audits.values_list("actor_type", "actor")) == {("user", admin_user.get_username())}
    assert "Acknowledged 2 alert(s)." in response.content.decode()


def test_alert_filter_open_lists_only_unacknowledged(admin_client):
    make_alert(message="still open")
    make_alert(message="handled", acknowledged=True)

    response = admin_client.get(_url(Alert, "changelist"), {"acknowledged": "no"})

    content = response.content.decode()
    assert "still open" in content
    assert "handled" not in content


@pytest.mark.parametrize(
    ("model", "field"),
    [(Agent, "agent_id"), (EnrollmentKey, "label"), (Training, "configuration")],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_service_add_forms_render(admin_client, model, field):
    response = admin_client.get(_url(model, "add"))

    content = response.content.decode()
    assert response.status_code == 200
    assert f'name="{field}"' in content
    assert "csrfmiddlewaretoken" in content
    assert _url(model, "changelist") in content  # breadcrumbs back to the list
