"""The rollback policy in a real run: agents that turn malicious make the model degrade, the training rolls
back to its best version with the server's momentum, and recovers once the attackers stop.

A live ASGI server, a Celery worker and six ``python -m fedagent run`` processes over HTTP (the fixture of
tests/test_end_to_end.py). FedAvgM on digits; three agents upload honest updates for four rounds, then
sign-flipped ones (scale 4) for two, then honest ones again (``--attack-after 4 --attack-for 2``). The
policy (threshold 5% relative, two degraded rounds in a row, back to the best) is re-derived here from the
recorded metrics, round by round, and every rollback the server made must be the one it predicts.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.live import spawn_agents, wait_until_finished
from tests.test_end_to_end import live_stack  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

THRESHOLD = 0.05
STREAK = 2
ATTACKERS = ("--attack", "sign_flip", "--attack-scale", "4", "--attack-after", "4", "--attack-for", "2")


def _expected_rollbacks(versions: list[Any]) -> list[tuple[int, int]]:
    """(rollback version number, target number) that the documented policy makes from these versions."""
    best: Any = None
    streak = 0
    expected = []
    for version in versions:
        if version.origin == "rollback":
            streak = 0  # the count starts afresh after a rollback
            continue
        accuracy = version.metrics.get("accuracy")
        if accuracy is None:
            continue
        if best is not None and accuracy < best.metrics["accuracy"] * (1 - THRESHOLD):
            streak += 1
            if streak == STREAK:
                expected.append((version.number + 1, best.number))
        else:
            streak = 0
        if best is None or accuracy > best.metrics["accuracy"]:
            best = version
    return expected


def test_attackers_make_the_policy_roll_back_to_the_best_version_and_it_recovers(
    live_stack: dict[str, Any],  # noqa: F811 - the fixture
) -> None:
    from clients.services import agent_create
    from trainings.configuration import TrainingConfiguration
    from trainings.models import Training
    from trainings.services import training_create_and_start
    from versioning.models import Rollback

    tokens = {f"rb-agent-{i}": agent_create(agent_id=f"rb-agent-{i}")[1] for i in range(6)}
    attackers = [agent for index, agent in enumerate(tokens) if index % 2 == 1]
    training = training_create_and_start(
        configuration=TrainingConfiguration.from_dict(
            {
                "name": "e2e rollback",
                "algorithm": "fedavgm",
                "hyperparameters": {"server_momentum": 0.5},
                "model_type": "mlp",
                "input_dim": 64,
                "num_classes": 10,
                "hidden_sizes": [32],
                "min_clients_per_round": 6,
                "max_clients_per_round": 6,
                "max_rounds": 12,
                "local_epochs": 2,
                "batch_size": 16,
                "learning_rate": 0.1,
                "round_timeout_seconds": 120,
                "evaluation_dataset": "digits",
                "seed": 7,
                "rollback": {
                    "enabled": True,
                    "metric": "accuracy",
                    "performance_threshold": THRESHOLD,
                    "consecutive_degradations": STREAK,
                    "rollback_to_best": True,
                    "max_rollbacks": 3,
                },
            }
        )
    )
    spawn_agents(
        live_stack,
        tokens,
        training.pk,
        partition=("--partition", "iid"),
        seed="7",
        poll_wait="5",
        per_agent=dict.fromkeys(attackers, ATTACKERS),
    )
    logs = wait_until_finished(live_stack, training, 420)
    assert training.status == Training.Status.COMPLETED, f"{training.status} {training.stop_reason}\n{logs}"

    versions = list(training.versions.order_by("number"))
    table = "\n".join(
        f"v{v.number:<3} {v.origin:<12} parent {v.parent.number if v.parent else '-':<3} "
        f"accuracy {v.metrics.get('accuracy', float('nan')):.4f}"
        for v in versions
    )
    print(f"\nversions of the rollback run (threshold {THRESHOLD}, streak {STREAK}):\n{table}")

    rollbacks = list(Rollback.objects.filter(training=training).select_related("target", "version"))
    expected = _expected_rollbacks(versions)
    assert expected, f"the attack did not degrade two rounds in a row:\n{table}\n{logs}"
    made = [(r.version.number, r.target.number) for r in rollbacks if r.status == Rollback.Status.APPLIED]
    assert made == expected, f"rollbacks {made}, the policy says {expected}\n{table}"
    for rollback in rollbacks:
        assert rollback.trigger == Rollback.Trigger.AUTOMATIC
        new, target = rollback.version, rollback.target
        assert new.origin == "rollback" and new.parent_id == target.pk
        assert new.blob_sha256 == target.blob_sha256  # the best version's weights
        assert new.state_blob_sha256 and new.state_blob_sha256 == target.state_blob_sha256  # and its momentum
        degraded = training.versions.get(number=new.number - 1)
        assert degraded.state_blob_sha256 != target.state_blob_sha256

    # once the attackers are honest again the model comes back to (about) its best accuracy
    best_before = max(v.metrics["accuracy"] for v in versions if v.number <= 4 and "accuracy" in v.metrics)
    after = [v.metrics["accuracy"] for v in versions if v.number > made[-1][0] and "accuracy" in v.metrics]
    assert after and max(after) >= best_before - 0.02, table
