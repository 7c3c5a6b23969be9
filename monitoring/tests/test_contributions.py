"""Contribution scores and the leaderboards, from real rounds of digits agents over the agent protocol."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from monitoring.anomalies import contribution_next
from monitoring.models import UpdateStatistics
from monitoring.tests.federation import digits_federation
from trainings.selectors import selection_weights

NUM_AGENTS = 6
NOISE_AGENT = 4


@pytest.fixture
def federation(settings: Any, rest_round: Any, make_agent: Any, make_training: Any) -> Any:
    """Four rounds of six digits agents; agent d4 holds noise only (random features and labels)."""
    settings.FEDSITE_CONTRIBUTION_DECAY = 0.8
    return digits_federation(
        rest_round,
        make_agent,
        make_training,
        prefix="d",
        num_agents=NUM_AGENTS,
        noise_only=[NOISE_AGENT],
        rounds=4,
    )


def test_contribution_is_the_running_cosine_estimator() -> None:
    assert contribution_next(None, None, decay=0.8) is None
    assert contribution_next(None, 0.5, decay=0.8) == 0.5
    assert contribution_next(0.5, None, decay=0.8) == 0.5
    assert contribution_next(0.5, -1.0, decay=0.8) == pytest.approx(0.8 * 0.5 + 0.2 * -1.0)


@pytest.mark.django_db
def test_an_agent_with_noise_only_data_ranks_below_every_honest_one(
    staff_client: Any, federation: Any
) -> None:
    training, _ = federation

    response = staff_client.get(f"/api/v1/trainings/{training.pk}/leaderboard")

    assert response.status_code == 200, response.content
    board = response.json()
    ranking = [row["agent_id"] for row in board["agents"]]
    assert ranking[-1] == f"d{NOISE_AGENT}", board
    rows = {row["agent_id"]: row for row in board["agents"]}
    noise = rows[f"d{NOISE_AGENT}"]["contribution"]
    assert all(rows[f"d{i}"]["contribution"] > noise for i in range(NUM_AGENTS) if i != NOISE_AGENT)
    assert board["rounds_completed"] == 4
    assert all(row["participation"] == 1.0 and row["updates_aggregated"] == 4 for row in board["agents"])
    assert all(row["reliability"] == pytest.approx(5 / 6) for row in board["agents"])  # 4 done, Beta(1, 1)
    # the stored running estimate equals the estimator replayed over the stored per-round cosines
    cosines = list(
        UpdateStatistics.objects.filter(training=training, agent__agent_id="d0")
        .order_by("round_number")
        .values_list("cosine", flat=True)
    )
    assert cosines[0] is None and all(c is not None for c in cosines[1:])
    expected = None
    for cosine in cosines:
        expected = contribution_next(expected, cosine, decay=0.8)
    assert rows["d0"]["contribution"] == pytest.approx(expected)


@pytest.mark.django_db
def test_leaderboards_sort_by_order_and_refuse_an_unknown_key(staff_client: Any, federation: Any) -> None:
    training, _ = federation
    url = f"/api/v1/trainings/{training.pk}/leaderboard"

    ascending = staff_client.get(url + "?order=contribution").json()["agents"]
    by_name = staff_client.get(url + "?order=-agent_id").json()["agents"]
    bad = staff_client.get(url + "?order=height")

    assert ascending[0]["agent_id"] == f"d{NOISE_AGENT}"
    values = [row["contribution"] for row in ascending]
    assert values == sorted(values)
    assert [row["agent_id"] for row in by_name] == [f"d{i}" for i in reversed(range(NUM_AGENTS))]
    assert bad.status_code == 400 and "order" in bad.json()["error"]["message"]
    overall = staff_client.get("/api/v1/agents/leaderboard").json()
    assert overall["agents"][-1]["agent_id"] == f"d{NOISE_AGENT}"
    assert {row["agent_id"] for row in overall["agents"]} == {f"d{i}" for i in range(NUM_AGENTS)}
    assert staff_client.get("/api/v1/agents/leaderboard?order=-flags").status_code == 200
    assert staff_client.get("/api/v1/agents/leaderboard?order=-").status_code == 400
    assert Client().get("/api/v1/agents/leaderboard").status_code in (401, 403)
    assert Client().get(url).status_code in (401, 403)


@pytest.mark.django_db
def test_reliability_selection_weighs_contribution(settings: Any, federation: Any) -> None:
    training, agents = federation
    pool = [agent for agent, _ in agents]
    settings.FEDSITE_SELECTION_CONTRIBUTION_WEIGHT = 0.0
    plain = selection_weights(training=training, agents=pool)
    settings.FEDSITE_SELECTION_CONTRIBUTION_WEIGHT = 1.0
    weighted = selection_weights(training=training, agents=pool)

    assert plain == pytest.approx([agent.reliability for agent in pool])
    assert weighted[NOISE_AGENT] < min(w for i, w in enumerate(weighted) if i != NOISE_AGENT)
    assert all(w > 0 for w in weighted)
