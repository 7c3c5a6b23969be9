"""The aggregation outbox against the real database: the intent is committed with the round's close, the
beat check relays what was never sent and re-sends what went silent, alerts once and resolves on
completion, and never rewrites the round's timestamps. (The same faults on real processes, with a
SIGKILLed worker and a stopped Redis, are in tests/test_faults_aggregation.py.)"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings

from monitoring.models import Alert
from trainings.models import AggregationOutbox, Round, Training
from trainings.outbox import aggregation_heartbeat, aggregations_recover
from trainings.tasks import aggregate_round
from trainings.tests.agent_rest import constant_delta, post_update


def _upload(client: Any, token: str, task: dict[str, Any], training: Training) -> Any:
    return post_update(client, token, task, constant_delta(training, 0.5), num_examples=10, metrics={})


def _close_round_one(
    client: Any, make_agent: Any, make_training: Any, capture: Any
) -> tuple[Training, Round]:
    """Two agents upload round 1; the after-commit relay is *not* run (as if the broker refused it or the
    process died right after commit)."""
    agents = [make_agent(), make_agent()]
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_rounds=2)
    tasks = []
    for _, token in agents:
        response = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")
        assert response.status_code == 200, response.content
        tasks.append(response.json())
    with capture(execute=False) as callbacks:
        for (_, token), task in zip(agents, tasks, strict=True):
            assert _upload(client, token, task, training).status_code == 201
    assert callbacks  # the relay (and the events) wait for the commit
    return training, Round.objects.get(training=training, number=1)


@pytest.mark.django_db
def test_closing_a_round_commits_the_intent_with_the_state_change(
    client: Any, make_agent: Any, make_training: Any, django_capture_on_commit_callbacks: Any
) -> None:
    _training, round_one = _close_round_one(
        client, make_agent, make_training, django_capture_on_commit_callbacks
    )
    assert round_one.status == Round.Status.AGGREGATING
    outbox = AggregationOutbox.objects.get(round=round_one)
    assert outbox.sent_at is None and outbox.sends == 0 and outbox.completed_at is None


@pytest.mark.django_db
def test_beat_check_relays_an_unsent_intent_alerts_and_resolves_on_completion(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
) -> None:
    training, round_one = _close_round_one(
        client, make_agent, make_training, django_capture_on_commit_callbacks
    )
    outbox = AggregationOutbox.objects.get(round=round_one)
    closed_at = round_one.closed_at
    # within the grace period the commit-time relay may still be under way: leave it alone
    assert aggregations_recover(now=outbox.created_at)["aggregations_relayed"] == 0
    with django_capture_on_commit_callbacks(execute=True):
        summary = aggregations_recover(now=outbox.created_at + timedelta(seconds=10))
    assert summary["aggregations_relayed"] == 1
    round_one.refresh_from_db()
    assert round_one.status == Round.Status.COMPLETED
    assert round_one.closed_at == closed_at
    assert training.versions.filter(number=1).count() == 1
    outbox.refresh_from_db()
    assert (outbox.sends, outbox.runs) == (1, 1) and outbox.completed_at is not None
    alert = Alert.objects.get(training=training, kind=Alert.Kind.AGGREGATION_STALLED)
    assert alert.round_number == 1 and alert.details["action"] == "relay"
    assert alert.resolved_at is not None
    # a completed round is never sent again
    assert aggregations_recover(now=outbox.created_at + timedelta(hours=1)) == {
        "aggregations_relayed": 0,
        "aggregations_resent": 0,
        "aggregations_refused": 0,
    }


@pytest.mark.django_db
def test_the_alerts_api_shows_when_a_stall_resolved(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
    staff_client: Any,
) -> None:
    _close_round_one(client, make_agent, make_training, django_capture_on_commit_callbacks)
    outbox = AggregationOutbox.objects.get()
    with django_capture_on_commit_callbacks(execute=True):
        aggregations_recover(now=outbox.created_at + timedelta(seconds=10))
    response = staff_client.get("/api/alerts")
    assert response.status_code == 200
    stalled = [a for a in response.json()["alerts"] if a["kind"] == "aggregation_stalled"]
    assert len(stalled) == 1 and stalled[0]["resolved_at"] is not None


@pytest.mark.django_db
@override_settings(FEDSITE_AGGREGATION_STALL_SECONDS=30)
def test_a_silent_aggregation_is_resent_after_the_stall_period_and_a_beating_one_is_not(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
) -> None:
    training, round_one = _close_round_one(
        client, make_agent, make_training, django_capture_on_commit_callbacks
    )
    sent = round_one.closed_at
    heartbeat = sent + timedelta(seconds=20)
    # a worker took it and heartbeated, then died
    AggregationOutbox.objects.filter(round=round_one).update(
        sent_at=sent, sends=1, started_at=sent, runs=1, heartbeat_at=heartbeat
    )
    quiet = aggregations_recover(now=heartbeat + timedelta(seconds=29))
    assert quiet["aggregations_resent"] == 0
    assert not Alert.objects.filter(kind=Alert.Kind.AGGREGATION_STALLED).exists()
    with django_capture_on_commit_callbacks(execute=True):
        summary = aggregations_recover(now=heartbeat + timedelta(seconds=31))
    assert summary["aggregations_resent"] == 1
    round_one.refresh_from_db()
    assert round_one.status == Round.Status.COMPLETED and round_one.closed_at == sent
    outbox = AggregationOutbox.objects.get(round=round_one)
    assert (outbox.sends, outbox.runs) == (2, 2)
    alert = Alert.objects.get(training=training, kind=Alert.Kind.AGGREGATION_STALLED)
    assert alert.details["action"] == "resend" and alert.details["silent_seconds"] == pytest.approx(31, abs=1)
    assert alert.resolved_at is not None


@pytest.mark.django_db
def test_a_duplicate_aggregation_task_writes_no_second_version(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
) -> None:
    training, round_one = _close_round_one(
        client, make_agent, make_training, django_capture_on_commit_callbacks
    )
    assert aggregate_round.apply(args=(round_one.pk,)).get() == "next_round"
    assert aggregate_round.apply(args=(round_one.pk,)).get() == "skipped"  # the resent copy, late
    assert training.versions.filter(number=1).count() == 1
    assert training.versions.count() == 2


@pytest.mark.django_db(transaction=True)
@override_settings(FEDSITE_AGGREGATION_HEARTBEAT_SECONDS=0.1)
def test_the_running_task_heartbeats_on_its_row(make_training: Any) -> None:
    training = make_training(start=True)
    round_one = Round.objects.get(training=training, number=1)
    AggregationOutbox.objects.create(round=round_one)
    with aggregation_heartbeat(round_id=round_one.pk):
        first = AggregationOutbox.objects.get(round=round_one).heartbeat_at
        beats = set()
        for _ in range(50):
            time.sleep(0.05)
            beats.add(AggregationOutbox.objects.get(round=round_one).heartbeat_at)
            if len(beats) >= 3:
                break
    outbox = AggregationOutbox.objects.get(round=round_one)
    assert outbox.runs == 1 and outbox.started_at == first
    assert len(beats) >= 3 and max(beats) > first  # the thread kept beating while the body ran
