"""Secure aggregation costs no accuracy: digits with 10 agents, plain FedAvg against the same training under
``secagg+`` (issue 8: within 1 point).

Both trainings run through the real coordinator; every agent is fedagent's ``FederatedClient`` talking to
the real views through a WSGI transport, so every phase goes through URL routing, authentication,
validation and the round protocol. Under ``secagg+`` each agent clips to ``clip_norm`` (above every delta
of this task, so nothing is clipped), weights by ``min(n, cap) / cap`` (the cap is above every agent's
count, so these are FedAvg's weights) and quantises to 32 bits; the server only ever holds masked vectors.
What can move the accuracy is therefore a wrong unmasking, weighting or dequantisation, which this test
would catch. ``bench/secagg_digits.py`` runs the same comparison for 10 rounds and prints a table.
"""

from __future__ import annotations

from typing import Any

import pytest

from fedagent.client import FederatedClient
from flcore.data import client_split
from trainings.models import Round, Task, Training
from trainings.simulation import dataset_configuration
from trainings.tests.secagg_agents import make_parties, sdk_over_wsgi
from trainings.tests.test_secagg_rounds import wsgi_transport  # noqa: F401 - the fixture

AGENTS = 10
ROUNDS = 4


def _start(configuration: Any) -> Training:
    from trainings.services import training_create_and_start

    return training_create_and_start(configuration=configuration)


def _drive(training: Training, clients: dict[Any, FederatedClient]) -> list[Round]:
    """Let every agent holding an open task of ``training`` poll once and answer it, until it ends."""
    for _ in range(ROUNDS * 8):  # 4 phases a round under secure aggregation; twice that is a hang
        training.refresh_from_db()
        if training.status != Training.Status.RUNNING:
            break
        holders = set(
            Task.objects.filter(round__training=training, status__in=list(Task.OPEN)).values_list(
                "agent_id", flat=True
            )
        )
        assert holders, f"round stuck: {list(training.rounds.values('number', 'status', 'error'))}"
        for agent_pk in holders:
            outcome = clients[agent_pk].run_one(wait=0)
            assert outcome is not None and outcome.status == "uploaded", outcome
    training.refresh_from_db()
    assert training.status == Training.Status.COMPLETED, training.stop_reason
    return list(training.rounds.filter(status=Round.Status.COMPLETED).order_by("number"))


@pytest.mark.django_db(transaction=True)  # the agents' requests commit, as over real HTTP
def test_digits_with_secagg_plus_reaches_the_plain_fedavg_accuracy_within_one_point(
    client: Any,
    make_agent: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
    wsgi_transport: Any,  # noqa: F811
) -> None:
    agents = make_parties(client, make_agent, AGENTS, "digits")
    clients: dict[Any, FederatedClient] = {}
    for agent_id, info in agents.items():
        sdk = sdk_over_wsgi(agent_id, info, wsgi_transport, seed=info["index"])
        x_train, y_train, _, _ = client_split(
            "digits", num_clients=AGENTS, client_index=info["index"], scheme="iid", seed=0, eval_fraction=0.0
        )
        sdk.add_dataset("private", x_train, y_train)
        clients[info["agent"].pk] = sdk

    def configuration(secure: bool) -> Any:
        overrides = {"secure_aggregation": {"protocol": "secagg+", "clip_norm": 10.0}} if secure else {}
        return dataset_configuration(
            "digits",
            name="secure" if secure else "plain",
            max_rounds=ROUNDS,
            target_accuracy=None,
            min_clients=AGENTS,
            max_clients=AGENTS,
            overrides=overrides,
        )

    try:
        with django_capture_on_commit_callbacks(execute=True):
            plain = _drive(_start(configuration(secure=False)), clients)
            secure = _drive(_start(configuration(secure=True)), clients)
    finally:
        for sdk in clients.values():
            sdk.close()

    assert len(plain) == len(secure) == ROUNDS
    assert all(r.metrics["secagg_survivors"] == AGENTS for r in secure)
    assert all("secagg_survivors" not in r.metrics for r in plain)
    plain_accuracy, secure_accuracy = plain[-1].metrics["accuracy"], secure[-1].metrics["accuracy"]
    assert plain_accuracy > 0.85  # the task was learnt, so the comparison means something
    assert abs(secure_accuracy - plain_accuracy) <= 0.01, (plain_accuracy, secure_accuracy)
