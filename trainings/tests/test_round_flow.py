"""Service-level round lifecycle against the real database: selection, uploads, closing, aggregation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from django.test import override_settings

from fedsite.celery import app as celery_app
from flcore.parameters import from_bytes, to_bytes
from trainings import services
from trainings.models import Round, Task, Training
from trainings.tests.agent_rest import constant_delta, next_task, post_update
from versioning.services import version_read_parameters


def _upload(client: Any, token: str, task_id: Any, data: bytes, num_examples: int, **metrics: float) -> Any:
    return post_update(client, token, task_id, data, num_examples=num_examples, metrics=metrics)


@pytest.mark.django_db
def test_round_waits_for_agents_then_opens_with_tasks(make_agent: Any, make_training: Any) -> None:
    make_agent()
    training = make_training(min_clients_per_round=2)
    round_ = training.rounds.get()
    assert round_.status == Round.Status.WAITING
    assert training.alerts.filter(kind="too_few_agents").count() == 1
    make_agent()
    assert services.rounds_try_open_waiting() == 1
    round_.refresh_from_db()
    assert round_.status == Round.Status.COLLECTING
    assert round_.tasks.count() == 2


@pytest.mark.django_db
def test_full_round_aggregates_weighted_mean(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    (a1, t1), (a2, t2) = make_agent(), make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_rounds=2)
    base = version_read_parameters(training.current_version)
    tokens = {a1.pk: t1, a2.pk: t2}
    payloads = {}
    for agent in (a1, a2):
        response = next_task(client, tokens[agent.pk])
        assert response.status_code == 200, response.content
        payloads[agent.pk] = response.json()
    # each agent downloads the model and checks the ETag
    first = payloads[a1.pk]
    download = client.get(first["model"]["url"], HTTP_AUTHORIZATION=f"Bearer {t1}")
    assert download.status_code == 200
    body = b"".join(download.streaming_content)
    assert download["ETag"] == f'"{first["model"]["sha256"]}"'
    import hashlib

    assert hashlib.sha256(body).hexdigest() == first["model"]["sha256"]
    assert (
        client.get(
            first["model"]["url"], HTTP_AUTHORIZATION=f"Bearer {t1}", HTTP_IF_NONE_MATCH=download["ETag"]
        ).status_code
        == 304
    )

    with django_capture_on_commit_callbacks(execute=True):
        r1 = _upload(
            client,
            t1,
            payloads[a1.pk]["task_id"],
            to_bytes(constant_delta(training, 1.0)),
            30,
            eval_accuracy=0.5,
            eval_num_examples=10,
        )
        assert r1.status_code == 201, r1.content
        r2 = _upload(
            client,
            t2,
            payloads[a2.pk]["task_id"],
            to_bytes(constant_delta(training, 4.0)),
            10,
            eval_accuracy=0.7,
            eval_num_examples=30,
        )
        assert r2.status_code == 201, r2.content
    training.refresh_from_db()
    round1 = training.rounds.get(number=1)
    assert round1.status == Round.Status.COMPLETED
    assert training.current_version.number == 1
    new = version_read_parameters(training.current_version)
    for name in base:  # weighted by num_examples: (30*1 + 10*4) / 40 = 1.75
        np.testing.assert_allclose(new[name], base[name] + 1.75, rtol=0, atol=1e-6)
    assert round1.metrics["federated_accuracy"] == pytest.approx((0.5 * 10 + 0.7 * 30) / 40)
    assert training.rounds.get(number=2).status == Round.Status.COLLECTING


@pytest.mark.django_db
def test_upload_is_idempotent_and_conflicts_on_different_body(
    client: Any, make_agent: Any, make_training: Any
) -> None:
    (_a1, t1), (_a2, t2), (_a3, _t3) = make_agent(), make_agent(), make_agent()
    training = make_training(min_clients_per_round=3, max_clients_per_round=3)
    task = next_task(client, t1).json()
    data = to_bytes(constant_delta(training, 0.5))
    assert _upload(client, t1, task["task_id"], data, 5).status_code == 201
    again = _upload(client, t1, task["task_id"], data, 5)
    assert again.status_code == 200
    different = _upload(client, t1, task["task_id"], to_bytes(constant_delta(training, 0.25)), 5)
    assert different.status_code == 409
    assert different.json()["error"]["code"] == "update_conflict"
    # another agent cannot upload to this task
    other = _upload(client, t2, task["task_id"], data, 5)
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "not_your_task"
    stored = Task.objects.get(pk=task["task_id"]).update
    assert from_bytes(stored_bytes(stored), max_bytes=10**6)["layer0.bias"][0] == pytest.approx(0.5)


def stored_bytes(update: Any) -> bytes:
    from versioning.blobs import blob_read

    return blob_read(update.blob_name)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda d: {**d, "layer0.bias": d["layer0.bias"].astype(np.float64)}, "bad_update_wrong_dtype"),
        (lambda d: {**d, "layer0.bias": np.array([np.nan, 0, 0], dtype=np.float32)}, "bad_update_non_finite"),
        (lambda d: {**d, "extra": np.zeros(2, dtype=np.float32)}, "bad_update_name_mismatch"),
        (lambda d: {**d, "layer0.weight": np.zeros((3, 4), dtype=np.float32)}, "bad_update_shape_mismatch"),
    ],
)
def test_hostile_updates_get_4xx_and_store_nothing(
    client: Any, make_agent: Any, make_training: Any, mutate: Any, code: str
) -> None:
    (_a1, t1), _, _ = make_agent(), make_agent(), make_agent()
    training = make_training(min_clients_per_round=3, max_clients_per_round=3)
    task = next_task(client, t1).json()
    bad = mutate(constant_delta(training, 1.0))
    from safetensors.numpy import save

    response = _upload(client, t1, task["task_id"], save(bad), 5)
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["code"] in (code, "update_too_large")
    assert (
        not Task.objects.get(pk=task["task_id"])
        .__class__.objects.filter(pk=task["task_id"], status=Task.Status.COMPLETED)
        .exists()
    )


@pytest.mark.django_db
@override_settings(FEDSITE_MAX_CONCURRENT_TRAININGS=1)
def test_max_concurrent_trainings_refused_with_409(staff_client: Any, make_training: Any) -> None:
    make_training()
    response = staff_client.post(
        "/api/training/start",
        {"name": "second", "model_type": "logreg", "input_dim": 4, "num_classes": 3},
        content_type="application/json",
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "too_many_trainings"
    assert Training.objects.filter(status=Training.Status.RUNNING).count() == 1


@pytest.mark.django_db
def test_round_completion_is_broadcast_after_commit(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    import asyncio
    import threading

    from channels.layers import get_channel_layer

    from monitoring.events import training_group

    (_a1, t1), (_a2, t2) = make_agent(), make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_rounds=1)
    committed = threading.Event()
    ready = threading.Event()
    received: list[tuple[str, bool]] = []

    async def listen() -> None:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(training_group(training.pk), channel)
        ready.set()
        try:
            while True:
                message = await asyncio.wait_for(layer.receive(channel), timeout=30)
                received.append((message["event"], committed.is_set()))
                if message["event"] == "training_completed":
                    return
        finally:
            await layer.group_discard(training_group(training.pk), channel)

    listener = threading.Thread(target=lambda: asyncio.run(listen()))
    listener.start()
    assert ready.wait(10)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        for token in (t1, t2):
            task = next_task(client, token).json()
            assert (
                _upload(
                    client, token, task["task_id"], to_bytes(constant_delta(training, 0.1)), 5
                ).status_code
                == 201
            )
    assert callbacks, "events and the aggregation must wait for commit"
    committed.set()
    with django_capture_on_commit_callbacks(execute=True):
        for callback in callbacks:
            callback()
    listener.join(40)
    events = [event for event, _ in received]
    assert all(after_commit for _, after_commit in received), received
    assert "round_completed" in events and "metric_update" in events
    assert events[-1] == "training_completed"
    training.refresh_from_db()
    assert training.status == Training.Status.COMPLETED


def test_celery_concurrency_is_capped_at_twelve() -> None:
    from django.conf import settings

    assert min(settings.FEDSITE_CPU_CORES, 12) == settings.CELERY_WORKER_CONCURRENCY
    assert celery_app.conf.worker_concurrency == settings.CELERY_WORKER_CONCURRENCY
    assert celery_app.conf.task_routes["trainings.aggregate_round"] == {"queue": "aggregation"}
