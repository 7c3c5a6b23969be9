"""The seed's Python API (``FederatedCoordinator``) against the real database.

The awaitable calls run the ORM on ``sync_to_async``'s worker thread, which has its own database
connection, so these tests commit for real (``transaction=True``).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from clients.models import Agent
from fedsite.errors import Conflict, NotFound, ValidationFailed
from trainings import coordinator as coordinator_module
from trainings.coordinator import AggregationAlgorithm, FederatedCoordinator, TrainingConfiguration
from trainings.models import Round, Training

CONFIG = TrainingConfiguration(
    name="mnist_classification",
    algorithm=AggregationAlgorithm.FEDAVG,
    model_type="logreg",
    input_dim=4,
    num_classes=3,
    hidden_sizes=(),
    target_accuracy=0.95,
    max_rounds=5,
    min_clients_per_round=2,
    max_clients_per_round=3,
)


def test_reexports_are_the_project_types() -> None:
    from flcore.strategies import AggregationAlgorithm as StrategyAlgorithm
    from trainings.configuration import TrainingConfiguration as ConfigurationType

    assert coordinator_module.TrainingConfiguration is ConfigurationType
    assert coordinator_module.AggregationAlgorithm is StrategyAlgorithm


@pytest.mark.django_db(transaction=True)
def test_start_status_stop_as_in_the_seed(make_agent: Any) -> None:
    make_agent(), make_agent()

    async def scenario() -> tuple[str, dict[str, Any], dict[str, Any]]:
        coordinator = FederatedCoordinator()
        await coordinator.initialize()
        training_id = await coordinator.start_training(CONFIG)
        status = coordinator.get_training_status(training_id)  # a plain call, from async code
        stopped = await coordinator.stop_training(training_id)
        return training_id, status, stopped

    training_id, status, stopped = asyncio.run(scenario())

    training = Training.objects.get(pk=training_id)
    assert status["training_id"] == training_id
    assert status["status"] == "running"
    assert status["round"]["number"] == 1
    assert status["round"]["tasks"]["pending"] == 2
    assert stopped["status"] == "stopped"
    assert training.status == Training.Status.STOPPED
    assert training.rounds.get().status == Round.Status.CANCELLED


@pytest.mark.django_db(transaction=True)
def test_start_training_validates_a_directly_built_configuration() -> None:
    bad = TrainingConfiguration(name="bad", max_rounds=0, learning_rate=-1.0)

    with pytest.raises(ValidationFailed) as error:
        asyncio.run(FederatedCoordinator().start_training(bad))

    assert set(error.value.details) == {"max_rounds", "learning_rate"}
    assert not Training.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_start_training_accepts_the_seed_model_type_and_a_dict() -> None:
    async def scenario() -> tuple[str, str]:
        coordinator = FederatedCoordinator()
        first = await coordinator.start_training(
            TrainingConfiguration(name="seed style", model_type="neural_network", hidden_sizes=(8,))
        )
        second = await coordinator.start_training({"name": "from a dict", "model_type": "logreg"})
        return first, second

    first, second = asyncio.run(scenario())

    assert Training.objects.get(pk=first).model_spec["architecture"] == "mlp"
    assert Training.objects.get(pk=second).model_spec["architecture"] == "logreg"


@pytest.mark.django_db(transaction=True)
@override_settings(FEDSITE_MAX_CONCURRENT_TRAININGS=1)
def test_start_training_beyond_the_concurrency_limit_is_refused() -> None:
    coordinator = FederatedCoordinator()
    asyncio.run(coordinator.start_training(CONFIG))

    with pytest.raises(Conflict, match="max_concurrent_trainings is 1"):
        asyncio.run(coordinator.start_training(CONFIG))

    assert coordinator.get_coordinator_stats()["running_trainings"] == 1


@pytest.mark.django_db(transaction=True)
def test_unknown_training_is_not_found() -> None:
    coordinator = FederatedCoordinator()

    with pytest.raises(NotFound):
        coordinator.get_training_status("00000000-0000-0000-0000-000000000000")
    with pytest.raises(NotFound):
        coordinator.get_training_status("not-a-uuid")
    with pytest.raises(NotFound):
        asyncio.run(coordinator.stop_training("00000000-0000-0000-0000-000000000000"))


@pytest.mark.django_db(transaction=True)
@override_settings(FEDSITE_MAX_CONCURRENT_TRAININGS=4, FEDSITE_CPU_CORES=7)
def test_coordinator_stats_count_trainings_agents_and_rounds(make_agent: Any, make_training: Any) -> None:
    make_agent(), make_agent()
    stale, _ = make_agent()
    Agent.objects.filter(pk=stale.pk).update(last_seen_at=timezone.now() - timedelta(days=1))
    make_agent(online=False)
    running = make_training()
    make_training(start=False)
    stopped = make_training()
    asyncio.run(FederatedCoordinator().stop_training(str(stopped.pk)))
    Round.objects.filter(training=running).update(status=Round.Status.COMPLETED)

    stats = FederatedCoordinator().get_coordinator_stats()

    assert stats["running_trainings"] == 1
    assert stats["total_trainings"] == 3
    assert stats["trainings_by_status"]["pending"] == 1
    assert stats["trainings_by_status"]["stopped"] == 1
    assert stats["agents_online"] == 2
    assert stats["rounds_completed"] == 1
    assert stats["max_concurrent_trainings"] == 4
    assert stats["cpu_cores"] == 7
