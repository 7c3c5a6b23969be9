"""Agent protocol: authentication, enrolment, heartbeat, authority and the error shape."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.test import override_settings

from clients.models import Agent
from clients.services import enrollment_key_create


def _error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert {"code", "message", "details"} <= set(body["error"])
    return body["error"]


@pytest.mark.django_db
def test_missing_or_bad_token_is_401_in_the_error_shape(client: Any) -> None:
    response = client.post("/api/v1/agent/heartbeat", {}, content_type="application/json")
    assert response.status_code == 401
    _error(response)
    response = client.post(
        "/api/v1/agent/heartbeat",
        {},
        content_type="application/json",
        HTTP_AUTHORIZATION="Bearer fsa_not-a-real-token",
    )
    assert response.status_code == 401
    assert _error(response)["code"] == "invalid_token"
    poll = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION="Bearer nope")
    assert poll.status_code == 401
    assert _error(poll)["code"] == "invalid_token"


@pytest.mark.django_db
def test_token_is_stored_hashed_and_heartbeat_updates_last_seen(client: Any, make_agent: Any) -> None:
    agent, token = make_agent(online=False)
    assert agent.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(Agent.objects.filter(pk=agent.pk).values().get())
    response = client.post(
        "/api/v1/agent/heartbeat",
        {"state": "training"},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 200, response.content
    agent.refresh_from_db()
    assert agent.last_seen_at is not None and agent.state == "training"
    bad = client.post(
        "/api/v1/agent/heartbeat",
        {"state": "dancing"},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert bad.status_code == 400
    assert "state" in _error(bad)["message"]


@pytest.mark.django_db
def test_disabled_agent_is_403(client: Any, make_agent: Any) -> None:
    agent, token = make_agent()
    Agent.objects.filter(pk=agent.pk).update(status=Agent.Status.DISABLED)
    response = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 403
    assert _error(response)["code"] == "agent_disabled"


@pytest.mark.django_db
def test_enrolment_with_a_key_gives_a_working_token_and_respects_max_uses(client: Any) -> None:
    _, secret = enrollment_key_create(label="lab", max_uses=1)
    response = client.post(
        "/api/v1/agent/enroll",
        {"enrollment_key": secret, "agent_id": "site-1"},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    token = response.json()["token"]
    assert (
        client.post(
            "/api/v1/agent/heartbeat",
            {},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        ).status_code
        == 200
    )
    again = client.post(
        "/api/v1/agent/enroll",
        {"enrollment_key": secret, "agent_id": "site-2"},
        content_type="application/json",
    )
    assert again.status_code == 403
    assert _error(again)["code"] == "bad_enrollment_key"
    assert not Agent.objects.filter(agent_id="site-2").exists()


@pytest.mark.django_db
@override_settings(FEDSITE_ENROLLMENT_KEY="settings-key-123")
def test_enrolment_rejects_bad_ids_duplicates_and_bad_keys(client: Any) -> None:
    def enroll(**body: Any) -> Any:
        return client.post("/api/v1/agent/enroll", body, content_type="application/json")

    assert enroll(enrollment_key="settings-key-123", agent_id="ok-1").status_code == 201
    duplicate = enroll(enrollment_key="settings-key-123", agent_id="ok-1")
    assert duplicate.status_code == 409
    assert _error(duplicate)["code"] == "agent_exists"
    assert enroll(enrollment_key="settings-key-123", agent_id="bad id!").status_code == 400
    assert enroll(enrollment_key="settings-key-123", agent_id="x" * 65).status_code == 400
    assert enroll(enrollment_key="wrong", agent_id="ok-2").status_code == 403
    assert enroll(agent_id="ok-3").status_code == 400
    assert client.post("/api/v1/agent/enroll", "[1,2]", content_type="application/json").status_code == 400
    assert (
        client.post("/api/v1/agent/enroll", "{not json", content_type="application/json").status_code == 400
    )


@pytest.mark.django_db
def test_agent_token_cannot_reach_operator_endpoints(client: Any, make_agent: Any) -> None:
    _, token = make_agent()
    for path in ("/api/v1/trainings/", "/api/alerts", "/api/system/health", "/api/v1/agents/"):
        response = client.get(path, HTTP_AUTHORIZATION=f"Bearer {token}")
        assert response.status_code in (401, 403), path
        _error(response)


@pytest.mark.django_db
def test_wait_out_of_range_is_400(client: Any, make_agent: Any) -> None:
    _, token = make_agent()
    for wait in ("-1", "61", "abc"):
        response = client.get(f"/api/v1/agent/tasks/next?wait={wait}", HTTP_AUTHORIZATION=f"Bearer {token}")
        assert response.status_code == 400, wait
        _error(response)
    assert (
        client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 204
    )


@pytest.mark.django_db
def test_model_download_needs_a_task_in_that_training(
    client: Any, make_agent: Any, make_training: Any
) -> None:
    make_agent(), make_agent()
    _outsider, outsider_token = make_agent("outsider", online=False)
    training = make_training(min_clients_per_round=2, max_clients_per_round=2)
    url = f"/api/v1/agent/models/{training.current_version.pk}"
    response = client.get(url, HTTP_AUTHORIZATION=f"Bearer {outsider_token}")
    assert response.status_code == 403
    assert _error(response)["code"] == "not_your_model"
    missing = client.get("/api/v1/agent/models/not-a-uuid", HTTP_AUTHORIZATION=f"Bearer {outsider_token}")
    assert missing.status_code == 404
