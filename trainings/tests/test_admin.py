"""Admin flows for trainings: creation from a validated JSON configuration, stopping through the service."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from monitoring.models import AuditLog
from monitoring.tests.factories import make_round, make_training
from trainings.models import Round, Training

pytestmark = pytest.mark.django_db

ADD = reverse("admin:trainings_training_add")
CHANGELIST = reverse("admin:trainings_training_changelist")
CONFIG = {"name": "from-admin", "model_type": "logreg", "input_dim": 4, "num_classes": 3, "max_rounds": 5}


@pytest.fixture(autouse=True)
def _media_in_tmp(settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path / "media")


def test_add_form_starts_a_training_through_the_service(admin_client, admin_user):
    response = admin_client.post(ADD, {"configuration": json.dumps(CONFIG), "start_now": "on"})

    training = Training.objects.get(name="from-admin")
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:trainings_training_change", args=[training.pk])
    assert training.status == Training.Status.RUNNING
    assert training.created_by == admin_user
    assert training.config["max_rounds"] == 5
    assert list(training.rounds.values_list("number", flat=True)) == [1]
    assert training.versions.filter(number=0).exists()
    actions = set(AuditLog.objects.filter(object_id=str(training.pk)).values_list("action", "actor"))
    assert {
        ("training.create", admin_user.get_username()),
        ("training.start", admin_user.get_username()),
    } <= actions


def test_add_form_without_start_leaves_the_training_pending(admin_client):
    response = admin_client.post(ADD, {"configuration": json.dumps(CONFIG)})

    assert response.status_code == 302
    training = Training.objects.get(name="from-admin")
    assert training.status == Training.Status.PENDING
    assert not training.rounds.exists()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{not json", "Not valid JSON"),
        (json.dumps({**CONFIG, "model_type": "transformer"}), "model_type: Unknown model type."),
        (json.dumps({"model_type": "logreg"}), "name: Required."),
        (json.dumps([1, 2]), "must be a JSON object"),
    ],
)
def test_add_form_shows_the_configuration_error_and_creates_nothing(admin_client, text, error):
    response = admin_client.post(ADD, {"configuration": text, "start_now": "on"})

    assert response.status_code == 200
    assert error in response.content.decode()
    assert not Training.objects.exists()


def test_add_form_shows_a_refusal_from_the_service(admin_client, settings):
    settings.FEDSITE_MAX_CONCURRENT_TRAININGS = 1
    make_training("already-running", start=True)

    response = admin_client.post(ADD, {"configuration": json.dumps(CONFIG), "start_now": "on"})

    assert response.status_code == 200
    assert "max_concurrent_trainings is 1" in response.content.decode()


def test_stop_action_stops_running_trainings_through_the_service(admin_client, admin_user):
    running = make_training("running", start=True)
    finished = make_training("finished", start=True)
    admin_client.post(CHANGELIST, {"action": "stop_trainings", "_selected_action": [finished.pk]})
    untouched = make_training("untouched", start=True)

    response = admin_client.post(
        CHANGELIST, {"action": "stop_trainings", "_selected_action": [running.pk, finished.pk]}, follow=True
    )

    running.refresh_from_db()
    untouched.refresh_from_db()
    assert running.status == Training.Status.STOPPED
    assert running.finished_at is not None
    assert running.rounds.get(number=1).status == Round.Status.CANCELLED
    assert untouched.status == Training.Status.RUNNING
    audit = AuditLog.objects.get(action="training.stop", object_id=str(running.pk))
    assert audit.actor == admin_user.get_username()
    content = response.content.decode()
    assert "Stopped 1 training(s)." in content
    assert "Not stopped: finished" in content


def test_change_page_shows_rounds_and_versions_inline(admin_client):
    training = make_training("inline")
    make_round(training, 1, Round.Status.COMPLETED, {"accuracy": 0.8125})

    response = admin_client.get(reverse("admin:trainings_training_change", args=[training.pk]))

    content = response.content.decode()
    assert response.status_code == 200
    assert "0.8125" in content
    assert training.current_version.blob_sha256[:12] in content
    assert reverse("dashboard-training", args=[training.pk]) in content


def test_the_prefilled_example_configuration_is_accepted(admin_client):
    page = admin_client.get(ADD)
    example = page.context["form"].fields["configuration"].initial

    response = admin_client.post(ADD, {"configuration": example})

    assert response.status_code == 302
    assert Training.objects.get().name == json.loads(example)["name"]


def test_secure_aggregation_sessions_and_messages_are_listed_view_only(admin_client):
    from django.utils import timezone

    from monitoring.tests.factories import make_agent
    from trainings.models import SecAggMessage, SecAggSession

    training = make_training("secure-admin")
    round_ = make_round(training, 1, Round.Status.COLLECTING)
    agent = make_agent("party-one")
    session = SecAggSession.objects.create(
        round=round_, attempt=1, setup={"bits": 32}, parties={"7": str(agent.pk)}, deadline=timezone.now()
    )
    SecAggMessage.objects.create(
        session=session, agent=agent, party_id=7, phase="advertise", body={"signature": "c2ln"}
    )
    listing = admin_client.get(reverse("admin:trainings_secaggsession_changelist"))
    assert listing.status_code == 200
    assert b"secure-admin" in listing.content and str(training.pk).encode() not in listing.content
    page = admin_client.get(reverse("admin:trainings_secaggsession_change", args=[session.pk]))
    assert page.status_code == 200
    assert b"party-one" in page.content and b"&quot;bits&quot;: 32" in page.content
    messages = admin_client.get(reverse("admin:trainings_secaggmessage_changelist"))
    assert messages.status_code == 200
    assert b"party-one" in messages.content and b"secure-admin" in messages.content
    message = SecAggMessage.objects.get()
    url = reverse("admin:trainings_secaggmessage_change", args=[message.pk])
    change = admin_client.post(url, {"phase": "x"})
    assert change.status_code == 403 and SecAggMessage.objects.get().phase == "advertise"
