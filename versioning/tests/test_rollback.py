"""Manual rollback over REST, the command and the admin, against Postgres with real rounds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.management import call_command
from django.core.management.base import CommandError

from monitoring.events import training_group
from monitoring.models import AuditLog
from trainings.models import Round, Training
from versioning.models import ModelVersion, Rollback


@pytest.fixture
def two_agents(make_agent: Any) -> list[str]:
    return [make_agent()[1], make_agent()[1]]


def _events(channel: str) -> list[dict[str, Any]]:
    layer = get_channel_layer()

    async def drain() -> list[dict[str, Any]]:
        received = []
        while True:
            try:
                received.append(await asyncio.wait_for(layer.receive(channel), timeout=0.5))
            except TimeoutError:
                return received

    return async_to_sync(drain)()


def _listen(training: Training) -> str:
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(training_group(training.pk), channel)
    return channel


@pytest.mark.django_db(transaction=True)
def test_rollback_while_running_sets_the_next_rounds_base(
    staff_client: Any, make_training: Any, two_agents: list[str], run_round: Any
) -> None:
    training = make_training(
        min_clients_per_round=2, max_clients_per_round=2, max_rounds=6, algorithm="fedavgm"
    )
    run_round(training, two_agents, [1.0, 2.0])
    run_round(training, two_agents, [3.0, 4.0])
    target = training.versions.get(number=1)
    assert target.state_blob_sha256  # FedAvgM keeps momentum with each version
    assert training.rounds.get(number=3).status == Round.Status.COLLECTING

    response = staff_client.post(
        f"/api/v1/trainings/{training.pk}/rollback", {"version": 1}, content_type="application/json"
    )
    assert response.status_code == 200, response.content
    assert response.json() == {
        "training_id": str(training.pk),
        "target_version": 1,
        "status": "pending",
        "version": None,
    }
    training.refresh_from_db()
    assert training.current_version.number == 2  # nothing changes until the round in flight commits

    channel = _listen(training)
    run_round(training, two_agents, [5.0, 6.0])  # round 3 commits version 3, then the rollback applies
    rollback_version = training.versions.get(origin=ModelVersion.Origin.ROLLBACK)
    assert rollback_version.number == 4
    assert rollback_version.parent_id == target.pk
    assert rollback_version.blob_sha256 == target.blob_sha256
    assert rollback_version.state_blob_sha256 == target.state_blob_sha256  # momentum restored too
    assert training.current_version_id == rollback_version.pk
    next_round = training.rounds.order_by("-number").first()
    assert next_round.number == 5
    assert next_round.base_version_id == rollback_version.pk
    assert next_round.base_version.blob_sha256 == target.blob_sha256
    # the agents are handed the target's weights
    payloads = run_round(training, two_agents, [0.5, 0.5])
    assert {p["model"]["sha256"] for p in payloads} == {target.blob_sha256}
    assert training.versions.get(number=5).parent_id == rollback_version.pk

    events = [e for e in _events(channel) if e.get("event") == "training.rolled_back"]
    assert len(events) == 1 and events[0]["payload"]["target_version"] == 1
    actions = set(AuditLog.objects.filter(object_id=str(training.pk)).values_list("action", flat=True))
    assert {"training.rollback", "training.rollback_applied"} <= actions
    assert Rollback.objects.get(training=training).status == Rollback.Status.APPLIED


@pytest.mark.django_db
def test_rollback_after_completion_sets_the_current_version(
    staff_client: Any, make_training: Any, two_agents: list[str], run_round: Any
) -> None:
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_rounds=2)
    run_round(training, two_agents, [1.0, 2.0])
    run_round(training, two_agents, [3.0, 4.0])
    assert training.status == Training.Status.COMPLETED
    target = training.versions.get(number=1)

    response = staff_client.post(
        f"/api/v1/trainings/{training.pk}/rollback",
        {"version": 1, "reason": "round 2 overfit"},
        content_type="application/json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "applied" and response.json()["version"] == 3
    training.refresh_from_db()
    assert training.status == Training.Status.COMPLETED
    assert training.current_version.number == 3
    assert training.current_version.origin == ModelVersion.Origin.ROLLBACK
    assert training.current_version.blob_sha256 == target.blob_sha256
    detail = staff_client.get(f"/api/v1/trainings/{training.pk}/").json()
    assert detail["current_version_number"] == 3
    entry = AuditLog.objects.get(action="training.rollback", object_id=str(training.pk))
    assert entry.actor == "operator" and entry.details["reason"] == "round 2 overfit"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 400, "version"),
        ({"version": "one"}, 400, "version"),
        ({"version": True}, 400, "version"),
        ({"version": -1}, 400, "version"),
        ({"version": 42}, 404, "version"),
        ({"version": 10**30}, 400, "version"),
        ({"version": 0, "force": True}, 400, "force"),
        ({"version": 0, "reason": 5}, 400, "reason"),
    ],
)
def test_bad_rollback_requests_are_clear_4xx(
    staff_client: Any, make_training: Any, body: dict[str, Any], status: int, field: str
) -> None:
    training = make_training(start=False)
    response = staff_client.post(
        f"/api/v1/trainings/{training.pk}/rollback", body, content_type="application/json"
    )
    assert response.status_code == status, response.content
    assert field in response.json()["error"]["details"]
    assert not Rollback.objects.exists()


@pytest.mark.django_db
def test_rollback_needs_staff(client: Any, make_training: Any) -> None:
    training = make_training(start=False)
    response = client.post(
        f"/api/v1/trainings/{training.pk}/rollback", {"version": 0}, content_type="application/json"
    )
    assert response.status_code in (401, 403)
    assert not Rollback.objects.exists()


@pytest.mark.django_db
def test_running_asynchronous_training_is_refused(staff_client: Any, make_training: Any) -> None:
    training = make_training(algorithm="fedbuff", hyperparameters={"buffer_size": 2})
    response = staff_client.post(
        f"/api/v1/trainings/{training.pk}/rollback", {"version": 0}, content_type="application/json"
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "rollback_asynchronous_running"


@pytest.mark.django_db
def test_command_and_admin_action(
    admin_client: Any, make_training: Any, two_agents: list[str], run_round: Any, capsys: Any
) -> None:
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_rounds=2)
    run_round(training, two_agents, [1.0, 2.0])
    run_round(training, two_agents, [3.0, 4.0])
    call_command("rollback_training", str(training.pk), "1")
    assert "version 3 (a copy of version 1) is now current" in capsys.readouterr().out
    with pytest.raises(CommandError, match="no version 9"):
        call_command("rollback_training", str(training.pk), "9")

    version0 = training.versions.get(number=0)
    response = admin_client.post(
        "/admin/versioning/modelversion/",
        {"action": "rollback_to_this_version", "_selected_action": [str(version0.pk)]},
        follow=True,
    )
    assert response.status_code == 200
    training.refresh_from_db()
    assert training.current_version.number == 4
    assert training.current_version.parent_id == version0.pk
    actors = list(
        AuditLog.objects.filter(action="training.rollback", object_id=str(training.pk))
        .order_by("pk")
        .values_list("actor", flat=True)
    )
    assert actors == ["manage.py rollback_training", "admin"]
