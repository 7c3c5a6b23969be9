"""A federation driven over the real agent protocol (REST), for the anomaly and contribution tests.

Each round every agent polls its task and uploads the delta a callback makes from the global version it
was given; the aggregation runs in the Celery task (eager in these tests) exactly as in production.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from django.core.files.uploadedfile import SimpleUploadedFile

from flcore.data import client_split
from flcore.models import ModelSpec, build_model
from flcore.parameters import Parameters, subtract, to_bytes
from flcore.training import sgd_fit
from trainings.models import Training
from versioning.services import version_read_parameters

# (index of the agent in the round, global parameters) -> (delta, num_examples, train_loss or None)
UpdateMaker = Callable[[int, Parameters], tuple[Parameters, int, float | None]]


def run_round(
    client: Any,
    training: Training,
    agents: Sequence[tuple[Any, str]],
    make_update: UpdateMaker,
    capture: Any,
) -> int:
    """Upload one update per agent for the training's open round; return the round number."""
    training.refresh_from_db()
    base = version_read_parameters(training.current_version)
    number = None
    for index, (_agent, token) in enumerate(agents):
        response = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")
        assert response.status_code == 200, response.content
        task = response.json()
        number = task["round"]
        delta, num_examples, loss = make_update(index, base)
        meta: dict[str, Any] = {"num_examples": num_examples}
        if loss is not None:
            meta["metrics"] = {"train_loss": loss}
        with capture(execute=True):
            upload = client.post(
                task["upload_url"],
                {"update": SimpleUploadedFile("u", to_bytes(delta)), "meta": json.dumps(meta)},
                HTTP_AUTHORIZATION=f"Bearer {token}",
            )
        assert upload.status_code == 201, upload.content
    assert number is not None
    return int(number)


DIGITS_CONFIG = {
    "model_type": "logreg",
    "input_dim": 64,
    "num_classes": 10,
    "local_epochs": 1,
    "batch_size": 16,
    "learning_rate": 0.05,
}


class DigitsAgents:
    """Honest local training on IID digits shards (flcore's SGD, as the agent SDK runs it).

    ``noise_only`` agents hold features and labels drawn at random instead of their shard.
    """

    def __init__(self, num_agents: int, *, seed: int = 0, noise_only: Sequence[int] = ()) -> None:
        self.model = build_model(
            ModelSpec.from_json({"architecture": "logreg", "input_dim": 64, "num_classes": 10})
        )
        self.shards = []
        for index in range(num_agents):
            x, y, _, _ = client_split(
                "digits", num_clients=num_agents, client_index=index, scheme="iid", seed=seed
            )
            if index in noise_only:
                rng = np.random.default_rng([seed, index, 7])
                x = rng.uniform(float(x.min()), float(x.max()), size=x.shape).astype(x.dtype)
                y = rng.integers(0, 10, size=y.shape).astype(y.dtype)
            self.shards.append((x, y))
        self.round = 0

    def __call__(self, index: int, base: Parameters) -> tuple[Parameters, int, float | None]:
        x, y = self.shards[index]
        outcome = sgd_fit(
            self.model,
            base,
            x,
            y,
            epochs=1,
            batch_size=16,
            learning_rate=0.05,
            rng=np.random.default_rng([index, self.round]),
        )
        return subtract(outcome.parameters, base), outcome.num_examples, outcome.train_loss


def digits_federation(
    rest_round: Any,
    make_agent: Any,
    make_training: Any,
    *,
    prefix: str,
    num_agents: int,
    noise_only: Sequence[int],
    rounds: int,
    **config: Any,
) -> tuple[Training, list[tuple[Any, str]]]:
    """``rounds`` rounds of ``num_agents`` digits agents named ``<prefix><i>``, every one in every round
    (the ``noise_only`` ones hold random data); returns the training and the (agent, token) pairs."""
    agents = [make_agent(f"{prefix}{i}") for i in range(num_agents)]
    training = make_training(
        **DIGITS_CONFIG,
        min_clients_per_round=num_agents,
        max_clients_per_round=num_agents,
        max_rounds=rounds,
        **config,
    )
    play = DigitsAgents(num_agents, noise_only=noise_only)
    for _ in range(rounds):
        rest_round(training, agents, play)
    training.refresh_from_db()
    return training, agents
