"""Round state machine and selection invariants that each guard a single line of the coordinator: every test
here was checked by breaking that line (see the lead's report) and watching the test fail."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from clients.models import Agent
from trainings import services
from trainings.models import ClientUpdate, Round, Task, Training
from trainings.tests.agent_rest import constant_delta, next_task, post_update


def _upload(client: Any, token: str, training: Training, task_id: str, value: float = 0.1) -> Any:
    return post_update(client, token, task_id, constant_delta(training, value), num_examples=5)


def _expire_round(round_: Round) -> None:
    Round.objects.filter(pk=round_.pk).update(deadline=timezone.now() - timedelta(seconds=1))


# ---- (a) deadline with fewer than the minimum, but more than zero ---------------------------------------
@pytest.mark.django_db
def test_deadline_with_some_but_too_few_updates_reopens_and_aggregates_nothing(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    agents = dict(make_agent() for _ in range(4))
    training = make_training(min_clients_per_round=3, max_clients_per_round=3, max_round_attempts=3)
    round_ = training.rounds.get()
    first = list(round_.tasks.select_related("agent"))
    done = first[0]
    with django_capture_on_commit_callbacks(execute=True):
        for task in first[:2]:
            assert _upload(client, agents[task.agent], training, str(task.pk)).status_code == 201
    _expire_round(round_)
    with django_capture_on_commit_callbacks(execute=True):
        summary = services.rounds_check_deadlines()
    assert summary.get("reopened") == 1, summary
    round_.refresh_from_db()
    assert round_.status == Round.Status.COLLECTING and round_.attempt == 2
    assert not training.versions.filter(number=1).exists()  # 2 < 3 updates: nothing aggregated
    # the two accepted updates are kept; only the missing one is asked for again
    assert ClientUpdate.objects.filter(round=round_).count() == 2
    assert round_.tasks.filter(attempt=2).count() == 1
    assert not round_.tasks.filter(attempt=2, agent=done.agent).exists()
    alert = training.alerts.get(kind="round_failed")
    assert alert.details["completed"] == 2 and alert.details["required"] == 3


@pytest.mark.django_db
def test_deadline_with_exactly_the_minimum_closes_and_aggregates(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    agents = dict(make_agent() for _ in range(3))
    training = make_training(min_clients_per_round=2, max_clients_per_round=3, max_rounds=1)
    round_ = training.rounds.get()
    with django_capture_on_commit_callbacks(execute=True):
        for task in list(round_.tasks.select_related("agent"))[:2]:
            assert _upload(client, agents[task.agent], training, str(task.pk)).status_code == 201
    round_.refresh_from_db()
    assert round_.status == Round.Status.COLLECTING  # one task still open, deadline not reached
    _expire_round(round_)
    with django_capture_on_commit_callbacks(execute=True):
        summary = services.rounds_check_deadlines()
    assert summary.get("closed") == 1, summary
    round_.refresh_from_db()
    assert round_.status == Round.Status.COMPLETED
    assert training.versions.get(number=1).metrics["num_agents_reporting"] == 2


# ---- (b) an upload after its task's deadline -------------------------------------------------------------
@pytest.mark.django_db
def test_upload_after_the_task_deadline_is_refused_while_the_round_collects(
    client: Any, make_agent: Any, make_training: Any
) -> None:
    (_, t1), (_, _t2) = make_agent(), make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=2)
    task = next_task(client, t1).json()
    Task.objects.filter(pk=task["task_id"]).update(deadline=timezone.now() - timedelta(seconds=1))
    response = _upload(client, t1, training, task["task_id"])
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "task_closed"
    assert training.rounds.get().status == Round.Status.COLLECTING
    assert not ClientUpdate.objects.filter(task_id=task["task_id"]).exists()


# ---- (d) quarantine ----------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_quarantined_agent_is_never_selected(
    staff_client: Any, make_agent: Any, make_training: Any
) -> None:
    quarantined, _ = make_agent()
    for _ in range(3):
        make_agent()
    response = staff_client.post(f"/api/v1/agents/{quarantined.agent_id}/quarantine/")
    assert response.status_code == 200, response.content
    for seed in range(5):
        training = make_training(seed=seed, min_clients_per_round=3, max_clients_per_round=4)
        tasked = set(training.rounds.get().tasks.values_list("agent_id", flat=True))
        assert len(tasked) == 3 and quarantined.pk not in tasked
        services.training_stop(training_id=training.pk)


@pytest.mark.django_db
def test_an_agent_quarantined_after_selection_gets_no_task(
    client: Any, staff_client: Any, make_agent: Any, make_training: Any
) -> None:
    (agent, token), _ = make_agent(), make_agent()
    make_training(min_clients_per_round=2, max_clients_per_round=2)
    assert Task.objects.filter(agent=agent, status=Task.Status.PENDING).exists()
    assert staff_client.post(f"/api/v1/agents/{agent.agent_id}/quarantine/").status_code == 200
    response = next_task(client, token)
    assert response.status_code == 204, response.content
    assert not Task.objects.filter(agent=agent, status=Task.Status.DELIVERED).exists()


# ---- (e) events only after commit --------------------------------------------------------------------------
class _Listener:
    """A subscriber of the training's group on the real channel layer, in its own thread and event loop.

    ``probe(name)`` sends a marker straight to the group and waits for it: a channel's messages arrive in
    the order they were sent, so whatever reached the layer before the probe is in ``events`` by then.
    """

    def __init__(self, training_id: Any) -> None:
        import threading

        self.training_id = training_id
        self.events: list[str] = []
        self.arrived = threading.Condition()
        ready = threading.Event()
        self.thread = threading.Thread(target=lambda: __import__("asyncio").run(self._listen(ready)))
        self.thread.start()
        assert ready.wait(10)

    async def _listen(self, ready: Any) -> None:
        import asyncio

        from channels.layers import get_channel_layer

        from monitoring.events import training_group

        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(training_group(self.training_id), channel)
        ready.set()
        try:
            while True:
                message = await asyncio.wait_for(layer.receive(channel), timeout=30)
                with self.arrived:
                    self.events.append(message["event"])
                    self.arrived.notify_all()
                if message["event"] == "probe-end":
                    return
        finally:
            await layer.group_discard(training_group(self.training_id), channel)

    def probe(self, name: str) -> list[str]:
        from monitoring.events import event_send

        event_send(training_id=self.training_id, event=name, payload={})
        with self.arrived:
            assert self.arrived.wait_for(lambda: name in self.events, timeout=10), self.events
            return list(self.events)


@pytest.mark.skipif(settings.EMBEDDED, reason="listens on the real Redis channel layer of another process")
@pytest.mark.django_db(transaction=True)
def test_events_reach_the_channel_layer_only_after_the_transaction_commits(
    make_agent: Any, make_training: Any
) -> None:
    make_agent(), make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, start=False)
    listener = _Listener(training.pk)
    try:
        with transaction.atomic():
            services.training_start(training_id=training.pk)
            assert Training.objects.get(pk=training.pk).status == Training.Status.RUNNING
            assert listener.probe("probe-1") == ["probe-1"]  # started, but not committed: nothing sent
        after_start = listener.probe("probe-2")
        assert "training_started" in after_start and "round_opened" in after_start
        with transaction.atomic():
            services.training_stop(training_id=training.pk)
            assert listener.probe("probe-3")[len(after_start) :] == ["probe-3"]
        assert "training_completed" in listener.probe("probe-end")[len(after_start) + 1 :]
    finally:
        if "probe-end" not in listener.events:  # a failed assertion: let the listener's thread end now
            listener.probe("probe-end")
        listener.thread.join(40)


# ---- (f) reliability-weighted selection --------------------------------------------------------------------
@pytest.mark.django_db
def test_reliability_weighted_selection_favours_reliable_agents(make_agent: Any, make_training: Any) -> None:
    reliable = [make_agent()[0] for _ in range(4)]
    unreliable = [make_agent()[0] for _ in range(4)]
    Agent.objects.filter(pk__in=[a.pk for a in reliable]).update(tasks_completed=18)  # reliability 0.95
    Agent.objects.filter(pk__in=[a.pk for a in unreliable]).update(tasks_failed=18)  # reliability 0.05
    picks = {"reliable": 0, "unreliable": 0}
    reliable_pks = {a.pk for a in reliable}
    for seed in range(30):
        training = make_training(
            seed=seed, selection="reliability", min_clients_per_round=2, max_clients_per_round=2
        )
        for agent_id in training.rounds.get().tasks.values_list("agent_id", flat=True):
            picks["reliable" if agent_id in reliable_pks else "unreliable"] += 1
        services.training_stop(training_id=training.pk)
    # Weighted, a first pick is unreliable with probability 0.2/4 = 0.05: about 57 of 60 picks are reliable.
    # Uniform, the count is a sum of 30 hypergeometric(8, 4, 2) (mean 30, sd 3.6): >= 48 has p < 1e-6.
    assert picks["reliable"] >= 48, picks


# ---- more holes: re-opening, closing early, stop during aggregation, alert flood ---------------------------
@pytest.mark.django_db
def test_reopen_never_gives_an_agent_that_completed_a_second_task(
    client: Any, make_agent: Any, make_training: Any, django_capture_on_commit_callbacks: Any
) -> None:
    # Three agents for two places: the one left out at first is there for the re-open (the one whose task
    # expires is not selectable again until it shows life: trainings.selectors.agents_selectable).
    # The other agent gives its task back (an expired task would make it unselectable until it shows
    # life, trainings.selectors.agents_selectable), so the re-open has two candidates in the retry pool
    # if the completed agent were wrongly one of them: over 8 seeds it would be picked.
    from clients.services import agent_touch

    agents = dict(make_agent() for _ in range(2))
    for seed in range(8):
        for agent in agents:
            agent_touch(agent=agent)
        training = make_training(
            seed=seed, min_clients_per_round=2, max_clients_per_round=2, max_round_attempts=3
        )
        round_ = training.rounds.get()
        done, other = round_.tasks.select_related("agent").order_by("pk")
        assert _upload(client, agents[done.agent], training, str(done.pk)).status_code == 201
        failed = client.post(
            f"/api/v1/agent/tasks/{other.pk}/fail",
            data={"reason": "out of memory"},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {agents[other.agent]}",
        )
        assert failed.status_code == 200, failed.content
        again = list(round_.tasks.filter(attempt=2).values_list("agent_id", flat=True))
        assert again and done.agent_id not in again, (seed, again)
        services.training_stop(training_id=training.pk)


@pytest.mark.django_db
def test_round_with_enough_updates_keeps_collecting_until_every_task_reports(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    agents = dict(make_agent() for _ in range(3))
    training = make_training(min_clients_per_round=1, max_clients_per_round=3, max_rounds=1)
    round_ = training.rounds.get()
    tasks = list(round_.tasks.select_related("agent"))
    with django_capture_on_commit_callbacks(execute=True):
        for task in tasks[:2]:
            assert _upload(client, agents[task.agent], training, str(task.pk)).status_code == 201
    round_.refresh_from_db()
    assert round_.status == Round.Status.COLLECTING
    with django_capture_on_commit_callbacks(execute=True):
        assert _upload(client, agents[tasks[2].agent], training, str(tasks[2].pk)).status_code == 201
    round_.refresh_from_db()
    assert round_.status == Round.Status.COMPLETED
    assert training.versions.get(number=1).metrics["num_agents_reporting"] == 3


@pytest.mark.django_db
def test_a_stop_during_aggregation_keeps_the_version_and_opens_no_round(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    agents = dict(make_agent() for _ in range(2))
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_rounds=5)
    round_ = training.rounds.get()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        for task in round_.tasks.select_related("agent"):
            assert _upload(client, agents[task.agent], training, str(task.pk)).status_code == 201
    round_.refresh_from_db()
    assert round_.status == Round.Status.AGGREGATING
    services.training_stop(training_id=training.pk)
    with django_capture_on_commit_callbacks(execute=True):
        for callback in callbacks:
            callback()  # the aggregation the close enqueued
    training.refresh_from_db()
    round_.refresh_from_db()
    assert training.status == Training.Status.STOPPED
    assert round_.status == Round.Status.COMPLETED
    assert training.current_version.number == 1
    assert not training.rounds.filter(number=2).exists()


@pytest.mark.django_db
def test_a_round_waiting_for_agents_alerts_once_however_often_it_is_retried(
    make_agent: Any, make_training: Any
) -> None:
    make_agent()
    training = make_training(min_clients_per_round=2)
    for _ in range(3):
        assert services.rounds_try_open_waiting() == 0
        services.rounds_check_deadlines()
    assert training.alerts.filter(kind="too_few_agents").count() == 1


@pytest.mark.django_db
def test_final_states_are_final_and_no_round_goes_back_to_collecting(
    make_agent: Any, make_training: Any
) -> None:
    from trainings.state import IllegalTransition, lock_round, transition_round, transition_task

    make_agent(), make_agent()
    training = make_training()
    round_ = training.rounds.get()
    task = round_.tasks.first()
    RS, KS = Round.Status, Task.Status
    refused = {  # written out by hand, not read from the table under test
        RS.AGGREGATING: [RS.WAITING, RS.COLLECTING, RS.CANCELLED],
        RS.COMPLETED: [RS.WAITING, RS.COLLECTING, RS.AGGREGATING, RS.FAILED, RS.CANCELLED],
        RS.FAILED: [RS.WAITING, RS.COLLECTING, RS.AGGREGATING, RS.COMPLETED, RS.CANCELLED],
        RS.CANCELLED: [RS.WAITING, RS.COLLECTING, RS.AGGREGATING, RS.COMPLETED, RS.FAILED],
    }
    for source, targets in refused.items():
        Round.objects.filter(pk=round_.pk).update(status=source)
        for target in targets:
            with pytest.raises(IllegalTransition), transaction.atomic():
                transition_round(lock_round(round_.pk), target)
        assert Round.objects.get(pk=round_.pk).status == source
    for source in (KS.COMPLETED, KS.FAILED, KS.EXPIRED, KS.CANCELLED):
        Task.objects.filter(pk=task.pk).update(status=source)
        for target in (KS.PENDING, KS.DELIVERED, KS.COMPLETED, KS.FAILED, KS.EXPIRED, KS.CANCELLED):
            if target == source:
                continue
            with pytest.raises(IllegalTransition), transaction.atomic():
                transition_task(Task.objects.select_for_update().get(pk=task.pk), target)
        assert Task.objects.get(pk=task.pk).status == source
