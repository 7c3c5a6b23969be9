"""FederatedClient against the fake protocol server: whole task round trips and their failure modes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import numpy as np
import pytest

from fedagent import AgentApiError, FederatedClient, enroll, task_rng
from fedagent.tests.clients import make_client
from fedagent.tests.conftest import DIGITS_SPEC
from fedagent.tests.fake_server import FakeAgentServer, Scripted, error_body
from fedagent.trainer import EvalResult, FitConfig, FitResult, Trainer, ZooTrainer
from flcore.parameters import Parameters, sha256_hex, subtract

Digits = tuple[np.ndarray, np.ndarray]


def expected_delta(
    global_params: Parameters, data: Digits, task: dict[str, Any], agent_id: str
) -> Parameters:
    x, y = data
    trainer = ZooTrainer(DIGITS_SPEC)
    trainer.set_parameters(global_params)
    config = FitConfig.from_json(task["config"])
    trainer.fit(x[:300], y[:300], config, task_rng(config.seed, agent_id))
    return subtract(trainer.get_parameters(), global_params)


def test_full_task_round_trip(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model, round_number=3)

    with make_client(fake_server, digits) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "uploaded"
    upload = fake_server.uploads[task["task_id"]]
    assert outcome.update_sha256 == upload.sha256 == sha256_hex(upload.update)
    # The update is the delta: trained minus the downloaded global parameters.
    want = expected_delta(global_params, digits, task, "agent_001")
    assert list(upload.parameters) == list(global_params)
    for name in want:
        assert upload.parameters[name].dtype == np.float32
        np.testing.assert_allclose(upload.parameters[name], want[name], rtol=0, atol=1e-6)
    assert any(np.abs(v).max() > 1e-4 for v in upload.parameters.values())
    # Federated evaluation: the global model on the held-out split, before training.
    x, y = digits
    global_eval = ZooTrainer(DIGITS_SPEC)
    global_eval.set_parameters(global_params)
    eval_result = global_eval.evaluate(x[300:], y[300:])
    meta = upload.meta
    assert meta["num_examples"] == 300
    assert meta["metrics"]["eval_num_examples"] == 100
    assert meta["metrics"]["eval_loss"] == pytest.approx(eval_result.loss)
    assert meta["metrics"]["eval_accuracy"] == pytest.approx(eval_result.accuracy)
    assert meta["metrics"]["local_steps"] == 19
    assert meta["metrics"]["train_seconds"] >= 0
    assert set(meta["metrics"]) >= {"train_loss", "train_accuracy", "epochs_completed"}
    download = fake_server.requests_to("GET", "/api/v1/agent/models/")[0]
    assert download.headers["Authorization"] == "Bearer good-token"
    assert "If-None-Match" not in download.headers


def test_second_task_on_the_same_model_uses_the_cache_after_304(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    first = fake_server.add_task(model)
    second = fake_server.add_task(model)

    with make_client(fake_server, digits) as client:
        stats = client.run(max_tasks=2)

    assert stats.tasks_uploaded == 2
    downloads = fake_server.requests_to("GET", "/api/v1/agent/models/")
    assert [d.status for d in downloads] == [200, 304]
    assert downloads[1].headers["If-None-Match"] == f'"{model["sha256"]}"'
    # Same model and seed: the cached copy gave the same global parameters, hence the same update.
    assert fake_server.uploads[first["task_id"]].sha256 == fake_server.uploads[second["task_id"]].sha256


def test_task_closed_is_moved_on_from(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    late = fake_server.add_task(model, round_number=1)
    fake_server.closed.add(late["task_id"])
    on_time = fake_server.add_task(model, round_number=2)

    with make_client(fake_server, digits) as client:
        stats = client.run(max_tasks=2)

    assert [o.status for o in stats.outcomes] == ["closed", "uploaded"]
    assert stats.tasks_closed == 1 and stats.tasks_uploaded == 1
    assert on_time["task_id"] in fake_server.uploads
    assert fake_server.failures == []


def test_wrong_sha256_download_is_refused(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)
    fake_server.corrupt_model_bytes = True

    with make_client(fake_server, digits) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "failed"
    assert fake_server.uploads == {}
    assert len(fake_server.requests_to("GET", "/api/v1/agent/models/")) == 2  # one retry, then refuse
    [(failed_task, reason)] = fake_server.failures
    assert failed_task == task["task_id"]
    assert "SHA-256" in reason


def test_upload_retried_after_503(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)
    fake_server.script(
        "POST",
        f"/api/v1/agent/tasks/{task['task_id']}/update",
        Scripted(503, error_body("busy", "Try later.")),
    )

    with make_client(fake_server, digits) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "uploaded"
    assert len(fake_server.requests_to("POST", f"/api/v1/agent/tasks/{task['task_id']}/update")) == 2


def test_rejected_update_gives_the_task_back(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)
    fake_server.script(
        "POST",
        f"/api/v1/agent/tasks/{task['task_id']}/update",
        Scripted(400, error_body("invalid_update", "Tensor 'layer0.weight' has NaN values.")),
    )

    with make_client(fake_server, digits) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "failed"
    assert len(fake_server.requests_to("POST", f"/api/v1/agent/tasks/{task['task_id']}/update")) == 1
    assert "layer0.weight" in fake_server.failures[0][1]


def test_update_transform_is_applied_before_upload(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)
    seen: list[Parameters] = []

    def halve(delta: Parameters) -> Parameters:
        seen.append(delta)
        return {name: value * np.float32(0.5) for name, value in delta.items()}

    with make_client(fake_server, digits, update_transform=halve) as client:
        client.run_one()

    uploaded = fake_server.uploads[task["task_id"]].parameters
    for name, value in seen[0].items():
        np.testing.assert_allclose(uploaded[name], value * 0.5, atol=1e-7)


def test_custom_model_needs_a_trainer_factory(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, None)
    fake_server.add_task(model)
    fake_server.add_task(model)

    class ShiftTrainer(Trainer):
        def __init__(self) -> None:
            self.params: Parameters = {}

        def get_parameters(self) -> Parameters:
            return dict(self.params)

        def set_parameters(self, parameters: Parameters) -> None:
            self.params = parameters

        def fit(self, x: Any, y: Any, config: FitConfig, rng: np.random.Generator) -> FitResult:
            self.params = {k: v + np.float32(1.0) for k, v in self.params.items()}
            return FitResult(num_examples=len(y), metrics={"train_loss": 0.5})

        def evaluate(self, x: Any, y: Any) -> EvalResult:
            return EvalResult(loss=1.0, accuracy=0.25, num_examples=len(y))

    with make_client(fake_server, digits) as client:
        without = client.run_one()
    with make_client(fake_server, digits, trainer_factory=lambda model: ShiftTrainer()) as client:
        with_factory = client.run_one()

    assert without is not None and without.status == "failed"
    assert "trainer_factory" in fake_server.failures[0][1]
    assert with_factory is not None and with_factory.status == "uploaded"
    upload = fake_server.uploads[with_factory.task_id]
    assert all(np.allclose(v, 1.0) for v in upload.parameters.values())
    assert upload.meta["metrics"]["eval_accuracy"] == 0.25


def test_bad_task_config_gives_the_task_back(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    fake_server.add_task(model, config={"local_epochs": 1, "batch_size": 0, "learning_rate": 0.1, "seed": 1})

    with make_client(fake_server, digits) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "failed"
    assert "batch_size" in fake_server.failures[0][1]
    assert fake_server.requests_to("GET", "/api/v1/agent/models/") == []


def test_run_stops_when_idle_and_beats(fake_server: FakeAgentServer, digits: Digits) -> None:
    fake_server.heartbeat_interval = 1

    with make_client(fake_server, digits, poll_wait=1) as client:
        stats = client.run(stop_when_idle_for=2.5)

    assert stats.stop_reason == "idle"
    assert stats.empty_polls >= 2
    # One heartbeat on connect (with capabilities), then the background thread at the server's interval.
    assert len(fake_server.heartbeats) >= 2
    assert fake_server.heartbeats[0]["capabilities"]["data"]["num_train_examples"] == 300
    assert fake_server.heartbeats[1]["state"] == "idle"


def test_run_exits_when_the_training_is_done(fake_server: FakeAgentServer, digits: Digits) -> None:
    fake_server.training_status["t-1"] = "running"
    threading.Timer(0.5, lambda: fake_server.training_status.update({"t-1": "completed"})).start()

    with make_client(fake_server, digits, poll_wait=0) as client:
        started = time.monotonic()
        stats = client.run(exit_when_training_done="t-1", stop_when_idle_for=10)

    assert stats.stop_reason == "training_done"
    assert time.monotonic() - started < 5


def test_stop_from_another_thread(fake_server: FakeAgentServer, digits: Digits) -> None:
    with make_client(fake_server, digits, poll_wait=1) as client:
        threading.Timer(0.3, client.stop).start()
        stats = client.run()

    assert stats.stop_reason == "stopped"


def test_run_raises_on_a_bad_token(fake_server: FakeAgentServer, digits: Digits) -> None:
    with make_client(fake_server, digits, token="nope") as client, pytest.raises(AgentApiError) as caught:
        client.run()

    assert caught.value.status == 401


def test_run_survives_a_server_outage(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    fake_server.script("GET", "/api/v1/agent/tasks/next", *[Scripted(503, b"")] * 3)
    fake_server.add_task(model)

    with make_client(fake_server, digits, max_attempts=2) as client:
        stats = client.run(max_tasks=1)

    assert stats.server_errors == 1
    assert stats.tasks_uploaded == 1


def test_enrolls_without_a_token(fake_server: FakeAgentServer, digits: Digits) -> None:
    with make_client(
        fake_server, digits, agent_id="agent_new", token=None, enrollment_key="enroll-me"
    ) as client:
        client.connect()
        assert client.token is not None and client.token.startswith("token-")
    assert fake_server.tokens[client.token] == "agent_new"


def test_enroll_function(fake_server: FakeAgentServer) -> None:
    agent_id, token = enroll(fake_server.url, "enroll-me", "agent_007", {"cpu": 2})

    assert agent_id == "agent_007"
    assert fake_server.tokens[token] == "agent_007"
    body = json.loads(fake_server.requests_to("POST", "/api/v1/agent/enroll")[0].body)
    assert body == {"enrollment_key": "enroll-me", "agent_id": "agent_007", "capabilities": {"cpu": 2}}
    with pytest.raises(AgentApiError) as caught:
        enroll(fake_server.url, "enroll-me", "agent_007")
    assert caught.value.status == 409


def test_async_initialize_and_arun(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    fake_server.add_task(model)

    async def main() -> int:
        client = make_client(fake_server, digits)
        await client.initialize()
        stats = await client.arun(max_tasks=1)
        client.close()
        return stats.tasks_uploaded

    assert asyncio.run(main()) == 1


def test_task_rng_depends_on_seed_and_agent() -> None:
    draw = lambda seed, agent: task_rng(seed, agent).integers(0, 2**32, size=4).tolist()  # noqa: E731

    assert draw(1, "a") == draw(1, "a")
    assert draw(1, "a") != draw(1, "b")
    assert draw(1, "a") != draw(2, "a")


def test_held_out_split_when_no_eval_data(digits: Digits) -> None:
    client = FederatedClient(agent_id="a", server="http://localhost:1", token="t", eval_fraction=0.25)
    x, y = digits
    client.add_dataset("one", x[:200], y[:200])
    client.add_dataset("two", x[200:], y[200:])

    x_train, _ = client.data.train
    x_eval, _ = client.data.evaluation
    assert (len(x_train), len(x_eval)) == (300, 100)
    rows = {row.tobytes() for row in x_train}
    assert not any(row.tobytes() in rows for row in x_eval)
    again = FederatedClient(agent_id="a", server="http://localhost:1", token="t", eval_fraction=0.25)
    again.add_dataset("one", x[:200], y[:200])
    again.add_dataset("two", x[200:], y[200:])
    np.testing.assert_array_equal(again.data.evaluation[0], x_eval)
    client.close()
    again.close()


def test_run_survives_a_garbled_poll_answer(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    fake_server.script("GET", "/api/v1/agent/tasks/next", Scripted(200, b"<html>not json</html>"))
    fake_server.add_task(model)

    with make_client(fake_server, digits) as client:
        stats = client.run(max_tasks=1)

    assert stats.server_errors == 1
    assert stats.tasks_uploaded == 1
