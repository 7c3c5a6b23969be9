"""Admin flows for agents and enrolment keys: secrets shown once, stored hashed, changes through services."""

from __future__ import annotations

import hashlib
import re

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from clients.models import Agent, EnrollmentKey
from clients.services import agent_authenticate, agent_enroll
from monitoring.models import AuditLog
from monitoring.tests.factories import make_agent

pytestmark = pytest.mark.django_db

AGENT_ADD = reverse("admin:clients_agent_add")
AGENT_CHANGELIST = reverse("admin:clients_agent_changelist")
KEY_ADD = reverse("admin:clients_enrollmentkey_add")


@pytest.fixture(autouse=True)
def _media_in_tmp(settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path / "media")


def _messages(response):
    return [str(message) for message in get_messages(response.wsgi_request)]


def test_add_agent_shows_the_token_once_and_stores_only_its_hash(admin_client, admin_user):
    response = admin_client.post(AGENT_ADD, {"agent_id": "hospital-7", "capabilities": '{"gpu": true}'})

    agent = Agent.objects.get(agent_id="hospital-7")
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:clients_agent_change", args=[agent.pk])
    shown = [text for text in _messages(response) if "token" in text]
    assert len(shown) == 1
    token = re.search(r"(fsa_[A-Za-z0-9_-]+)", shown[0]).group(1)
    assert agent.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert agent_authenticate(authorization=f"Bearer {token}") == agent
    stored = [str(getattr(agent, field.attname)) for field in Agent._meta.concrete_fields]
    assert not any(token in value for value in stored)
    assert agent.capabilities == {"gpu": True}
    # Shown once: the next page (the redirect target) has the message, later pages do not.
    first_page = admin_client.get(response["Location"]).content.decode()
    second_page = admin_client.get(response["Location"]).content.decode()
    assert token in first_page
    assert token not in second_page
    assert agent.token_hash in second_page
    audit = AuditLog.objects.get(action="agent.create", object_id=str(agent.pk))
    assert (audit.actor_type, audit.actor) == ("user", admin_user.get_username())


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"agent_id": "bad id!", "capabilities": ""}, "An agent id is 1 to 64 characters"),
        ({"agent_id": "taken", "capabilities": ""}, "already exists"),
        ({"agent_id": "fine", "capabilities": "[1, 2]"}, "must be a JSON object"),
    ],
)
def test_add_agent_form_errors_create_nothing(admin_client, data, error):
    make_agent("taken")

    response = admin_client.post(AGENT_ADD, data)

    assert response.status_code == 200
    assert error in response.content.decode()
    assert Agent.objects.count() == 1


@pytest.mark.parametrize(
    ("action", "status"),
    [("quarantine", "quarantined"), ("disable", "disabled"), ("activate", "active")],
)
def test_status_actions_go_through_the_service_and_are_audited(admin_client, admin_user, action, status):
    initial = "disabled" if status == "active" else "active"
    first, second = make_agent("a1", status=initial), make_agent("a2", status=initial)
    bystander = make_agent("a3", status=initial)

    response = admin_client.post(
        AGENT_CHANGELIST, {"action": action, "_selected_action": [first.pk, second.pk]}, follow=True
    )

    assert response.status_code == 200
    assert set(Agent.objects.filter(status=status).values_list("agent_id", flat=True)) == {"a1", "a2"}
    bystander.refresh_from_db()
    assert bystander.status == initial
    audits = AuditLog.objects.filter(action=f"agent.{status}")
    assert sorted(audits.values_list("object_id", flat=True)) == sorted([str(first.pk), str(second.pk)])
    assert set(audits.values_list("actor", flat=True)) == {admin_user.get_username()}


def test_add_enrollment_key_shows_the_secret_once_and_it_enrols_an_agent(admin_client, admin_user):
    response = admin_client.post(KEY_ADD, {"label": "pilot", "max_uses": "2"})

    key = EnrollmentKey.objects.get(label="pilot")
    assert response.status_code == 302
    shown = [text for text in _messages(response) if "secret" in text]
    assert len(shown) == 1
    secret = re.search(r"(fse_[A-Za-z0-9_-]+)", shown[0]).group(1)
    assert key.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert key.max_uses == 2
    assert key.created_by == admin_user
    agent, _ = agent_enroll(enrollment_key=secret, agent_id="self-enrolled")
    assert agent.enrolled_via == Agent.EnrolledVia.ENROLLMENT_KEY
    admin_client.get(response["Location"])  # consumes the one-time message
    assert secret not in admin_client.get(response["Location"]).content.decode()


def test_revoking_an_enrollment_key_in_the_admin_is_audited(admin_client, admin_user):
    admin_client.post(KEY_ADD, {"label": "to-revoke"})
    key = EnrollmentKey.objects.get(label="to-revoke")

    response = admin_client.post(
        reverse("admin:clients_enrollmentkey_change", args=[key.pk]),
        {"label": "to-revoke", "max_uses": "", "expires_at_0": "", "expires_at_1": "", "revoked": "on"},
    )

    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked is True
    audit = AuditLog.objects.get(action="enrollment_key.revoke", object_id=str(key.pk))
    assert audit.actor == admin_user.get_username()
    assert audit.details == {"revoked": "True"}
