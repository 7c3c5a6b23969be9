"""Operator and agent API: validation, authority and idempotency; hostile input gets 4xx, never 5xx."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from flcore.parameters import ParameterSpec, to_bytes
from trainings import services
from trainings.models import ClientUpdate, Round, Task, Training


def _bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def _delta(training: Training, value: float = 0.1) -> bytes:
    spec = ParameterSpec.from_json(training.parameter_spec)
    return to_bytes({t.name: np.full(t.shape, value, dtype=np.float32) for t in spec.tensors})


@pytest.fixture
def running(make_agent: Any, make_training: Any) -> dict[str, Any]:
    agents = [make_agent() for _ in range(3)]
    training = make_training(min_clients_per_round=3, max_clients_per_round=3)
    return {"training": training, "agents": agents}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model_type": "logreg"}, "name"),
        ({"name": "x", "algorithm": "sgd-magic"}, "algorithm"),
        ({"name": "x", "max_rounds": 0}, "max_rounds"),
        ({"name": "x", "learning_rate": "fast"}, "learning_rate"),
        ({"name": "x", "hidden_sizes": [64, -1]}, "hidden_sizes"),
        ({"name": "x", "min_clients_per_round": 9, "max_clients_per_round": 2}, "min_clients_per_round"),
        ({"name": "x", "target_accuracy": 1.5}, "target_accuracy"),
        ({"name": "x", "bogus": 1}, "bogus"),
        ({"name": "x", "evaluation_dataset": "cifar"}, "evaluation_dataset"),
        ({"name": "x", "model_type": "logreg", "hidden_sizes": [3]}, "hidden_sizes"),
    ],
)
def test_start_validation_names_the_field(staff_client: Any, body: dict[str, Any], field: str) -> None:
    response = staff_client.post("/api/training/start", body, content_type="application/json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["details"]
    assert Training.objects.count() == 0


@pytest.mark.django_db
def test_start_requires_staff(client: Any, make_agent: Any) -> None:
    body = {"name": "x", "model_type": "logreg", "input_dim": 4, "num_classes": 3}
    assert client.post("/api/training/start", body, content_type="application/json").status_code in (401, 403)
    _, token = make_agent()
    assert client.post(
        "/api/training/start", body, content_type="application/json", **_bearer(token)
    ).status_code in (401, 403)
    assert Training.objects.count() == 0


@pytest.mark.django_db
def test_seed_endpoints_round_trip(staff_client: Any, make_agent: Any) -> None:
    for _ in range(2):
        make_agent()
    response = staff_client.post(
        "/api/training/start",
        {
            "name": "api",
            "model_type": "logreg",
            "input_dim": 4,
            "num_classes": 3,
            "min_clients_per_round": 2,
            "max_clients_per_round": 2,
        },
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    training_id = response.json()["training_id"]
    status = staff_client.get(f"/api/training/{training_id}/status").json()
    assert status["status"] == "running" and status["round"]["number"] == 1
    assert status["round"]["tasks"]["pending"] == 2
    assert staff_client.get(f"/api/training/{training_id}/metrics").json()["metrics"] == {}
    stopped = staff_client.post(f"/api/training/{training_id}/stop")
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    assert staff_client.post(f"/api/training/{training_id}/stop").status_code == 409
    assert staff_client.get("/api/training/not-a-uuid/status").status_code == 404
    assert staff_client.get("/api/training/00000000-0000-0000-0000-000000000000/metrics").status_code == 404
    alerts = staff_client.get("/api/alerts", {"training_id": training_id}).json()["alerts"]
    assert all(a["training"] == training_id for a in alerts)
    assert staff_client.get("/api/alerts", {"severity": "apocalyptic"}).status_code == 400
    health = staff_client.get("/api/system/health").json()
    assert health["components"]["database"]["status"] == "ok"
    assert staff_client.get("/api/health").json() == {"status": "ok"}


@pytest.mark.django_db
def test_v1_resources_list_and_filter(staff_client: Any, running: dict[str, Any]) -> None:
    training = running["training"]
    listing = staff_client.get("/api/v1/trainings/").json()
    assert listing["count"] == 1 and listing["results"][0]["id"] == str(training.pk)
    rounds = staff_client.get(f"/api/v1/trainings/{training.pk}/rounds/").json()
    assert [r["number"] for r in rounds] == [1]
    assert staff_client.get("/api/v1/rounds/", {"training": "nope"}).status_code == 404
    versions = staff_client.get("/api/v1/versions/", {"training": str(training.pk)}).json()
    assert [v["number"] for v in versions["results"]] == [0]
    download = staff_client.get(f"/api/v1/versions/{versions['results'][0]['id']}/download/")
    assert download.status_code == 200
    agents = staff_client.get("/api/v1/agents/").json()
    assert agents["count"] == 3 and all(a["online"] for a in agents["results"])
    created = staff_client.post("/api/v1/agents/", {"agent_id": "new-agent"}, content_type="application/json")
    assert created.status_code == 201 and created.json()["token"].startswith("fsa_")


@pytest.mark.django_db
def test_hostile_upload_bodies_get_4xx(client: Any, running: dict[str, Any]) -> None:
    training = running["training"]
    _agent, token = running["agents"][0]
    task = client.get("/api/v1/agent/tasks/next?wait=0", **_bearer(token)).json()
    url = f"/api/v1/agent/tasks/{task['task_id']}/update"
    good = _delta(training)
    meta = json.dumps({"num_examples": 10})

    def post(data: Any) -> Any:
        return client.post(url, data, **_bearer(token))

    def file(content: bytes) -> SimpleUploadedFile:
        return SimpleUploadedFile("u.safetensors", content)

    cases = {
        "no file": {"meta": meta},
        "no meta": {"update": file(good)},
        "garbage": {"update": file(b"\x00garbage" * 10), "meta": meta},
        "truncated": {"update": file(good[: len(good) // 2]), "meta": meta},
        "lying header length": {"update": file((10**12).to_bytes(8, "little") + good[8:]), "meta": meta},
        "empty": {"update": file(b""), "meta": meta},
        "oversize": {"update": file(good + b" " * 100_000), "meta": meta},
        "meta not json": {"update": file(good), "meta": "{nope"},
        "meta list": {"update": file(good), "meta": "[1]"},
        "num_examples zero": {"update": file(good), "meta": json.dumps({"num_examples": 0})},
        "num_examples bool": {"update": file(good), "meta": json.dumps({"num_examples": True})},
        "metric nan": {"update": file(good), "meta": '{"num_examples": 3, "metrics": {"eval_loss": NaN}}'},
        "metric string": {
            "update": file(good),
            "meta": json.dumps({"num_examples": 3, "metrics": {"a": "b"}}),
        },
    }
    for label, data in cases.items():
        response = post(data)
        assert 400 <= response.status_code < 500, (label, response.status_code, response.content)
        assert "error" in response.json(), label
    assert post({"update": file(good), "meta": "x" * 10}).status_code == 400
    assert not ClientUpdate.objects.exists()
    assert Task.objects.get(pk=task["task_id"]).status == Task.Status.DELIVERED
    # a good upload still works afterwards
    assert post({"update": file(good), "meta": meta}).status_code == 201


@pytest.mark.django_db
def test_unknown_and_foreign_tasks(client: Any, running: dict[str, Any]) -> None:
    (_, token_a), (_, token_b) = running["agents"][0], running["agents"][1]
    task = client.get("/api/v1/agent/tasks/next?wait=0", **_bearer(token_a)).json()
    fail_url = f"/api/v1/agent/tasks/{task['task_id']}/fail"
    assert (
        client.post(
            fail_url, {"reason": "x"}, content_type="application/json", **_bearer(token_b)
        ).status_code
        == 403
    )
    assert (
        client.post(
            "/api/v1/agent/tasks/not-a-uuid/fail",
            {"reason": "x"},
            content_type="application/json",
            **_bearer(token_a),
        ).status_code
        == 404
    )
    assert client.post(fail_url, {}, content_type="application/json", **_bearer(token_a)).status_code == 400
    ok = client.post(
        fail_url, {"reason": "out of memory"}, content_type="application/json", **_bearer(token_a)
    )
    assert ok.status_code == 200 and ok.json()["status"] == "failed"
    assert (
        client.post(
            fail_url, {"reason": "again"}, content_type="application/json", **_bearer(token_a)
        ).status_code
        == 409
    )


@pytest.mark.django_db
def test_upload_after_round_closed_is_409_task_closed(client: Any, running: dict[str, Any]) -> None:
    training = running["training"]
    _, token = running["agents"][0]
    task = client.get("/api/v1/agent/tasks/next?wait=0", **_bearer(token)).json()
    services.training_stop(training_id=training.pk)
    response = client.post(
        f"/api/v1/agent/tasks/{task['task_id']}/update",
        {"update": SimpleUploadedFile("u", _delta(training)), "meta": json.dumps({"num_examples": 1})},
        **_bearer(token),
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "task_closed"


@pytest.mark.django_db
def test_aggregation_is_idempotent_under_retry(client: Any, running: dict[str, Any]) -> None:
    training = running["training"]
    for _, token in running["agents"]:
        task = client.get("/api/v1/agent/tasks/next?wait=0", **_bearer(token)).json()
        response = client.post(
            f"/api/v1/agent/tasks/{task['task_id']}/update",
            {
                "update": SimpleUploadedFile("u", _delta(training, 0.2)),
                "meta": json.dumps({"num_examples": 4}),
            },
            **_bearer(token),
        )
        assert response.status_code == 201
    round_ = training.rounds.get(number=1)
    assert (
        round_.status == Round.Status.AGGREGATING
    )  # on_commit enqueue does not run inside a test transaction
    assert services.round_aggregate(round_id=round_.pk) == "next_round"
    assert services.round_aggregate(round_id=round_.pk) == "skipped"  # a redelivered message
    assert training.versions.filter(number=1).count() == 1
    assert training.rounds.count() == 2


@pytest.mark.django_db
def test_raw_octet_stream_upload_is_equivalent_to_multipart(client: Any, running: dict[str, Any]) -> None:
    training = running["training"]
    _, token = running["agents"][0]
    task = client.get("/api/v1/agent/tasks/next?wait=0", **_bearer(token)).json()
    url = f"/api/v1/agent/tasks/{task['task_id']}/update"
    good = _delta(training, 0.3)

    def raw(body: bytes, **headers: str) -> Any:
        return client.post(url, body, content_type="application/octet-stream", **_bearer(token), **headers)

    missing_meta = raw(good)
    assert missing_meta.status_code == 400 and "X-Update-Meta" in missing_meta.json()["error"]["message"]
    assert raw(b"garbage" * 20, HTTP_X_UPDATE_META=json.dumps({"num_examples": 3})).status_code == 400
    assert raw(good, HTTP_X_UPDATE_META="{broken").status_code == 400
    assert not ClientUpdate.objects.exists()
    first = raw(good, HTTP_X_UPDATE_META=json.dumps({"num_examples": 3, "metrics": {"eval_accuracy": 0.5}}))
    assert first.status_code == 201, first.content
    stored = ClientUpdate.objects.get()
    assert stored.num_examples == 3 and stored.metrics == {"eval_accuracy": 0.5}
    assert raw(good, HTTP_X_UPDATE_META=json.dumps({"num_examples": 3})).status_code == 200  # idempotent
    # the same bytes sent as multipart are the same update
    again = client.post(
        url,
        {"update": SimpleUploadedFile("u", good), "meta": json.dumps({"num_examples": 3})},
        **_bearer(token),
    )
    assert again.status_code == 200 and again.json()["sha256"] == first.json()["sha256"]
    assert raw(_delta(training, 0.4), HTTP_X_UPDATE_META=json.dumps({"num_examples": 3})).status_code == 409
