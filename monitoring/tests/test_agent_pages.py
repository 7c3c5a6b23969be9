"""The agents pages: an agent's own page (tasks, updates with their statistics, reliability over its tasks,
contribution), creating an agent or an enrolment key from the dashboard (the secret shown once, stored
hashed), the contribution column of the list, the leaderboard's route, and the ``agent_update`` event."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.test import Client

from clients.models import Agent, EnrollmentKey
from monitoring.contributions import agents_leaderboard
from monitoring.events import SYSTEM_GROUP
from monitoring.models import AuditLog, UpdateStatistics
from monitoring.tests.federation import digits_federation
from trainings.models import Task

ENROLMENT_URL = "/dashboard/enrolment/"
NUM_AGENTS = 3
NOISE_AGENT = 2


@pytest.fixture
def federation(settings: Any, rest_round: Any, make_agent: Any, make_training: Any) -> Any:
    """Three rounds of three digits agents over the agent protocol; agent p2 holds noise only."""
    settings.FEDSITE_CONTRIBUTION_DECAY = 0.8
    training, agents = digits_federation(
        rest_round,
        make_agent,
        make_training,
        prefix="p",
        num_agents=NUM_AGENTS,
        noise_only=[NOISE_AGENT],
        rounds=3,
        name="agent pages",
    )
    return training, [agent for agent, _ in agents]


def _json_script(content: str, element_id: str) -> Any:
    found = re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', content, re.S)
    assert found, f"no json_script {element_id}"
    return json.loads(found.group(1))


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _table(content: str, table_id: str) -> str:
    found = re.search(rf'<table[^>]*id="{table_id}".*?</table>', content, re.S)
    assert found, f"no table #{table_id}"
    return found.group(0)


@pytest.mark.django_db
def test_the_agent_page_shows_its_tasks_updates_flags_reliability_and_contribution(
    staff_client: Client, federation: Any
) -> None:
    training, agents = federation
    agent = agents[0]
    Task.objects.filter(agent=agent, round__number=3).update(status=Task.Status.FAILED)  # one lost task

    response = staff_client.get(f"/dashboard/agents/{agent.agent_id}/")

    assert response.status_code == 200
    content = response.content.decode()
    tasks = _table(content, "agent-tasks")
    assert tasks.count("<tr data-task=") == Task.objects.filter(agent=agent).count() == 3
    assert "agent pages" in tasks and "failed" in tasks and "completed" in tasks
    updates = _table(content, "agent-updates")
    stats = UpdateStatistics.objects.filter(agent=agent).order_by("round_number")
    assert updates.count("<tr data-update=") == stats.count() == 3
    for row in stats:
        assert f"{row.update_norm:.4f}" in updates
    # reliability after each finished task, in the order they finished, ends at the Beta(1, 1) estimate
    series = _json_script(content, "reliability-series")
    assert [point["task"] for point in series] == [1, 2, 3]
    statuses = [point["status"] for point in series]
    completed = [statuses[: i + 1].count("completed") for i in range(3)]
    assert [point["reliability"] for point in series] == pytest.approx(
        [(done + 1) / (i + 3) for i, done in enumerate(completed)]
    )
    assert series[-1]["reliability"] == pytest.approx(3 / 5)  # 2 completed of 3
    # the contribution card is the leaderboard's figure for this agent
    board = {row["agent_id"]: row for row in agents_leaderboard()["agents"]}
    assert board[agent.agent_id]["contribution"] is not None
    card = re.search(r'id="agent-contribution">([^<]+)<', content).group(1)
    assert card == f"{board[agent.agent_id]['contribution']:.3f}"
    assert f'data-training="{training.pk}"' in _table(content, "contributions")
    # the status buttons: the current status's own button is not offered
    assert re.search(r'<button[^>]*data-action="activate"[^>]*hidden', content)
    assert not re.search(r'<button[^>]*data-action="quarantine"[^>]*hidden', content)


@pytest.mark.django_db
def test_a_flagged_update_shows_its_reasons_on_the_agent_page(staff_client: Client, federation: Any) -> None:
    _, agents = federation
    noise = agents[NOISE_AGENT]
    row = UpdateStatistics.objects.filter(agent=noise).order_by("round_number").last()
    UpdateStatistics.objects.filter(pk=row.pk).update(flagged=True, reasons=["update_norm", "cosine"])

    content = staff_client.get(f"/dashboard/agents/{noise.agent_id}/").content.decode()

    flagged = re.findall(r'<tr data-update="[^"]+" class="flagged">(.*?)</tr>', content, re.S)
    assert len(flagged) == 1
    assert "update_norm" in flagged[0] and "cosine" in flagged[0]


@pytest.mark.django_db
def test_the_agent_page_of_an_agent_without_tasks_and_of_an_unknown_one(
    staff_client: Client, make_agent: Any
) -> None:
    agent, _ = make_agent("idle-one")

    page = staff_client.get(f"/dashboard/agents/{agent.agent_id}/")
    missing = staff_client.get("/dashboard/agents/nobody/")
    anonymous = Client().get(f"/dashboard/agents/{agent.agent_id}/")

    assert page.status_code == 200
    assert _json_script(page.content.decode(), "reliability-series") == []
    assert "No task yet." in page.content.decode()
    assert missing.status_code == 404
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]


@pytest.mark.django_db
def test_the_agents_list_links_each_agent_and_sorts_by_contribution(
    staff_client: Client, federation: Any, make_agent: Any
) -> None:
    make_agent("no-contribution-yet")
    board = {row["agent_id"]: row["contribution"] for row in agents_leaderboard()["agents"]}
    measured = sorted((value, name) for name, value in board.items() if value is not None)

    ascending = staff_client.get("/dashboard/agents/?sort=contribution&order=asc").content.decode()
    descending = staff_client.get("/dashboard/agents/?sort=contribution&order=desc").content.decode()

    def order(content: str) -> list[str]:
        return re.findall(r'<tr data-agent="([^"]+)"', content)

    assert order(ascending) == [name for _, name in measured] + ["no-contribution-yet"]
    assert order(descending) == [name for _, name in reversed(measured)] + ["no-contribution-yet"]
    assert order(ascending)[0] == f"p{NOISE_AGENT}"  # the noise-only agent contributes least
    for value, name in measured:
        row = re.search(rf'<tr data-agent="{name}".*?</tr>', ascending, re.S)
        assert row, name
        cell = re.search(r'data-cell="contribution">([^<]+)<', row.group(0))
        assert cell and cell.group(1) == f"{value:.3f}", (name, row.group(0))
    assert '<a href="/dashboard/agents/p0/">p0</a>' in ascending


@pytest.mark.django_db
def test_the_leaderboard_route_is_not_read_as_an_agent_named_leaderboard(
    staff_client: Client, federation: Any
) -> None:
    with_slash = staff_client.get("/api/v1/agents/leaderboard/")
    without = staff_client.get("/api/v1/agents/leaderboard")

    assert with_slash.status_code == 200, with_slash.content
    assert with_slash.json() == without.json()
    assert {row["agent_id"] for row in with_slash.json()["agents"]} == {f"p{i}" for i in range(NUM_AGENTS)}
    # and no agent can take the name the route uses
    refused = staff_client.post(
        "/api/v1/agents/", {"agent_id": "leaderboard"}, content_type="application/json"
    )
    assert refused.status_code == 400 and "reserved" in refused.json()["error"]["message"]
    assert not Agent.objects.filter(agent_id="leaderboard").exists()


# --- creating agents and enrolment keys ------------------------------------------------------------------
def _secret_on(content: str) -> str | None:
    found = re.search(r'id="secret-value" class="secret-value" value="([^"]+)"', content)
    return found.group(1) if found else None


@pytest.mark.django_db
def test_creating_an_agent_shows_its_token_once_and_stores_only_its_hash(staff_client: Client) -> None:
    posted = staff_client.post(ENROLMENT_URL, {"create": "agent", "agent-agent_id": "ward-9"})

    assert posted.status_code == 302 and posted["Location"] == ENROLMENT_URL
    first = staff_client.get(ENROLMENT_URL)
    token = _secret_on(first.content.decode())
    agent = Agent.objects.get(agent_id="ward-9")
    assert token and token.startswith("fsa_")
    assert agent.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in json.dumps(list(Agent.objects.values()), default=str)
    assert "no-store" in first["Cache-Control"]
    # the token works for the agent protocol
    heartbeat = Client().post(
        "/api/v1/agent/heartbeat", {}, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}"
    )
    assert heartbeat.status_code == 200
    # a reload does not show it again
    again = staff_client.get(ENROLMENT_URL).content.decode()
    assert _secret_on(again) is None and token not in again
    entry = AuditLog.objects.get(action="agent.create", object_id=str(agent.pk))
    assert entry.actor == "operator"


@pytest.mark.django_db
def test_a_secret_whose_redirect_was_not_followed_in_time_is_never_shown(staff_client: Client) -> None:
    from monitoring.views import ONE_TIME_SECRET_SECONDS, ONE_TIME_SECRET_SESSION_KEY

    staff_client.post(ENROLMENT_URL, {"create": "key", "key-label": "late"})
    session = staff_client.session
    stored = session[ONE_TIME_SECRET_SESSION_KEY]
    stored["created"] -= ONE_TIME_SECRET_SECONDS + 1
    session[ONE_TIME_SECRET_SESSION_KEY] = stored
    session.save()

    late = staff_client.get(ENROLMENT_URL).content.decode()

    assert _secret_on(late) is None and stored["value"] not in late
    assert ONE_TIME_SECRET_SESSION_KEY not in staff_client.session
    assert EnrollmentKey.objects.filter(label="late").exists()


@pytest.mark.django_db
def test_an_enrolment_key_from_the_dashboard_enrols_an_agent(staff_client: Client) -> None:
    staff_client.post(
        ENROLMENT_URL,
        {"create": "key", "key-label": "ward 10", "key-max_uses": "1", "key-expires_in_days": "2"},
    )
    secret = _secret_on(staff_client.get(ENROLMENT_URL).content.decode())
    key = EnrollmentKey.objects.get(label="ward 10")

    enrolled = Client().post(
        "/api/v1/agent/enroll",
        {"enrollment_key": secret, "agent_id": "ward-10-a"},
        content_type="application/json",
    )
    used_up = Client().post(
        "/api/v1/agent/enroll",
        {"enrollment_key": secret, "agent_id": "ward-10-b"},
        content_type="application/json",
    )

    assert key.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert key.max_uses == 1 and key.created_by.username == "operator" and key.expires_at is not None
    assert enrolled.status_code == 201, enrolled.content
    assert used_up.status_code == 403
    listed = staff_client.get(ENROLMENT_URL).content.decode()
    assert _secret_on(listed) is None and "ward 10" in _table(listed, "enrolment-keys")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("data", "field", "expected"),
    [
        ({"create": "agent", "agent-agent_id": "bad id!"}, "agent_id", "letters, digits"),
        ({"create": "agent", "agent-agent_id": "p-taken"}, "agent_id", "already exists"),
        ({"create": "agent", "agent-agent_id": "leaderboard"}, "agent_id", "reserved"),
        ({"create": "key", "key-label": "", "key-max_uses": ""}, "label", "required"),
        ({"create": "key", "key-label": "k", "key-max_uses": "0"}, "max_uses", "greater than or equal to 1"),
        ({"create": "key", "key-label": "k", "key-expires_in_days": "-1"}, "expires_in_days", "greater"),
    ],
)
def test_bad_input_is_shown_next_to_its_field_and_creates_nothing(
    staff_client: Client, make_agent: Any, data: dict[str, str], field: str, expected: str
) -> None:
    make_agent("p-taken")
    agents_before = Agent.objects.count()

    response = staff_client.post(ENROLMENT_URL, data)

    assert response.status_code == 200
    content = response.content.decode()
    block = re.search(rf'<div class="field has-error" data-field-name="{field}">(.*?)</div>', content, re.S)
    assert block and expected in _text(block.group(1)), content
    assert Agent.objects.count() == agents_before and not EnrollmentKey.objects.exists()
    assert _secret_on(content) is None


@pytest.mark.django_db
def test_creating_needs_a_staff_session_and_the_csrf_token(staff_client: Client, django_user_model) -> None:
    user = django_user_model.objects.create_user("viewer", password="a-long-viewer-password")
    viewer = Client()
    viewer.force_login(user)
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(staff_client.user)

    as_viewer = viewer.post(ENROLMENT_URL, {"create": "agent", "agent-agent_id": "sneaky"})
    without_csrf = strict.post(ENROLMENT_URL, {"create": "agent", "agent-agent_id": "forged"})

    assert as_viewer.status_code == 302 and "/login/" in as_viewer["Location"]
    assert without_csrf.status_code == 403
    assert not Agent.objects.filter(agent_id__in=["sneaky", "forged"]).exists()


# --- the agent_update event -------------------------------------------------------------------------------
async def _receive(layer: Any, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout=5)


@pytest.mark.django_db(transaction=True)
def test_a_status_change_and_a_task_outcome_reach_every_dashboard_as_agent_update(
    staff_client: Client, make_agent: Any
) -> None:
    from clients.services import agent_record_outcome

    agent, _ = make_agent("evented")
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(SYSTEM_GROUP, channel)
    try:
        staff_client.post(f"/api/v1/agents/{agent.agent_id}/quarantine/")
        agent_record_outcome(agent_id=agent.pk, outcome="failed")
        first = async_to_sync(_receive)(layer, channel)
        second = async_to_sync(_receive)(layer, channel)
    finally:
        async_to_sync(layer.group_discard)(SYSTEM_GROUP, channel)

    assert first["event"] == second["event"] == "agent_update"
    assert first["training_id"] is None
    assert first["payload"]["agent_id"] == "evented" and first["payload"]["status"] == "quarantined"
    assert second["payload"]["tasks_failed"] == 1
    assert second["payload"]["reliability"] == pytest.approx(1 / 3)


@pytest.mark.django_db
def test_the_training_page_lists_its_agents_with_links_to_their_pages(
    staff_client: Client, federation: Any
) -> None:
    training, _ = federation

    content = staff_client.get(f"/dashboard/trainings/{training.pk}/").content.decode()

    agents = _table(content, "training-agents")
    rows = re.findall(r'<tr data-agent="([^"]+)"><td><a href="/dashboard/agents/\1/">', agents)
    assert rows[-1] == f"p{NOISE_AGENT}" and sorted(rows) == [f"p{i}" for i in range(NUM_AGENTS)]
